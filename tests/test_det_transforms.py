"""Detection transforms (evit_jax.data.det_transforms): OpenCV parity (letterbox resize within one
grey level, HSV conversions and YOLOX's augment_hsv exact), box/flip/letterbox arithmetic by hand,
boxes following the image (coloured rectangles located after every geometric augmentation,
within a pixel), the batch contract and determinism."""

import pickle

import numpy as np
import pytest

from evit_jax.data import det_transforms as dt

cv2 = pytest.importorskip("cv2")

COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
                    [255, 255, 255], [255, 128, 0]], np.uint8)


def _example(boxes, labels, hw, image_id=0, crowd=None, background=0):
    """A record whose image is ``background`` with each box filled with COLOURS[label]."""
    image = np.full(hw + (3,), background, np.uint8)
    for (x1, y1, x2, y2), label in zip(np.asarray(boxes, int), labels):
        image[y1:y2, x1:x2] = COLOURS[label]
    n = len(labels)
    return {"image": image, "image_id": image_id,
            "objects": {"bbox": np.asarray(boxes, np.float64).reshape(-1, 4), "label": np.asarray(labels, np.int64),
                        "is_crowd": np.zeros(n, bool) if crowd is None else np.asarray(crowd, bool),
                        "area": np.ones(n)}}


def _region_box(image, colour, tolerance=60, near=None, margin=3):
    """The pixel-edge box of the pixels within ``tolerance`` of ``colour`` (None if none), only
    looking within ``margin`` pixels of box ``near`` when given (other objects may share a colour)."""
    close = np.abs(image.astype(int) - colour).max(axis=-1) <= tolerance
    if near is not None:
        x1, y1, x2, y2 = np.floor(near[:2] - margin).astype(int).tolist() + np.ceil(near[2:] + margin).astype(int).tolist()
        window = np.zeros_like(close)
        window[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)] = True
        close &= window
    if not close.any():
        return None
    rows, cols = np.flatnonzero(close.any(axis=1)), np.flatnonzero(close.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], float)


def _check_boxes_follow_image(out, tol=1.0, interior_only=False, colour_scale=1.0, tolerance=60):
    image = out["image"]
    found = 0
    for box, label, real in zip(out["boxes"], out["classes"], out["box_mask"]):
        if not real:
            continue
        if interior_only and (box[0] <= 1 or box[1] <= 1 or box[2] >= image.shape[1] - 1 or box[3] >= image.shape[0] - 1):
            continue
        region = _region_box(image, COLOURS[label] * colour_scale, tolerance, near=box)
        assert region is not None, (box, label)
        np.testing.assert_allclose(region, box, atol=tol, err_msg=f"class {label}")
        found += 1
    return found


# ----------------------------------------------------------------------------- OpenCV parity
def test_letterbox_matches_yolox_preproc():
    rng = np.random.default_rng(0)
    for hw, size in [((48, 64), 96), ((64, 40), 96), ((100, 100), 64), ((30, 90), (64, 80))]:
        image = rng.integers(0, 256, hw + (3,), dtype=np.uint8)
        out, r = dt.letterbox(image, size)
        size_hw = (size, size) if isinstance(size, int) else size
        # YOLOX preproc: r = min(S/h, S/w); cv2.resize to (int(w*r), int(h*r)) INTER_LINEAR; pad 114.
        expected_r = min(size_hw[0] / hw[0], size_hw[1] / hw[1])
        new_h, new_w = int(hw[0] * expected_r), int(hw[1] * expected_r)
        reference = np.full(size_hw + (3,), 114, np.uint8)
        reference[:new_h, :new_w] = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        assert r == expected_r and out.shape == size_hw + (3,)
        # OpenCV's fixed-point bilinear vs exact rounding: at most one grey level apart.
        assert np.abs(out.astype(int) - reference).max() <= 1


def test_rgb_hsv_conversions_are_opencv_exact():
    # Every RGB colour with a blue in steps of 5; every HSV triple with a value in steps of 5
    # (the 256 x 256 planes show every hue/saturation case), in rows of 256 pixels: OpenCV's
    # vectorised path (all but the last width mod 32 pixels of a row) converts all of them.
    grid = np.stack(np.meshgrid(np.arange(256), np.arange(256), np.arange(0, 256, 5), indexing="ij"), -1)
    rgb = grid.reshape(-1, 256, 3).astype(np.uint8)
    np.testing.assert_array_equal(dt.rgb_to_hsv(rgb), cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV))
    hsv = np.stack(np.meshgrid(np.arange(180), np.arange(256), np.arange(0, 256, 5), indexing="ij"), -1)
    hsv = hsv.reshape(-1, 256, 3).astype(np.uint8)
    np.testing.assert_array_equal(dt.hsv_to_rgb(hsv), cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))
    # A row tail goes through OpenCV's scalar loop, which rounds instead of truncating.
    tail = hsv[:64, :7]
    assert np.abs(dt.hsv_to_rgb(tail).astype(int) - cv2.cvtColor(np.ascontiguousarray(tail), cv2.COLOR_HSV2RGB)).max() <= 1


def _yolox_augment_hsv(image_bgr, gains):
    """YOLOX's augment_hsv (data_augment.py) with the gains given instead of drawn."""
    hue, sat, val = cv2.split(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2HSV))
    x = np.arange(0, 256, dtype=np.int16)
    lut_hue = ((x * gains[0]) % 180).astype(np.uint8)
    lut_sat = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_val = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    merged = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    return cv2.cvtColor(merged, cv2.COLOR_HSV2BGR)


def test_hsv_jitter_is_yolox_augment_hsv():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)   # width a multiple of 32: see above
    for _ in range(5):
        gains = rng.uniform(-1, 1, 3) * dt.HSV_GAINS + 1
        expected = _yolox_augment_hsv(image[..., ::-1].copy(), gains)[..., ::-1]   # YOLOX works in BGR
        np.testing.assert_array_equal(dt.apply_hsv_gains(image, gains), expected)
    draw = np.random.default_rng(5)
    gains = draw.uniform(-1, 1, 3) * dt.HSV_GAINS + 1
    np.testing.assert_array_equal(dt.hsv_jitter(image, np.random.default_rng(5)), dt.apply_hsv_gains(image, gains))


def test_warp_affine_is_cv2_warp_affine_with_pixel_centres():
    """Our continuous map M equals cv2's integer-pixel map T(-0.5) M T(0.5) (interior pixels)."""
    rng = np.random.default_rng(2)
    image = cv2.GaussianBlur(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8), (7, 7), 2)
    matrix, _ = dt.affine_matrix(rng, (80, 96), (64, 64), degrees=10, translate=0.1, scale=(0.6, 0.9), shear=2)
    ours = dt.warp_affine(image, matrix, (64, 64))
    shift = np.eye(3)
    shift[:2, 2] = 0.5
    cv_matrix = (np.linalg.inv(shift) @ matrix @ shift)[:2]
    reference = cv2.warpAffine(image, cv_matrix, (64, 64), flags=cv2.INTER_LINEAR, borderValue=(114, 114, 114))
    # Pixels whose source lies 2 px inside the image (the borders are handled differently).
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    src = np.linalg.inv(matrix) @ np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    inside = ((src[0] > 2) & (src[0] < 94) & (src[1] > 2) & (src[1] < 78)).reshape(64, 64)
    assert inside.mean() > 0.5
    assert np.abs(ours.astype(int) - reference)[inside].max() <= 1


def test_affine_matrix_is_yolox_composition():
    rng = np.random.default_rng(3)
    matrix, s = dt.affine_matrix(np.random.default_rng(3), (100, 200), (50, 60), degrees=10, translate=0.1,
                                 scale=(0.5, 1.5), shear=2)
    angle, scale = rng.uniform(-10, 10), rng.uniform(0.5, 1.5)
    shear_x, shear_y = rng.uniform(-2, 2), rng.uniform(-2, 2)
    tx, ty = rng.uniform(0.4, 0.6) * 60, rng.uniform(0.4, 0.6) * 50
    c, r, sh, t = np.eye(3), np.eye(3), np.eye(3), np.eye(3)
    c[0, 2], c[1, 2] = -100, -50
    r[:2] = cv2.getRotationMatrix2D(angle=angle, center=(0, 0), scale=scale)
    sh[0, 1], sh[1, 0] = np.tan(np.radians(shear_x)), np.tan(np.radians(shear_y))
    t[0, 2], t[1, 2] = tx, ty
    np.testing.assert_allclose(matrix, t @ sh @ r @ c, atol=1e-12)
    assert s == scale


# ----------------------------------------------------------------------------- arithmetic
def test_flip_and_letterbox_arithmetic():
    image = np.zeros((10, 20, 3), np.uint8)
    flipped_image, flipped = dt.hflip(image, np.array([[2.0, 1.0, 5.0, 4.0], [0, 0, 20, 10]]))
    np.testing.assert_array_equal(flipped, [[15, 1, 18, 4], [0, 0, 20, 10]])
    assert flipped_image.shape == image.shape
    out, r = dt.letterbox(np.zeros((30, 40, 3), np.uint8), 64)
    assert r == 1.6 and (out[:48, :64] == 0).all() and (out[48:] == 114).all()
    # Detections come back to original pixels: divide by the scale, clip to the image.
    np.testing.assert_allclose(dt.unletterbox_boxes([[16, 8, 80, 48]], r, (30, 40)), [[10, 5, 40, 30]])


def test_random_rescale_arithmetic():
    example = _example([[10, 20, 30, 40]], [0], (50, 100))
    image, boxes, labels = dt.random_rescale(example["image"], example["objects"]["bbox"], np.array([0]),
                                             (64, 64), np.random.default_rng(0))
    # Letterbox: r = 0.64, (32, 64) image at the top-left, box scaled by 64/100 and 32/50.
    np.testing.assert_allclose(boxes, [[6.4, 12.8, 19.2, 25.6]])
    assert (image[32:] == 114).all() and labels.tolist() == [0]
    # Twice the letterbox scale: a (64, 128) image at horizontal offset dx drawn from [-64, 0]
    # (seed 4: -7, seed 0: -31, seed 2: -57); the box [10, 20, 30, 40] * 1.28 + dx, clipped, is kept
    # while more than 20 % of it stays visible.
    for seed, dx, expected in [(4, -7, [[5.8, 25.6, 31.4, 51.2]]), (0, -31, [[0.0, 25.6, 7.4, 51.2]]), (2, -57, [])]:
        replay = np.random.default_rng(seed)
        replay.uniform(2.0, 2.0)
        assert (int(replay.integers(0, 1)), int(replay.integers(-64, 1))) == (0, dx)
        _, boxes, labels = dt.random_rescale(example["image"], example["objects"]["bbox"], np.array([0]),
                                             (64, 64), np.random.default_rng(seed), scale_range=(2.0, 2.0))
        np.testing.assert_allclose(boxes.reshape(-1, 4), np.reshape(expected, (-1, 4)), atol=1e-9)
        assert len(labels) == len(expected)


def test_training_objects_drop_crowds_and_clip():
    example = _example([[-3, 0, 10, 10], [5, 5, 9, 9], [20, 20, 20, 30]], [0, 1, 2], (40, 40), crowd=[0, 1, 0])
    boxes, labels = dt.training_objects(example, hw=(40, 40))
    np.testing.assert_array_equal(boxes, [[0, 0, 10, 10]])
    assert labels.tolist() == [0]


# ----------------------------------------------------------------------------- boxes follow the image
BOXES = [[4, 6, 20, 30], [30, 4, 60, 16], [26, 30, 44, 52], [50, 36, 62, 60]]


def _source(n=6):
    rng = np.random.default_rng(7)
    records = []
    for i in range(n):
        hw = (int(rng.integers(48, 80)), int(rng.integers(64, 100)))
        labels = rng.permutation(len(COLOURS))[:4]
        boxes = np.array(BOXES, float) * ([hw[1] / 64, hw[0] / 64] * 2)
        records.append(_example(np.round(boxes), labels, hw, image_id=i))
    return records


def test_boxes_follow_image_without_mosaic():
    source = _source()
    transform = dt.DetectionTrainTransform(max_boxes=6, hsv_prob=0.0, flip_prob=0.5, scale_range=(0.5, 1.6))
    checked = 0
    for i in range(12):
        out = transform(source[i % len(source)], (64, 72), np.random.default_rng([0, i]))
        checked += _check_boxes_follow_image(out)
    assert checked >= 30


def test_boxes_follow_image_in_mosaic():
    source = _source()
    # Without rotation/shear a clipped box is exactly the visible part of its rectangle.
    plain = dt.DetectionTrainTransform(max_boxes=20, source=source, mosaic_prob=1.0, hsv_prob=0.0,
                                       degrees=0.0, shear=0.0, mosaic_scale=(0.5, 1.5))
    # With them, the box of the mapped corners is the rotated rectangle's box (not cut: interior).
    rotated = dt.DetectionTrainTransform(max_boxes=20, source=source, mosaic_prob=1.0, hsv_prob=0.0,
                                         degrees=10.0, shear=2.0, mosaic_scale=(0.5, 1.5))
    checked = [0, 0]
    for i in range(10):
        checked[0] += _check_boxes_follow_image(plain(source[i % 6], (96, 96), np.random.default_rng([1, i])),
                                                tol=1.5)
        checked[1] += _check_boxes_follow_image(rotated(source[i % 6], (96, 96), np.random.default_rng([1, i])),
                                                tol=1.5, interior_only=True)
    assert checked[0] >= 20 and checked[1] >= 10, checked


def test_boxes_follow_image_in_mixup():
    source = _source()
    base = np.zeros((64, 64, 3), np.uint8)   # black: the blend shows the other image at half intensity
    checked = 0
    for i in range(8):
        other = source[i % 6]
        item = (other["image"], *dt.training_objects(other, hw=other["image"].shape[:2]))
        image, boxes, labels = dt.mixup(base, np.zeros((0, 4)), np.zeros(0, np.int64), item,
                                        np.random.default_rng([2, i]), scale=(0.5, 1.5))
        out = {"image": image, **dt.pad_boxes(boxes, labels, 8)}
        # Interiors are exactly half the colour; edges blend, so the tolerance is tight.
        checked += _check_boxes_follow_image(out, tol=1.5, colour_scale=0.5, tolerance=20)
    assert checked >= 12


# ----------------------------------------------------------------------------- contract
def test_train_output_contract_and_determinism():
    source = _source()
    transform = dt.DetectionTrainTransform(max_boxes=3, source=source, mosaic_prob=0.5, mixup_prob=0.5)
    a = transform(source[0], (64, 64), np.random.default_rng([9, 3]))
    b = pickle.loads(pickle.dumps(transform))(source[0], (64, 64), np.random.default_rng([9, 3]))
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {
        "image": ((64, 64, 3), np.uint8), "boxes": ((3, 4), np.float32), "classes": ((3,), np.int32),
        "box_mask": ((3,), np.int32)}
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    outs = [transform(source[0], (64, 64), np.random.default_rng([9, k]))["image"] for k in range(4)]
    assert len({o.tobytes() for o in outs}) == 4
    mask = a["box_mask"].astype(bool)
    assert (a["boxes"][~mask] == 0).all() and mask.tolist() == sorted(mask.tolist(), reverse=True)
    w, h = (a["boxes"][mask, 2:] - a["boxes"][mask, :2]).T
    assert (np.minimum(w, h) > 1).all()


def test_degenerate_and_crowd_boxes_are_not_trained_on():
    example = _example([[2, 2, 3, 30], [10, 10, 30, 30], [40, 40, 60, 60]], [0, 1, 2], (64, 64), crowd=[0, 0, 1])
    out = dt.DetectionTrainTransform(max_boxes=4, hsv_prob=0, flip_prob=0)(example, (64, 64), np.random.default_rng(0))
    assert out["box_mask"].tolist() == [1, 0, 0, 0] and out["classes"][0] == 1


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="source"):
        dt.DetectionTrainTransform(max_boxes=4, mosaic_prob=1.0)
    with pytest.raises(ValueError, match="max_boxes"):
        dt.DetectionTrainTransform(max_boxes=0)
    assert dt.DetectionTrainTransform(max_boxes=2, source=[{}], mosaic_prob=1, mixup_prob=1).without_mosaic().mosaic_prob == 0


def test_eval_transform_contract_and_round_trip():
    example = _example([[10, 5, 90, 45]], [0], (50, 100), image_id=123456789012)
    out = dt.DetectionEvalTransform(size=64)(example)
    assert out["image"].shape == (64, 64, 3) and out["image"].dtype == np.uint8
    assert out["image_id"] == 123456789012 and out["image_id"].dtype == np.int64
    assert out["scale"] == np.float32(0.64) and out["orig_hw"].tolist() == [50, 100]
    assert (out["image"][32:] == 114).all()
    # A detection of the letterboxed object maps back onto the original box.
    region = _region_box(out["image"], COLOURS[0])
    np.testing.assert_allclose(dt.unletterbox_boxes(region[None], out["scale"], out["orig_hw"])[0],
                               [10, 5, 90, 45], atol=1 / 0.64)


def test_pipeline_batches_identical_for_one_and_two_processes():
    from evit_jax.data import pipeline

    source = _source(8)
    transform = dt.DetectionTrainTransform(max_boxes=5, source=source, mosaic_prob=0.5, mixup_prob=0.5)

    def batches(process_count):
        its = [pipeline.make_train_iterator(source, transform, global_batch_size=4, image_sizes=[32, 48], seed=3,
                                           process_index=p, process_count=process_count, read_threads=1)
               for p in range(process_count)]
        out = []
        for _ in range(3):
            parts = [next(it) for it in its]
            out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
        return out

    for one, two in zip(batches(1), batches(2)):
        for key in one:
            np.testing.assert_array_equal(one[key], two[key])
