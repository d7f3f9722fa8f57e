"""Low-level array ops shared by the layers: convolutions and activations.

EfficientViT is dominated by depthwise and 1x1 convolutions. XLA's GPU/TPU backends run
`lax.conv_general_dilated` with `feature_group_count` at full speed, but XLA:CPU lowers grouped
convolutions to a slow generic loop (about 50x slower than a shift-and-add formulation; see
docs/performance.md). `conv2d` therefore picks, per backend and per convolution shape, the fastest
formulation that computes the same function. Every formulation is checked against `lax.conv` in
tests/test_ops.py.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

# `conv_impl` values: "auto" picks per backend; the others force one formulation everywhere.
CONV_IMPLS = ("auto", "lax", "fast")


def _pad_hw(x: jax.Array, pad: int) -> jax.Array:
    if pad == 0:
        return x
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def _out_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def lax_conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int) -> jax.Array:
    """Reference NHWC convolution with symmetric padding (PyTorch semantics)."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


def depthwise_conv2d_shift_add(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Depthwise convolution as a sum of k*k shifted, channel-scaled copies of the input.

    kernel: (kh, kw, 1, C). Fast on CPU because every tap is a fused elementwise multiply-add.
    """
    kh, kw, _, channels = kernel.shape
    h_out = _out_size(x.shape[1], kh, stride, padding)
    w_out = _out_size(x.shape[2], kw, stride, padding)
    xp = _pad_hw(x, padding)
    taps = kernel.reshape(kh, kw, channels)
    out = None
    for i in range(kh):
        for j in range(kw):
            window = lax.slice(
                xp,
                (0, i, j, 0),
                (xp.shape[0], i + (h_out - 1) * stride + 1, j + (w_out - 1) * stride + 1, channels),
                (1, stride, stride, 1),
            )
            term = window * taps[i, j]
            out = term if out is None else out + term
    return out


def pointwise_conv2d_matmul(x: jax.Array, kernel: jax.Array, groups: int) -> jax.Array:
    """1x1 convolution (stride 1, possibly grouped) as a matmul over channels."""
    c_in_per_group, c_out = kernel.shape[2], kernel.shape[3]
    w = kernel.reshape(c_in_per_group, c_out)
    if groups == 1:
        return jnp.einsum("bhwc,cd->bhwd", x, w)
    c_out_per_group = c_out // groups
    xg = x.reshape(*x.shape[:3], groups, c_in_per_group)
    # PyTorch orders grouped output channels group-major: out channel o belongs to group o // (O/G).
    wg = w.reshape(c_in_per_group, groups, c_out_per_group).transpose(1, 0, 2)
    y = jnp.einsum("bhwgc,gcd->bhwgd", xg, wg)
    return y.reshape(*x.shape[:3], c_out)


def grouped_pointwise_conv2d_broadcast(x: jax.Array, kernel: jax.Array, groups: int) -> jax.Array:
    """Grouped 1x1 convolution as c_in/groups broadcast multiply-adds, in the channels-last layout.

    y[..., g, :] = sum_c x[..., g, c] * w[c, g, :]. A batched matmul over groups would need the group axis
    major (a transpose XLA:CPU fuses with the producer into a slow strided loop); this form never moves data.
    """
    c_in_per_group, c_out = kernel.shape[2], kernel.shape[3]
    c_out_per_group = c_out // groups
    xg = x.reshape(*x.shape[:3], groups, c_in_per_group, 1)
    w = kernel.reshape(c_in_per_group, groups, c_out_per_group)
    out = None
    for c in range(c_in_per_group):
        term = xg[..., c, :] * w[c]
        out = term if out is None else out + term
    return out.reshape(*x.shape[:3], c_out)


def _use_fast_path(conv_impl: str) -> bool:
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    if conv_impl == "auto":
        return jax.default_backend() == "cpu"
    return conv_impl == "fast"


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    conv_impl: str = "auto",
) -> jax.Array:
    """NHWC convolution with HWIO kernel, symmetric padding and `groups` like torch.nn.Conv2d.

    conv_impl="auto" uses lax.conv on GPU/TPU and the fast CPU formulations on CPU.
    """
    kh, kw, c_in_per_group, _ = kernel.shape
    c_in = x.shape[-1]
    if c_in != c_in_per_group * groups:
        raise ValueError(f"conv2d: input has {c_in} channels, kernel expects {c_in_per_group} x {groups} groups")
    if _use_fast_path(conv_impl):
        if kh == kw == 1 and stride == 1 and padding == 0:
            if groups > 1 and c_in_per_group <= 32:
                return grouped_pointwise_conv2d_broadcast(x, kernel, groups)
            return pointwise_conv2d_matmul(x, kernel, groups)
        if groups == c_in and c_in_per_group == 1 and kernel.shape[3] == c_in:
            return depthwise_conv2d_shift_add(x, kernel, stride, padding)
    return lax_conv2d(x, kernel, stride, padding, groups)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "hswish": jax.nn.hard_swish,
    "gelu": gelu_tanh,
    "silu": jax.nn.silu,
}


@functools.lru_cache(maxsize=None)
def get_activation(name: str | None) -> Callable[[jax.Array], jax.Array] | None:
    """Activation by the official code's name (`hswish`, `gelu` = tanh GELU, `relu`...)."""
    if name is None:
        return None
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
