"""Per-example detection transforms (host side, numpy + PIL): YOLOX's augmentation and the
letterbox of its evaluation.

Boxes are float (N, 4) ``x1, y1, x2, y2`` in the continuous pixel coordinates of their image
(pixel (row i, column j) covers [j, j + 1) x [i, i + 1)). Every geometric step maps the image
and its boxes with the same continuous map, so boxes follow the image exactly: resizes use
half-pixel centres (``seg_transforms.resize_image``, OpenCV's INTER_LINEAR within one grey
level), affine warps use PIL, whose affine sampling has the same half-pixel convention.

What follows YOLOX (Megvii-BaseDetection/YOLOX, ``yolox/data/data_augment.py`` and
``yolox/data/datasets/mosaicdetection.py``), with numpy Generators instead of global RNGs:

- :func:`letterbox`: resize keeping the aspect ratio so that the image fits (long side = the
    size), bilinear, pad bottom/right with 114 (``preproc``, also the evaluation input).
- :func:`hsv_jitter`: ``augment_hsv`` (gains 0.015 / 0.7 / 0.4 on OpenCV's 8-bit HSV), with
    OpenCV's uint8 RGB<->HSV conversions reproduced in numpy (bit-exact; see :func:`hsv_to_rgb`).
- :func:`mosaic`: four images, each fitted into the output size, around a random centre of a
    2x canvas filled with 114, then :func:`random_affine` (rotation, scale, shear,
    translation; ``random_perspective``) back to the output size.
- :func:`mixup`: YOLOX's: another image, letterboxed, rescaled by a random factor, maybe
    flipped, randomly cropped to the output, averaged 50/50, boxes concatenated.
- :func:`box_candidates`: the filter after geometric steps (w, h > 2 px, area kept > 20 %,
    aspect < 20); finally boxes <= 1 px wide or high are dropped (``TrainTransform``).

Not from YOLOX: the optional scale jitter of the non-mosaic path (``scale_range``), and an
image whose boxes all disappear stays as it is (YOLOX falls back to the un-augmented image).

:class:`DetectionTrainTransform` and :class:`DetectionEvalTransform` are the picklable
callables the pipelines run (``evit_jax.data.pipeline``); their outputs are the batch contract:
train ``{"image": uint8 (H, W, 3), "boxes": float32 (M, 4), "classes": int32 (M,),
"box_mask": int32 (M,)}``, eval ``{"image": uint8 (S, S, 3), "image_id": int64, "scale":
float32 (input pixels per original pixel), "orig_hw": int32 (2,)}``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from evit_jax.data import coco, seg_transforms
from evit_jax.data.transforms import decode_image

PAD_VALUE = 114
HSV_GAINS = (0.015, 0.7, 0.4)

Size = tuple[int, int]


def _hw(size: int | Sequence[int]) -> Size:
    return (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


# ----------------------------------------------------------------------------- boxes
def clip_boxes(boxes: np.ndarray, hw: Size) -> np.ndarray:
    """Boxes clipped to an image of (height, width)."""
    out = np.array(boxes, np.float64).reshape(-1, 4)
    out[:, 0::2] = out[:, 0::2].clip(0, hw[1])
    out[:, 1::2] = out[:, 1::2].clip(0, hw[0])
    return out


def box_candidates(before: np.ndarray, after: np.ndarray, wh_thr: float = 2.0, ar_thr: float = 20.0,
                   area_thr: float = 0.2) -> np.ndarray:
    """YOLOX's filter (bool (N,)): after width and height > wh_thr, area after / area before >
    area_thr, aspect ratio < ar_thr. ``before`` is the box mapped without clipping."""
    w1, h1 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w2, h2 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    aspect = np.maximum(w2 / (h2 + 1e-16), h2 / (w2 + 1e-16))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + 1e-16) > area_thr) & (aspect < ar_thr)


def hflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirrors an image and its boxes left-right."""
    width = image.shape[1]
    flipped = np.array(boxes, np.float64).reshape(-1, 4)[:, [2, 1, 0, 3]]
    flipped[:, [0, 2]] = width - flipped[:, [0, 2]]
    return np.ascontiguousarray(image[:, ::-1]), flipped


def pad_boxes(boxes: np.ndarray, labels: np.ndarray, max_boxes: int) -> dict[str, np.ndarray]:
    """The fixed-size box arrays of the batch contract; boxes beyond ``max_boxes`` are dropped
    (the first ones are kept, as YOLOX's ``max_labels``)."""
    n = min(len(labels), max_boxes)
    out_boxes = np.zeros((max_boxes, 4), np.float32)
    out_classes = np.zeros((max_boxes,), np.int32)
    out_boxes[:n] = boxes[:n]
    out_classes[:n] = labels[:n]
    return {"boxes": out_boxes, "classes": out_classes, "box_mask": (np.arange(max_boxes) < n).astype(np.int32)}


def training_objects(example: Mapping[str, Any], label_key: str = coco.LABEL_KEY,
                     hw: Size | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(boxes float64 (N, 4), labels int64 (N,)) to train on: crowds dropped, boxes clipped to
    the image (``hw``) and empty ones dropped (YOLOX's COCO loader)."""
    objects = example[label_key]
    boxes = np.asarray(objects["bbox"], np.float64).reshape(-1, 4)
    labels = np.asarray(objects["label"], np.int64).reshape(-1)
    keep = ~np.asarray(objects["is_crowd"], bool).reshape(-1)
    if hw is not None:
        boxes = clip_boxes(boxes, hw)
    keep &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], labels[keep]


# ----------------------------------------------------------------------------- resizing
def letterbox_ratio(height: int, width: int, size: Size) -> float:
    """YOLOX's ``r``: the largest scale at which a (height, width) image fits into ``size``."""
    return min(size[0] / height, size[1] / width)


def letterbox(image: np.ndarray, size: int | Size, pad_value: int = PAD_VALUE) -> tuple[np.ndarray, float]:
    """YOLOX's ``preproc``: resize (bilinear) to (int(h * r), int(w * r)) with
    r = :func:`letterbox_ratio`, pad bottom/right with ``pad_value``. Returns (image, r)."""
    out_hw = _hw(size)
    height, width = image.shape[:2]
    r = letterbox_ratio(height, width, out_hw)
    new_h, new_w = max(1, int(height * r)), max(1, int(width * r))
    canvas = np.full(out_hw + (3,), pad_value, np.uint8)
    canvas[:new_h, :new_w] = seg_transforms.resize_image(image, (new_h, new_w), "bilinear")
    return canvas, r


def unletterbox_boxes(boxes: np.ndarray, scale: Any, orig_hw: Any) -> np.ndarray:
    """Boxes (N, 4) in letterboxed input pixels -> original-image pixels: divided by ``scale``
    (a scalar or (N,)) and clipped to ``orig_hw`` ((2,) or (N, 2) height, width)."""
    out = np.asarray(boxes, np.float64).reshape(-1, 4) / np.asarray(scale, np.float64).reshape(-1, 1)
    hw = np.broadcast_to(np.asarray(orig_hw, np.float64).reshape(-1, 2), (len(out), 2))
    out[:, 0::2] = np.clip(out[:, 0::2], 0, hw[:, 1:2])
    out[:, 1::2] = np.clip(out[:, 1::2], 0, hw[:, 0:1])
    return out


def _scaled_size(height: int, width: int, scale: float) -> Size:
    return max(1, int(height * scale)), max(1, int(width * scale))


def _paste(canvas: np.ndarray, image: np.ndarray, boxes: np.ndarray, new_hw: Size,
           offset: tuple[int, int]) -> np.ndarray:
    """Resizes ``image`` to ``new_hw`` (bilinear) and writes it into ``canvas`` with its
    top-left corner at ``offset`` = (y, x) (negative or beyond the canvas: cut; only the
    visible window is computed). Returns the boxes moved with it (not clipped)."""
    height, width = image.shape[:2]
    dy, dx = offset
    top, left = max(0, -dy), max(0, -dx)
    bottom, right = min(new_hw[0], canvas.shape[0] - dy), min(new_hw[1], canvas.shape[1] - dx)
    if bottom > top and right > left:
        canvas[top + dy:bottom + dy, left + dx:right + dx] = seg_transforms.resize_image(
            image, new_hw, "bilinear", window=(top, left, bottom - top, right - left))
    moved = np.array(boxes, np.float64).reshape(-1, 4) * ([new_hw[1] / width, new_hw[0] / height] * 2)
    return moved + [dx, dy, dx, dy]


def random_rescale(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, out_hw: Size,
                   rng: np.random.Generator, scale_range: tuple[float, float] = (1.0, 1.0),
                   pad_value: int = PAD_VALUE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The non-mosaic geometry: fit the image into ``out_hw`` (the letterbox scale) times a
    factor uniform in ``scale_range``; a smaller image sits at a random place of the canvas
    (padded with ``pad_value``), a larger one is randomly cropped. With the default (1, 1)
    this is YOLOX's letterbox (top-left). Boxes cut below 20 % of their area are dropped."""
    height, width = image.shape[:2]
    fit = letterbox_ratio(height, width, out_hw)
    if tuple(scale_range) == (1.0, 1.0):
        new_hw, offset = _scaled_size(height, width, fit), (0, 0)
    else:
        new_hw = _scaled_size(height, width, fit * float(rng.uniform(*scale_range)))
        offset = tuple(int(rng.integers(min(0, o - n), max(0, o - n) + 1)) for o, n in zip(out_hw, new_hw))
    canvas = np.full(out_hw + (3,), pad_value, np.uint8)
    moved = _paste(canvas, image, boxes, new_hw, offset)
    clipped = clip_boxes(moved, out_hw)
    keep = _area(clipped) > 0.2 * _area(moved)   # crops may cut boxes
    return canvas, clipped[keep], np.asarray(labels)[keep]


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


# ----------------------------------------------------------------------------- colour
_SDIV = np.array([0] + [round((255 << 12) / v) for v in range(1, 256)], np.int32)
_HDIV = np.array([0] + [round((180 << 12) / (6.0 * d)) for d in range(1, 256)], np.int32)


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> uint8 HSV exactly as OpenCV's ``COLOR_RGB2HSV`` (H in [0, 180), fixed point)."""
    r, g, b = (image[..., k].astype(np.int32) for k in range(3))
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    s = (diff * _SDIV[v] + (1 << 11)) >> 12
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + (1 << 11)) >> 12
    h += np.where(h < 0, 180, 0)
    out = np.empty(image.shape, np.uint8)
    out[..., 0], out[..., 1], out[..., 2] = h, s, v
    return out


def _hsv_to_rgb_factors() -> np.ndarray:
    """(3, 256 s, 256 h) float32: the factor of v/255 that OpenCV's HSV -> RGB gives each of R, G, B.

    OpenCV computes, in float32, h' = h * (6/180), sector = floor(h'), f = h' - sector, and from
    v, p = v (1 - s), q = v (1 - s f), t = v (1 - s (1 - f)) (s and v divided by 255; the inner
    ``1 - s x`` a fused multiply-add, rounded once) picks per sector which is R, G, B. These
    factors depend on (s, h) only, so they are tabulated once.
    """
    f32 = np.float32
    hue = np.arange(256, dtype=f32) * f32(6.0 / 180.0)
    floor = np.floor(hue)
    frac, sector = hue - floor, floor.astype(np.int64) % 6
    sat = np.arange(256, dtype=f32) * f32(1.0 / 255.0)

    def one_minus(x, y):  # 1 - x * y with a single rounding (float64 holds the exact product)
        return (1.0 - x.astype(np.float64) * y.astype(np.float64)).astype(f32)

    choices = np.stack([np.ones((256, 256), f32), np.broadcast_to((f32(1) - sat)[:, None], (256, 256)),
                        one_minus(sat[:, None], frac[None, :]), one_minus(sat[:, None], f32(1) - frac[None, :])])
    # Which of (v, p, q, t) is R, G, B in each sector (OpenCV's sector table, in RGB order).
    order = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])
    return np.stack([choices[order[sector, c], :, np.arange(256)].T for c in range(3)])


_HSV_FACTORS = _hsv_to_rgb_factors()


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """uint8 HSV (H in [0, 180)) -> uint8 RGB exactly as OpenCV's vectorised ``COLOR_HSV2RGB``
    (float32 math with fused multiply-adds, truncated to uint8). OpenCV runs that path on all
    but the last (width mod 32) pixels of each row (on AVX2 machines); its scalar loop for those
    rounds instead, so there the two can differ by one level."""
    h, s = hsv[..., 0], hsv[..., 1]
    v = hsv[..., 2].astype(np.float32) * np.float32(1.0 / 255.0)
    out = np.empty(hsv.shape, np.uint8)
    for c in range(3):
        out[..., c] = (v * _HSV_FACTORS[c][s, h]) * np.float32(255.0)   # truncates, as OpenCV's SIMD path
    return out


def apply_hsv_gains(image: np.ndarray, gains: Sequence[float]) -> np.ndarray:
    """YOLOX's ``augment_hsv`` for given multiplicative gains (hue, saturation, value): look-up
    tables on OpenCV's 8-bit HSV (hue wraps at 180, saturation and value clip at 255)."""
    x = np.arange(256, dtype=np.int16)
    lut_hue = ((x * gains[0]) % 180).astype(np.uint8)
    lut_sat = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_val = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    hsv = rgb_to_hsv(image)
    out = np.stack([lut_hue[hsv[..., 0]], lut_sat[hsv[..., 1]], lut_val[hsv[..., 2]]], axis=-1)
    return hsv_to_rgb(out)


def hsv_jitter(image: np.ndarray, rng: np.random.Generator,
               gains: Sequence[float] = HSV_GAINS) -> np.ndarray:
    """YOLOX's random HSV augmentation: gains 1 + uniform(-1, 1) * (hgain, sgain, vgain)."""
    return apply_hsv_gains(image, rng.uniform(-1, 1, 3) * np.asarray(gains) + 1)


# ----------------------------------------------------------------------------- affine
def affine_matrix(rng: np.random.Generator, in_hw: Size, out_hw: Size, degrees: float = 10.0,
                  translate: float = 0.1, scale: tuple[float, float] = (0.1, 2.0),
                  shear: float = 2.0) -> tuple[np.ndarray, float]:
    """YOLOX's ``random_perspective`` matrix (3x3, continuous input -> output coordinates) and
    its scale: centre the input at the origin, rotate by uniform(+-degrees) and scale by
    uniform(scale), shear by uniform(+-shear) degrees on each axis, then move the origin to
    uniform(0.5 +- translate) of the output size."""
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -in_hw[1] / 2, -in_hw[0] / 2
    angle = math.radians(rng.uniform(-degrees, degrees))
    s = float(rng.uniform(scale[0], scale[1]))
    rotation = np.eye(3)
    # cv2.getRotationMatrix2D(angle, (0, 0), s): counter-clockwise on the screen (y down).
    rotation[:2, :2] = s * np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    shearing = np.eye(3)
    shearing[0, 1] = math.tan(math.radians(rng.uniform(-shear, shear)))
    shearing[1, 0] = math.tan(math.radians(rng.uniform(-shear, shear)))
    move = np.eye(3)
    move[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_hw[1]
    move[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_hw[0]
    return move @ shearing @ rotation @ centre, s


def warp_affine(image: np.ndarray, matrix: np.ndarray, out_hw: Size, fill: int = PAD_VALUE) -> np.ndarray:
    """The image under the continuous map ``matrix`` (3x3, input -> output), bilinear, no
    antialiasing (as cv2.warpAffine), ``fill`` outside."""
    inverse = np.linalg.inv(matrix)
    data = tuple(float(v) for v in inverse[:2].reshape(-1))
    warped = Image.fromarray(image).transform((out_hw[1], out_hw[0]), Image.AFFINE, data,
                                              resample=Image.BILINEAR, fillcolor=(fill,) * 3)
    return np.asarray(warped)


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The axis-aligned boxes of the 4 mapped corners of each box (not clipped)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    corners = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(-1, 2)          # x1y1, x2y2, x1y2, x2y1
    mapped = (np.c_[corners, np.ones(len(corners))] @ matrix.T)[:, :2].reshape(-1, 4, 2)
    return np.concatenate([mapped.min(axis=1), mapped.max(axis=1)], axis=1)


def random_affine(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, out_hw: Size,
                  rng: np.random.Generator, degrees: float = 10.0, translate: float = 0.1,
                  scale: tuple[float, float] = (0.1, 2.0), shear: float = 2.0,
                  fill: int = PAD_VALUE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """YOLOX's ``random_perspective`` (affine): warps the image into ``out_hw``; boxes are
    mapped, clipped and filtered by :func:`box_candidates` against the scaled originals."""
    matrix, s = affine_matrix(rng, image.shape[:2], out_hw, degrees, translate, scale, shear)
    warped = warp_affine(image, matrix, out_hw, fill)
    mapped = clip_boxes(transform_boxes(boxes, matrix), out_hw)
    keep = box_candidates(np.asarray(boxes, np.float64).reshape(-1, 4) * s, mapped)
    return warped, mapped[keep], labels[keep]


# ----------------------------------------------------------------------------- mosaic, mixup
Item = tuple[np.ndarray, np.ndarray, np.ndarray]   # (image, boxes, labels)


def mosaic(items: Sequence[Item], out_hw: Size, rng: np.random.Generator, degrees: float = 10.0,
           translate: float = 0.1, scale: tuple[float, float] = (0.1, 2.0), shear: float = 2.0,
           fill: int = PAD_VALUE) -> Item:
    """YOLOX's mosaic of 4 (image, boxes, labels): each image fitted into ``out_hw``, placed as
    top-left / top-right / bottom-left / bottom-right of a random centre in the middle half of
    a (2h, 2w) canvas filled with ``fill``; boxes clipped to the canvas; then
    :func:`random_affine` to ``out_hw``."""
    if len(items) != 4:
        raise ValueError(f"mosaic takes 4 images, got {len(items)}.")
    out_h, out_w = out_hw
    yc = int(rng.uniform(0.5 * out_h, 1.5 * out_h))
    xc = int(rng.uniform(0.5 * out_w, 1.5 * out_w))
    canvas = np.full((2 * out_h, 2 * out_w, 3), fill, np.uint8)
    all_boxes, all_labels = [], []
    for position, (image, boxes, labels) in enumerate(items):
        h, w = _scaled_size(*image.shape[:2], letterbox_ratio(*image.shape[:2], out_hw))
        # Top-left corner of the tile on the canvas (the part outside the canvas is cut).
        y = yc - h if position in (0, 1) else yc
        x = xc - w if position in (0, 2) else xc
        all_boxes.append(clip_boxes(_paste(canvas, image, boxes, (h, w), (y, x)), canvas.shape[:2]))
        all_labels.append(np.asarray(labels, np.int64).reshape(-1))
    return random_affine(canvas, np.concatenate(all_boxes), np.concatenate(all_labels), out_hw, rng,
                         degrees, translate, scale, shear, fill)


def mixup(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, other: Item,
          rng: np.random.Generator, scale: tuple[float, float] = (0.5, 1.5),
          fill: int = PAD_VALUE) -> Item:
    """YOLOX's mixup: ``other`` letterboxed to this image's size, rescaled by uniform(scale),
    flipped with probability 0.5, randomly cropped (zero padded) to this image's size; its
    boxes that survive (:func:`box_candidates`, 5 px) are added and the two images averaged.
    Nothing changes when none survive."""
    jitter = float(rng.uniform(*scale))
    flip = rng.uniform() > 0.5
    target_h, target_w = image.shape[:2]
    other_image, other_boxes, other_labels = other
    # The letterboxed other image, resized by the jitter: one paste onto a fill canvas.
    new_h, new_w = _scaled_size(target_h, target_w, jitter)
    resized = np.full((new_h, new_w, 3), fill, np.uint8)
    fit_hw = _scaled_size(*other_image.shape[:2], letterbox_ratio(*other_image.shape[:2], (target_h, target_w)))
    tile_hw = (max(1, round(fit_hw[0] * new_h / target_h)), max(1, round(fit_hw[1] * new_w / target_w)))
    moved = clip_boxes(_paste(resized, other_image, other_boxes, tile_hw, (0, 0)), (new_h, new_w))
    if flip:
        resized, moved = hflip(resized, moved)
    padded = np.zeros((max(new_h, target_h), max(new_w, target_w), 3), np.uint8)
    padded[:new_h, :new_w] = resized
    y_off = int(rng.integers(0, padded.shape[0] - target_h)) if padded.shape[0] > target_h else 0
    x_off = int(rng.integers(0, padded.shape[1] - target_w)) if padded.shape[1] > target_w else 0
    cropped = padded[y_off:y_off + target_h, x_off:x_off + target_w]
    shifted = clip_boxes(moved - [x_off, y_off, x_off, y_off], (target_h, target_w))
    keep = box_candidates(moved, shifted, wh_thr=5.0)
    if not keep.any():
        return image, boxes, labels
    blended = (0.5 * image.astype(np.float32) + 0.5 * cropped.astype(np.float32)).astype(np.uint8)
    return (blended, np.concatenate([np.asarray(boxes, np.float64).reshape(-1, 4), shifted[keep]]),
            np.concatenate([np.asarray(labels, np.int64).reshape(-1), np.asarray(other_labels)[keep]]))


# ----------------------------------------------------------------------------- grain callables
@dataclasses.dataclass(frozen=True)
class DetectionTrainTransform:
    """YOLOX's training augmentation as the train pipeline's ``transform(example, (h, w), rng)``.

    Per example: with ``mosaic_prob`` a :func:`mosaic` of this example and 3 others of
    ``source`` (their indices drawn from ``rng``: deterministic per (seed, stream position),
    the same for any worker count), then with ``mixup_prob`` a :func:`mixup` with one more;
    otherwise :func:`random_rescale` (YOLOX's letterbox; ``scale_range`` adds scale jitter).
    Then :func:`hsv_jitter` (``hsv_prob``), a horizontal flip (``flip_prob``), and the boxes
    <= ``min_box_size`` px wide or high are dropped. Crowd boxes are never trained on.

    YOLOX's COCO recipe: ``mosaic_prob=1, mixup_prob=1`` (the defaults below are YOLOX's
    affine ranges), and both 0 for the last epochs (:meth:`without_mosaic`); its small
    models (nano/tiny) use ``mosaic_scale=(0.5, 1.5)`` and no mixup. ``source`` (e.g.
    ``sources.get_source(...)``) is needed when mosaic or mixup is on.
    """

    max_boxes: int
    source: Sequence[Mapping[str, Any]] | None = None
    mosaic_prob: float = 0.0
    mixup_prob: float = 0.0
    hsv_prob: float = 1.0
    flip_prob: float = 0.5
    degrees: float = 10.0
    translate: float = 0.1
    mosaic_scale: tuple[float, float] = (0.1, 2.0)
    mixup_scale: tuple[float, float] = (0.5, 1.5)
    shear: float = 2.0
    scale_range: tuple[float, float] = (1.0, 1.0)
    min_box_size: float = 1.0
    image_key: str = coco.IMAGE_KEY
    label_key: str = coco.LABEL_KEY

    def __post_init__(self):
        if self.max_boxes <= 0:
            raise ValueError(f"max_boxes must be positive, got {self.max_boxes}.")
        for name in ("mosaic_prob", "mixup_prob", "hsv_prob", "flip_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if (self.mosaic_prob > 0 or self.mixup_prob > 0) and (self.source is None or len(self.source) == 0):
            raise ValueError("mosaic and mixup draw other examples: pass the training source as source=.")
        for name in ("mosaic_scale", "mixup_scale", "scale_range"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < min <= max, got {(lo, hi)}.")

    def without_mosaic(self) -> "DetectionTrainTransform":
        """The same transform with mosaic and mixup off (YOLOX's last no-augmentation epochs)."""
        return dataclasses.replace(self, mosaic_prob=0.0, mixup_prob=0.0)

    def _load(self, example: Mapping[str, Any]) -> Item:
        image = decode_image(example[self.image_key])
        boxes, labels = training_objects(example, self.label_key, image.shape[:2])
        return image, boxes, labels

    def _draw(self, rng: np.random.Generator) -> Item:
        return self._load(self.source[int(rng.integers(len(self.source)))])

    def __call__(self, example: Mapping[str, Any], size: Size, rng: np.random.Generator) -> dict[str, np.ndarray]:
        out_hw = _hw(size)
        image, boxes, labels = self._load(example)
        use_mosaic = self.mosaic_prob > 0 and rng.uniform() < self.mosaic_prob
        flip = self.flip_prob > 0 and rng.uniform() < self.flip_prob
        if use_mosaic:
            items = [(image, boxes, labels)] + [self._draw(rng) for _ in range(3)]
            image, boxes, labels = mosaic(items, out_hw, rng, self.degrees, self.translate,
                                          self.mosaic_scale, self.shear)
            if self.mixup_prob > 0 and len(labels) and rng.uniform() < self.mixup_prob:
                image, boxes, labels = mixup(image, boxes, labels, self._draw_with_boxes(rng), rng,
                                             self.mixup_scale)
            if flip:
                image, boxes = hflip(image, boxes)
        else:
            if flip:  # Before the letterbox, so that the padding stays bottom/right (as YOLOX).
                image, boxes = hflip(image, boxes)
            image, boxes, labels = random_rescale(image, boxes, labels, out_hw, rng, self.scale_range)
        if self.hsv_prob > 0 and rng.uniform() < self.hsv_prob:
            image = hsv_jitter(image, rng)
        keep = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) > self.min_box_size
        return {"image": image, **pad_boxes(boxes[keep], labels[keep], self.max_boxes)}

    def _draw_with_boxes(self, rng: np.random.Generator, tries: int = 10) -> Item:
        """Another example with at least one box (YOLOX redraws until it finds one)."""
        item = self._draw(rng)
        for _ in range(tries - 1):
            if len(item[2]):
                break
            item = self._draw(rng)
        return item


@dataclasses.dataclass(frozen=True)
class DetectionEvalTransform:
    """YOLOX's evaluation input as the eval pipeline's ``transform(example)``: the
    :func:`letterbox` to ``size`` plus what maps detections back (``scale``, ``orig_hw``)."""

    size: int
    pad_value: int = PAD_VALUE
    image_key: str = coco.IMAGE_KEY

    def __call__(self, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
        image = decode_image(example[self.image_key])
        padded, r = letterbox(image, self.size, self.pad_value)
        return {"image": padded, "image_id": np.int64(example["image_id"]), "scale": np.float32(r),
                "orig_hw": np.array(image.shape[:2], np.int32)}
