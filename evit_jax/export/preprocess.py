"""The eval input pipeline as array ops, for serving graphs that take decoded uint8 images.

Classification follows evit_jax/data/transforms.py `resize_center_crop` (PIL bicubic resize of the short
side to ceil(size / crop_ratio), then a centre crop), segmentation follows the official evaluation
(PyTorch-equivalent bicubic resize to the model input, evit_jax/models/resize.py). Every resize is a pair
of static interpolation matrices applied as matmuls, so the graph converts to every format unchanged.

PIL resizes 8-bit images in two passes (width, then height), rounding and clipping to uint8 after each;
the graph does the same in float32. PIL's 22-bit fixed-point weights and its round-half-up may still move
a pixel by one level (tested).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from evit_jax.models.resize import resize_bicubic
from evit_jax.tasks.classification import normalize_images

PIL_BICUBIC_A = -0.5  # PIL's bicubic filter (torch's and OpenCV's use -0.75)
PIL_BICUBIC_SUPPORT = 2.0
HIGHEST = jax.lax.Precision.HIGHEST


def _pil_bicubic(x: np.ndarray) -> np.ndarray:
    a, x = PIL_BICUBIC_A, np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((x - 5) * x + 8) * x * a - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def pil_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 matrix of PIL's antialiased bicubic resize along one axis.

    PIL's `Image.resize(..., BICUBIC)` (libImaging/Resample.c): output pixel i is centred at
    (i + 0.5) * scale in the input; when shrinking, the filter is stretched by the scale (antialiasing);
    the taps of each output pixel are normalised to sum to 1.
    """
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = PIL_BICUBIC_SUPPORT * filter_scale
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        weights = _pil_bicubic((np.arange(lo, hi) - center + 0.5) / filter_scale)
        matrix[i, lo:hi] = weights / weights.sum()
    return matrix.astype(np.float32)


def short_side_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """torchvision `Resize(int)`: the size whose short side is `short_side` (as transforms.resize_short_side)."""
    if height <= width:
        return short_side, int(short_side * width / height)
    return int(short_side * height / width), short_side


def _to_pixels(x: jax.Array) -> jax.Array:
    """Rounded and clipped to the uint8 grid (kept as float32), as an 8-bit resize returns."""
    return jnp.clip(jnp.round(x), 0.0, 255.0)


def classification_inputs(images: jax.Array, size: tuple[int, int], crop_ratio: float) -> jax.Array:
    """uint8 (B, H, W, 3) -> normalised float32 (B, size, size, 3): resize_center_crop, then mean/std.

    The centre crop is folded into the interpolation matrices (only the kept rows are computed).
    """
    height, width = images.shape[1:3]
    crop_h, crop_w = size
    if crop_h != crop_w:
        raise ValueError(f"classification preprocessing crops a square (as the official eval), got {size}")
    new_h, new_w = short_side_size(height, width, int(math.ceil(crop_h / crop_ratio)))
    top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))
    mh = pil_bicubic_matrix(height, new_h)[top:top + crop_h]
    mw = pil_bicubic_matrix(width, new_w)[left:left + crop_w]
    x = images.astype(jnp.float32)
    if new_w != width:  # PIL skips a pass whose size does not change
        x = _to_pixels(jnp.einsum("pw,bhwc->bhpc", jnp.asarray(mw), x, precision=HIGHEST))
    else:
        x = x[:, :, left:left + crop_w]
    if new_h != height:
        x = _to_pixels(jnp.einsum("oh,bhwc->bowc", jnp.asarray(mh), x, precision=HIGHEST))
    else:
        x = x[:, top:top + crop_h]
    return normalize_images(x)


def segmentation_inputs(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """uint8 (B, H, W, 3) -> normalised float32 (B, *size, 3): torch bicubic resize (seg_transforms.resize_image)."""
    resized = resize_bicubic(images.astype(jnp.float32), size)
    return normalize_images(_to_pixels(resized))


def segmentation_labels(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, h, w, C) logits -> int32 (B, *size) class map: torch bicubic resize to `size`, then argmax."""
    return jnp.argmax(resize_bicubic(logits.astype(jnp.float32), size), axis=-1).astype(jnp.int32)
