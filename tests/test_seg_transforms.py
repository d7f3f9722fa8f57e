"""Segmentation transforms: resize parity, label integrity, image/label alignment, eval rules."""

import math

import numpy as np
import pytest

from evit_jax import interpolation
from evit_jax.data import seg_transforms as T

IGNORE = T.IGNORE_INDEX
# Class c is painted with colour PALETTE[c]; colours are far apart so mixes are detectable.
PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0],
                    [0, 255, 255]], dtype=np.uint8)


def _block_scene(rng, shape=(96, 160), block=16):
    """A label map of random classes on block x block tiles and the image painting it."""
    tiles = rng.integers(0, len(PALETTE), (shape[0] // block, shape[1] // block))
    label = np.kron(tiles, np.ones((block, block), dtype=np.int64)).astype(np.uint8)
    label[:block // 2, :block // 2] = IGNORE  # An ignore region travels with the rest.
    image = PALETTE[np.where(label == IGNORE, 0, label)]
    return image, label


def _misaligned_pixels(image, label):
    """Non-ignore pixels inside a uniform 3x3 label neighbourhood whose colour is not
    their class colour (pixels next to a label edge, or on the border of a crop whose
    neighbours were cut away, may legitimately mix colours)."""
    padded = np.pad(label.astype(np.int64), 1, constant_values=-1)
    uniform = np.ones(label.shape, dtype=bool)
    for dy in range(3):
        for dx in range(3):
            uniform &= padded[dy:dy + label.shape[0], dx:dx + label.shape[1]] == label
    check = uniform & (label != IGNORE)
    expected = PALETTE[np.where(check, label, 0)]
    wrong = np.abs(image.astype(int) - expected.astype(int)).max(axis=-1) > 2
    return int((wrong & check).sum()), int(check.sum())


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(70, 64), (17, 30), (37, 53), (111, 9)])
def test_resize_matches_torch(method, size):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).integers(0, 256, (37, 53, 3)).astype(np.uint8)
    ref = torch.nn.functional.interpolate(
        torch.tensor(x).permute(2, 0, 1)[None].double(), size=size, mode=method,
        align_corners=False)[0].permute(1, 2, 0).numpy()
    rows = interpolation.interpolation_matrix(37, size[0], method).astype(np.float64)
    cols = interpolation.interpolation_matrix(53, size[1], method).astype(np.float64)
    ours = np.einsum("ih,hwc,jw->ijc", rows, x.astype(np.float64), cols)
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    resized = T.resize_image(x, size, method)
    assert resized.dtype == np.uint8
    assert np.abs(resized.astype(float) - np.clip(ref, 0, 255)).max() <= 0.51 + 1e-3


def test_interpolation_matrix_padding_is_exact():
    full = interpolation.interpolation_matrix(10, 24)
    padded = interpolation.interpolation_matrix(10, 24, padded_in=16, padded_out=32)
    assert padded.shape == (32, 16)
    np.testing.assert_array_equal(padded[:24, :10], full)
    assert not padded[24:].any() and not padded[:, 10:].any()
    with pytest.raises(ValueError):
        interpolation.interpolation_matrix(10, 24, padded_in=8)


def test_window_equals_full_resize_then_crop():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (40, 50, 3)).astype(np.uint8)
    label = rng.integers(0, 7, (40, 50))
    for method in ("bilinear", "bicubic"):
        full = T.resize_image(x, (93, 71), method)
        np.testing.assert_array_equal(T.resize_image(x, (93, 71), method, (11, 5, 30, 40)),
                                      full[11:41, 5:45])
    np.testing.assert_array_equal(T.resize_label(label, (93, 71), (11, 5, 30, 40)),
                                  T.resize_label(label, (93, 71))[11:41, 5:45])


def test_label_resize_is_nearest_and_aligned():
    label = np.random.default_rng(2).integers(0, 5, (9, 13))
    np.testing.assert_array_equal(T.resize_label(label, (27, 39))[1::3, 1::3], label)
    np.testing.assert_array_equal(T.resize_label(label, (18, 26))[::2, ::2], label)


def test_train_transform_keeps_labels_integral_and_aligned():
    rng = np.random.default_rng(3)
    checked = 0
    for seed in range(24):
        image, label = _block_scene(rng)
        out = T.train_transform(image, label[..., None], np.random.default_rng(seed),
                                crop_size=(64, 96), scale_range=(0.5, 2.0), jitter=None)
        assert out["image"].shape == (64, 96, 3) and out["image"].dtype == np.uint8
        assert out["label"].shape == (64, 96) and out["label"].dtype == np.int32
        assert set(np.unique(out["label"])) <= set(np.unique(label)) | {IGNORE}
        wrong, count = _misaligned_pixels(out["image"], out["label"])
        assert wrong == 0, f"seed {seed}: {wrong} misaligned pixels"
        checked += count
    assert checked > 24 * 64 * 96 * 0.3
    # The checker sees a misalignment: flip the image but not the label.
    image, label = _block_scene(np.random.default_rng(4))
    assert _misaligned_pixels(image[:, ::-1], label)[0] > 0


def test_scale_crop_pads_with_zero_and_ignore():
    image, label = _block_scene(np.random.default_rng(5), shape=(32, 48))
    out_image, out_label = T.random_scale_crop(image, label, np.random.default_rng(0),
                                               crop_size=(80, 100), scale_range=(1.0, 1.0))
    assert out_image.shape == (80, 100, 3) and out_label.shape == (80, 100)
    np.testing.assert_array_equal(out_image[:32, :48], image)
    np.testing.assert_array_equal(out_label[:32, :48], label)
    assert (out_label[32:] == IGNORE).all() and (out_label[:, 48:] == IGNORE).all()
    assert not out_image[32:].any() and not out_image[:, 48:].any()


def test_rescaled_size_with_base_box():
    assert T.rescaled_size(1024, 2048, 1.0, (2048, 1024)) == (1024, 2048)
    assert T.rescaled_size(1024, 2048, 0.5, (2048, 1024)) == (512, 1024)
    assert T.rescaled_size(375, 500, 1.0, (2048, 512)) == (512, 683)   # short edge binds
    assert T.rescaled_size(500, 375, 2.0, (2048, 512)) == (1365, 1024)  # orientation-free
    assert T.rescaled_size(100, 60, 1.5) == (150, 90)


def test_photometric_jitter_changes_only_colours():
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, (20, 30, 3)).astype(np.uint8)
    always = T.PhotometricJitter(prob=1.0)
    out = T.photometric_jitter(image, np.random.default_rng(0), always)
    assert out.shape == image.shape and out.dtype == np.uint8 and not np.array_equal(out, image)
    grey = np.repeat(rng.integers(0, 256, (20, 30, 1)), 3, axis=-1).astype(np.uint8)
    hue_only = T.PhotometricJitter(brightness_delta=0, contrast_range=(1, 1),
                                   saturation_range=(1, 1), hue_delta=30, prob=1.0)
    # A hue rotation leaves grey pixels grey.
    assert np.abs(T.photometric_jitter(grey, rng, hue_only).astype(int) - grey).max() <= 1
    label = rng.integers(0, 3, (20, 30))
    out = T.train_transform(image, label, np.random.default_rng(1), crop_size=(20, 30),
                            scale_range=(1.0, 1.0), flip_prob=0.0, jitter=always)
    np.testing.assert_array_equal(out["label"], label)


def test_eval_sizes_follow_the_official_rules():
    assert T.cityscapes_eval_size(1024) == (1024, 2048)
    assert T.cityscapes_eval_size(512) == (512, 1024)
    assert T.ade20k_eval_size(375, 500) == (512, 704)   # ceil(682.67 / 32) * 32
    assert T.ade20k_eval_size(512, 683) == (512, 704)
    assert T.ade20k_eval_size(683, 512) == (704, 512)
    assert T.ade20k_eval_size(256, 256) == (512, 512)
    assert T.ade20k_eval_size(300, 1200) == (512, 2048)
    for h, w in ((321, 479), (480, 640), (1000, 333)):
        th, tw = T.ade20k_eval_size(h, w)
        assert min(th, tw) == 512 and th % 32 == 0 and tw % 32 == 0
        long_edge = max(h, w) / min(h, w) * 512
        assert long_edge <= max(th, tw) < long_edge + 32
    with pytest.raises(ValueError, match="Unknown eval protocol"):
        T.eval_input_size("voc", 10, 10, 512)


def test_eval_transform_resizes_image_only():
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (48, 64, 3)).astype(np.uint8)
    label = rng.integers(0, 19, (48, 64, 1)).astype(np.uint8)
    city = T.eval_transform(image, label, "cityscapes", crop_size=16)
    assert city["image"].shape == (16, 32, 3)
    np.testing.assert_array_equal(city["label"], label[..., 0])
    assert city["label"].dtype == np.int32
    ade = T.eval_transform(image, label, "ade20k", crop_size=32)
    assert ade["image"].shape == (32, 64, 3) and ade["label"].shape == (48, 64)
    np.testing.assert_array_equal(T.eval_transform(image, label, "none", 0)["image"], image)


def test_pad_for_batch_marks_padding_as_ignore():
    image = np.full((20, 30, 3), 7, np.uint8)
    label = np.ones((25, 35), np.int32)
    out = T.pad_for_batch(image, label, (32, 64), (40, 50))
    assert out["image"].shape == (32, 64, 3) and out["label"].shape == (40, 50)
    assert (out["image"][:20, :30] == 7).all() and not out["image"][20:].any()
    assert (out["label"][:25, :35] == 1).all() and (out["label"][25:] == IGNORE).all()
    assert (out["label"][:, 35:] == IGNORE).all()
    assert out["image_hw"].tolist() == [20, 30] and out["label_hw"].tolist() == [25, 35]
    with pytest.raises(ValueError, match="exceed"):
        T.pad_for_batch(image, label, (16, 64), (40, 50))


def test_pipeline_transforms_are_deterministic_and_pad_to_the_bucket():
    """The transforms the segmentation task hands to the grain pipelines."""
    rng = np.random.default_rng(8)
    records = []
    for _ in range(4):
        image, label = _block_scene(rng, shape=(48, 64))
        records.append({"image": image, "segmentation_mask": label[..., None], "file_name": b"x"})
    train = T.SegTrainTransform(scale_range=(0.75, 1.5))

    def run(seed):
        return [train(r, (32, 32), np.random.default_rng([seed, i])) for i, r in enumerate(records)]

    first, again, other = run(1), run(1), run(2)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert any(not np.array_equal(a["image"], c["image"]) for a, c in zip(first, other))
    assert all(r["image"].shape == (32, 32, 3) and r["label"].dtype == np.int32 for r in first)

    evaluate = T.SegEvalTransform(protocol="ade20k", crop_size=32)
    out = evaluate(records[0], ((32, 64), (48, 64)))
    assert out["image"].shape == (32, 64, 3) and out["label"].shape == (48, 64)
    assert out["image_hw"].tolist() == [32, math.ceil(64 / 48 * 32 / 32) * 32]
