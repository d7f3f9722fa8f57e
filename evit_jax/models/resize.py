"""PyTorch-equivalent bicubic resizing.

`torch.nn.functional.interpolate(x, size, mode="bicubic", align_corners=False)` uses Keys' cubic
convolution with a = -0.75, half-pixel centres, taps clamped to the border and no antialiasing
(`evit_jax.interpolation`; `jax.image.resize(..., "cubic")` is a different function). The resize is
separable: one (out, in) interpolation matrix per spatial axis, applied as two small matmuls in
float32 - exact, backend independent and fast on every device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from evit_jax import interpolation


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 matrix M with resized = M @ signal (torch bicubic, align_corners=False)."""
    return interpolation.interpolation_matrix(in_size, out_size, "bicubic")


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
