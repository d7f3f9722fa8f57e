"""PyTorch-equivalent bicubic resizing.

`torch.nn.functional.interpolate(x, size, mode="bicubic", align_corners=False)` uses Keys' cubic
convolution with a = -0.75, half-pixel centres, taps clamped to the border and no antialiasing.
`jax.image.resize(..., "cubic")` uses a = -0.5 and antialiases when downsampling, so it is a different
function. Here the resize is separable: one (out, in) interpolation matrix per spatial axis, applied as two
small matmuls in float32 - exact, backend independent and fast on every device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

CUBIC_A = -0.75


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 for fractional positions t."""
    a = CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, scale: float | None = None) -> np.ndarray:
    """(out_size, in_size) float32 matrix M with resized = M @ signal (torch bicubic, align_corners=False).

    scale: the source/destination ratio PyTorch uses for the coordinate map; by default in_size/out_size
    (what `F.interpolate(size=...)` uses; for integer `scale_factor=f` it is the same 1/f).
    """
    scale = in_size / out_size if scale is None else scale
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    base = np.floor(src)
    weights = _cubic_weights(src - base)
    taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, in_size - 1)
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    return matrix.astype(np.float32)


def resize_bicubic(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize NHWC `x` to `size` = (height, width) exactly like torch bicubic, align_corners=False.

    Computed in float32 (as the official UpSampleLayer does under autocast) and returned in float32.
    """
    out_h, out_w = size
    in_h, in_w = x.shape[1], x.shape[2]
    if (in_h, in_w) == (out_h, out_w):
        return x.astype(jnp.float32)
    mh = jnp.asarray(bicubic_matrix(in_h, out_h))
    mw = jnp.asarray(bicubic_matrix(in_w, out_w))
    x = x.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=hi)
    return jnp.einsum("pw,bowc->bopc", mw, x, precision=hi)
