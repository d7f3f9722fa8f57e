"""Resampling kernels with PyTorch's conventions, in ONE place: the models' bicubic upsampling, the
host-side image resizes of the data pipelines and the evaluation's logit resizes all use them.

Conventions of ``torch.nn.functional.interpolate(..., align_corners=False)`` (and OpenCV's
INTER_LINEAR / INTER_CUBIC): half-pixel centres, taps clamped to the border, no antialiasing;
bicubic is Keys' cubic convolution with a = -0.75 (``jax.image.resize``'s "cubic" uses a = -0.5 and
antialiases when downsampling: a different function). "nearest" is centre-aligned (PyTorch
"nearest-exact"), so label maps stay on top of their pixels.

Pure array math with no framework import: the numpy functions build static matrices; the
weight function also runs on traced jax arrays (``xp=jax.numpy``) where sizes are only known on
the device (evaluation of padded batches).
"""

from __future__ import annotations

from typing import Any

import numpy as np

CUBIC_A = -0.75  # Keys' cubic as in torch bicubic and OpenCV INTER_CUBIC.
METHODS = ("nearest", "bilinear", "bicubic")


def cubic_weights(t: Any, xp: Any = np) -> Any:
    """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional positions ``t`` in [0, 1)
    (stacked on a new last axis). ``xp``: the array module of ``t`` (numpy or jax.numpy)."""
    a = CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return xp.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def taps(in_size: int, out_size: int, method: str, start: int = 0, stop: int | None = None,
         scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights, each (n_out, n_taps), of outputs [start, stop) along one axis.

    ``scale``: the source/destination ratio of the coordinate map (default in_size / out_size, what
    ``F.interpolate(size=...)`` uses; for an integer ``scale_factor=f`` it is the same 1/f).
    """
    stop = out_size if stop is None else stop
    dst = np.arange(start, stop, dtype=np.float64)
    scale = in_size / out_size if scale is None else scale
    if method == "nearest":
        index = np.minimum(np.floor((dst + 0.5) * scale), in_size - 1).astype(np.int64)
        return index[:, None], np.ones((len(dst), 1))
    src = (dst + 0.5) * scale - 0.5
    if method == "bilinear":
        src = np.maximum(src, 0.0)  # torch / OpenCV clamp the source of linear taps at 0.
        base = np.floor(src)
        t = src - base
        index = base[:, None].astype(np.int64) + np.arange(2)
        weights = np.stack([1 - t, t], axis=1)
    elif method == "bicubic":
        base = np.floor(src)
        index = base[:, None].astype(np.int64) + np.arange(-1, 3)
        weights = cubic_weights(src - base)
    else:
        raise ValueError(f"Unknown resize method {method!r}; use one of {', '.join(METHODS)}.")
    return np.clip(index, 0, in_size - 1), weights


def interpolation_matrix(in_size: int, out_size: int, method: str = "bicubic", padded_in: int | None = None,
                         padded_out: int | None = None, scale: float | None = None) -> np.ndarray:
    """(padded_out, padded_in) float32 matrix M with ``resize(x) = M @ x`` along one axis.

    Rows beyond ``out_size`` and columns beyond ``in_size`` are zero, so a batch padded to a common
    shape is resized exactly: ``Mh @ x @ Mw.T`` reads only the valid input and writes zeros outside
    the valid output. Equal to torch ``F.interpolate(..., mode=method, align_corners=False)`` per axis.
    """
    padded_in = in_size if padded_in is None else padded_in
    padded_out = out_size if padded_out is None else padded_out
    if padded_in < in_size or padded_out < out_size:
        raise ValueError(f"Padded sizes ({padded_in}, {padded_out}) must be >= the sizes ({in_size}, {out_size}).")
    index, weights = taps(in_size, out_size, method, scale=scale)
    matrix = np.zeros((padded_out, padded_in), dtype=np.float64)
    rows = np.broadcast_to(np.arange(out_size)[:, None], index.shape)
    np.add.at(matrix, (rows, index), weights)  # Clamped taps accumulate on the border.
    return matrix.astype(np.float32)
