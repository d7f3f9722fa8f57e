"""Per-example segmentation preprocessing: pure numpy functions plus grain wrappers.

Every random function takes an explicit ``numpy.random.Generator``. Images are uint8
(H, W, 3); label maps are integer (H, W) (a trailing channel of 1, as tfds stores masks,
is accepted) with ``IGNORE_INDEX`` = 255 for void. Outputs are ``{"image": uint8 (H, W, 3),
"label": int32 (H, W)}`` (the key ``mask`` is reserved by the pipelines for the
real/padding flag of an example).

Label maps are ONLY ever resized with nearest neighbour, padded with 255 or flipped, so
they never receive interpolated values. Image resizing follows OpenCV / PyTorch
conventions (half-pixel centres, border-clamped taps, no antialiasing): ``"bilinear"``
for training augmentation, ``"bicubic"`` (Keys, a = -0.75) for evaluation, matching the
``cv2.INTER_CUBIC`` resize of the official EfficientViT evaluation.

Evaluation protocols (official ``eval_efficientvit_seg_model.py``):
- Cityscapes: the image is resized to (crop, 2 * crop) (default crop 1024, i.e. native
  1024x2048); the label keeps its full size.
- ADE20K: short side -> 512, long side -> ceil(long / short * 512 / 32) * 32; the label
  keeps its full size.
Logits are then resized to the label size before the argmax (that is the task's job;
`evit_jax.interpolation` holds the resampling kernels, shared with the models and the task).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from evit_jax import interpolation

IGNORE_INDEX = 255


# ----------------------------------------------------------------------------- resizing
def _resize_axis(x: np.ndarray, axis: int, out_size: int, method: str,
                 start: int = 0, stop: int | None = None) -> np.ndarray:
    index, weights = interpolation.taps(x.shape[axis], out_size, method, start, stop)
    if method == "nearest":
        return np.take(x, index[:, 0], axis=axis)
    shape = [1] * x.ndim
    shape[axis] = len(index)
    out = np.zeros(x.shape[:axis] + (len(index),) + x.shape[axis + 1:], dtype=np.float32)
    for k in range(index.shape[1]):
        # Gather (uint8 for the first axis) before converting: only the window's rows.
        out += np.take(x, index[:, k], axis=axis).astype(np.float32) * \
            weights[:, k].astype(np.float32).reshape(shape)
    return out


def _window(size: tuple[int, int], window: tuple[int, int, int, int] | None):
    return (0, 0, size[0], size[1]) if window is None else window


def resize_image(image: np.ndarray, size: tuple[int, int], method: str = "bilinear",
                 window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Resizes a uint8 (H, W, C) image to ``size`` = (h, w) and returns uint8.

    ``window`` = (top, left, height, width) computes only that part of the resized image
    (exactly the same pixels as resizing everything and cropping, without the cost).
    """
    top, left, height, width = _window(size, window)
    if (image.shape[0], image.shape[1]) == tuple(size) and method != "nearest":
        return image[top:top + height, left:left + width].copy()
    x = _resize_axis(image, 0, size[0], method, top, top + height)
    x = _resize_axis(x, 1, size[1], method, left, left + width)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def resize_label(label: np.ndarray, size: tuple[int, int],
                 window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Nearest-neighbour resize of an integer (H, W) label map (values only copied)."""
    top, left, height, width = _window(size, window)
    out = _resize_axis(label, 0, size[0], "nearest", top, top + height)
    return _resize_axis(out, 1, size[1], "nearest", left, left + width)


# ----------------------------------------------------------------------------- augmentation
def _as_label(label: np.ndarray) -> np.ndarray:
    label = np.asarray(label)
    if label.ndim == 3 and label.shape[-1] == 1:
        label = label[..., 0]
    if label.ndim != 2:
        raise ValueError(f"Expected a (H, W) or (H, W, 1) label map, got shape {label.shape}.")
    return label.astype(np.int32)


def _check_pair(image: np.ndarray, label: np.ndarray) -> None:
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"Expected a uint8 (H, W, C) image, got {image.dtype} {image.shape}.")
    if image.shape[:2] != label.shape:
        raise ValueError(f"Image {image.shape[:2]} and label {label.shape} sizes differ.")


def rescaled_size(height: int, width: int, scale: float,
                  base_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """Size of a (height, width) image rescaled by ``scale``, aspect kept.

    ``base_size`` = (long_edge, short_edge) first fits the image into that box (as
    mmsegmentation's ``img_scale``, orientation-free), e.g. (2048, 1024) for Cityscapes,
    (2048, 512) for ADE20K; ``None`` scales the image's own size.
    """
    factor = scale
    if base_size is not None:
        long_edge, short_edge = max(base_size), min(base_size)
        factor *= min(long_edge / max(height, width), short_edge / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def random_scale_crop(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                      crop_size: tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0),
                      base_size: tuple[int, int] | None = None,
                      ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """Joint random rescale (uniform in ``scale_range``) then random ``crop_size`` crop.

    Where the rescaled image is smaller than the crop it is padded at the bottom/right:
    image with 0, label with ``ignore_index``. Image bilinear, label nearest. Only the
    cropped window is computed.
    """
    label = _as_label(label)
    _check_pair(image, label)
    h, w = image.shape[:2]
    scaled = rescaled_size(h, w, float(rng.uniform(*scale_range)), base_size)
    crop_h, crop_w = crop_size
    top = int(rng.integers(0, max(scaled[0] - crop_h, 0) + 1))
    left = int(rng.integers(0, max(scaled[1] - crop_w, 0) + 1))
    window = (top, left, min(crop_h, scaled[0]), min(crop_w, scaled[1]))
    return pad_to_size(resize_image(image, scaled, "bilinear", window),
                       resize_label(label, scaled, window), crop_size, ignore_index)


def _pad_bottom_right(x: np.ndarray, size: tuple[int, int], value: int) -> np.ndarray:
    pad_h, pad_w = max(size[0] - x.shape[0], 0), max(size[1] - x.shape[1], 0)
    if pad_h == 0 and pad_w == 0:
        return x
    widths = ((0, pad_h), (0, pad_w)) + ((0, 0),) * (x.ndim - 2)
    return np.pad(x, widths, constant_values=value)


def pad_to_size(image: np.ndarray, label: np.ndarray, size: tuple[int, int],
                ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """Pads bottom/right to at least ``size``: image with 0, label with ``ignore_index``."""
    return _pad_bottom_right(image, size, 0), _pad_bottom_right(label, size, ignore_index)


def random_hflip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                 prob: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Flips image and label left-right together with probability ``prob``."""
    if rng.uniform() < prob:
        return image[:, ::-1].copy(), label[:, ::-1].copy()
    return image, label


# RGB <-> YIQ: a hue shift is a rotation of the chroma plane (I, Q).
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                        [0.595716, -0.274453, -0.321263],
                        [0.211456, -0.522591, 0.311135]], dtype=np.float64)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class PhotometricJitter:
    """Each distortion is applied with probability ``prob`` (mmseg-style ranges)."""

    brightness_delta: float = 32.0                 # added to all pixels, +-delta
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: float = 18.0                        # degrees of hue rotation, +-delta
    prob: float = 0.5


def photometric_jitter(image: np.ndarray, rng: np.random.Generator,
                       config: PhotometricJitter = PhotometricJitter()) -> np.ndarray:
    """Random brightness, contrast, saturation and hue of a uint8 RGB image (labels untouched)."""
    x = image.astype(np.float32)
    if rng.uniform() < config.prob:
        x = x + np.float32(rng.uniform(-config.brightness_delta, config.brightness_delta))
    if rng.uniform() < config.prob:
        factor = np.float32(rng.uniform(*config.contrast_range))
        mean = np.float32((np.clip(x, 0, 255) @ _GREY).mean())
        x = mean + factor * (x - mean)
    if rng.uniform() < config.prob:
        factor = np.float32(rng.uniform(*config.saturation_range))
        grey = (np.clip(x, 0, 255) @ _GREY)[..., None]
        x = grey + factor * (x - grey)
    if rng.uniform() < config.prob:
        angle = math.radians(rng.uniform(-config.hue_delta, config.hue_delta))
        c, s = math.cos(angle), math.sin(angle)
        rotation = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
        x = x @ (_YIQ_TO_RGB @ rotation @ _RGB_TO_YIQ).T.astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def train_transform(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, *,
                    crop_size: tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0),
                    base_size: tuple[int, int] | None = None, flip_prob: float = 0.5,
                    jitter: PhotometricJitter | None = PhotometricJitter(),
                    ignore_index: int = IGNORE_INDEX) -> dict[str, np.ndarray]:
    """Scale, crop (with padding), flip and photometric jitter: {"image", "label"}."""
    image, label = random_scale_crop(image, label, rng, crop_size, scale_range, base_size,
                                     ignore_index)
    image, label = random_hflip(image, label, rng, flip_prob)
    if jitter is not None:
        image = photometric_jitter(image, rng, jitter)
    return {"image": image, "label": label.astype(np.int32)}


# ----------------------------------------------------------------------------- evaluation
def cityscapes_eval_size(crop_size: int = 1024) -> tuple[int, int]:
    """Official Cityscapes eval input size: (crop, 2 * crop)."""
    return crop_size, 2 * crop_size


def ade20k_eval_size(height: int, width: int, short_side: int = 512) -> tuple[int, int]:
    """Official ADE20K eval input size: short side = ``short_side``, long side rounded UP to
    a multiple of 32 (``ceil(long / short * short_side / 32) * 32``)."""
    if height < width:
        return short_side, math.ceil(width / height * short_side / 32) * 32
    return math.ceil(height / width * short_side / 32) * 32, short_side


def eval_input_size(protocol: str, height: int, width: int, crop_size: int) -> tuple[int, int]:
    """Model input size of a (height, width) image under ``protocol``:
    "cityscapes" (crop x 2crop), "ade20k" (short side = crop_size) or "none" (unchanged)."""
    if protocol == "cityscapes":
        return cityscapes_eval_size(crop_size)
    if protocol == "ade20k":
        return ade20k_eval_size(height, width, crop_size)
    if protocol == "none":
        return height, width
    raise ValueError(f"Unknown eval protocol {protocol!r}; use cityscapes, ade20k or none.")


def eval_transform(image: np.ndarray, label: np.ndarray, protocol: str,
                   crop_size: int) -> dict[str, np.ndarray]:
    """Official single-scale eval preprocessing: the image is resized (bicubic) to
    :func:`eval_input_size`; the label is returned untouched (int32, full size)."""
    label = _as_label(label)
    _check_pair(image, label)
    size = eval_input_size(protocol, image.shape[0], image.shape[1], crop_size)
    return {"image": resize_image(image, size, "bicubic"), "label": label}


def pad_for_batch(image: np.ndarray, label: np.ndarray, image_shape: tuple[int, int],
                  label_shape: tuple[int, int], ignore_index: int = IGNORE_INDEX) -> dict[str, np.ndarray]:
    """Pads one eval example to the batch's fixed shapes.

    Returns image (padded with 0), label (padded with ``ignore_index``, so padding never
    counts in the metrics) and the valid sizes ``image_hw`` and ``label_hw`` (int32 (2,)).
    With ``evit_jax.interpolation.interpolation_matrix`` (``padded_in``/``padded_out``) the task resizes
    the valid logits to the valid label exactly inside a static-shape jit. Note that the
    model itself sees the padding (global attention, border convolutions): outputs equal
    the official batch-1 protocol only for examples that need no image padding, so group
    eval examples by input size (or pad to sizes that are already equal) to be exact.
    """
    label = _as_label(label)
    if image.shape[0] > image_shape[0] or image.shape[1] > image_shape[1] or \
            label.shape[0] > label_shape[0] or label.shape[1] > label_shape[1]:
        raise ValueError(f"Example image {image.shape[:2]} / label {label.shape} exceed the batch "
                         f"shapes {tuple(image_shape)} / {tuple(label_shape)}.")
    return {"image": _pad_bottom_right(image, image_shape, 0),
            "label": _pad_bottom_right(label, label_shape, ignore_index),
            "image_hw": np.array(image.shape[:2], np.int32),
            "label_hw": np.array(label.shape, np.int32)}


# ----------------------------------------------------------------------------- pipeline transforms
@dataclasses.dataclass(frozen=True)
class SegTrainTransform:
    """The train transform of `evit_jax.data.pipeline.make_train_iterator`:
    ``(record, (h, w) crop, rng) -> {"image", "label"}`` (:func:`train_transform`; picklable)."""

    scale_range: tuple[float, float] = (0.5, 2.0)
    base_size: tuple[int, int] | None = None
    flip_prob: float = 0.5
    jitter: PhotometricJitter | None = PhotometricJitter()
    image_key: str = "image"
    label_key: str = "segmentation_mask"
    ignore_index: int = IGNORE_INDEX

    def __call__(self, record: Mapping[str, Any], size: tuple[int, int], rng: np.random.Generator):
        return train_transform(np.asarray(record[self.image_key]), _as_label(record[self.label_key]), rng,
                               crop_size=tuple(size), scale_range=self.scale_range, base_size=self.base_size,
                               flip_prob=self.flip_prob, jitter=self.jitter, ignore_index=self.ignore_index)


@dataclasses.dataclass(frozen=True)
class SegEvalTransform:
    """The eval transform of `evit_jax.data.pipeline.make_bucketed_eval_iterator`:
    ``(record, (image shape, label shape) of the bucket) -> {"image", "label", "image_hw",
    "label_hw"}`` (:func:`eval_transform`, then :func:`pad_for_batch` to the bucket's shapes)."""

    protocol: str = "none"
    crop_size: int = 512
    image_key: str = "image"
    label_key: str = "segmentation_mask"
    ignore_index: int = IGNORE_INDEX

    def __call__(self, record: Mapping[str, Any], shapes: tuple[tuple[int, int], tuple[int, int]]):
        image_shape, label_shape = shapes
        out = eval_transform(np.asarray(record[self.image_key]), record[self.label_key], self.protocol,
                             self.crop_size)
        return pad_for_batch(out["image"], out["label"], image_shape, label_shape, self.ignore_index)
