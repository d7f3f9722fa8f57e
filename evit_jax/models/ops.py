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
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
from jax import lax

# `conv_impl` values: "auto" picks per backend; the others force one formulation everywhere.
CONV_IMPLS = ("auto", "lax", "fast")


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


def _taps(x: jax.Array, kh: int, kw: int, stride: int, padding: int) -> Iterator[tuple[int, int, jax.Array]]:
    """(i, j, window) for every kernel tap: the output-grid window of a zero-padded copy of x.

    XLA fuses the pad into the producer of x (the previous layer's norm/activation), so the padded copy
    costs no extra pass, and every tap is a plain (strided) read of it. Reading the unpadded x with per-tap
    zero extension instead avoids the copy but makes XLA recompute the producer in every tap; it measured
    slower inside the models, also for stride 2 (docs/performance.md).
    """
    h_out, w_out = _out_size(x.shape[1], kh, stride, padding), _out_size(x.shape[2], kw, stride, padding)
    xp = x if padding == 0 else jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    for i in range(kh):
        for j in range(kw):
            limit = (xp.shape[0], i + (h_out - 1) * stride + 1, j + (w_out - 1) * stride + 1, xp.shape[3])
            yield i, j, lax.slice(xp, (0, i, j, 0), limit, (1, stride, stride, 1))


def depthwise_conv2d_shift_add(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Depthwise convolution as a sum of k*k shifted, channel-scaled copies of the input.

    kernel: (kh, kw, 1, C). Fast on CPU because every tap is a fused elementwise multiply-add over the
    contiguous channel axis (XLA:CPU's grouped convolution is a slow generic loop).
    """
    kh, kw, _, channels = kernel.shape
    taps = kernel.reshape(kh, kw, channels)
    out = None
    for i, j, window in _taps(x, kh, kw, stride, padding):
        term = window * taps[i, j]
        out = term if out is None else out + term
    return out


def conv2d_few_inputs_broadcast(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Dense convolution with few input channels (the 3-channel stem) as kh*kw*C_in broadcast multiply-adds.

    A matmul with a contraction of 27 wastes most of the CPU's vector width; this is about 2-3x faster than
    lax.conv on XLA:CPU for the stem and writes no im2col buffer.
    """
    kh, kw, c_in, _ = kernel.shape
    out = None
    for i, j, window in _taps(x, kh, kw, stride, padding):
        for c in range(c_in):
            term = window[..., c : c + 1] * kernel[i, j, c]
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
    """Grouped 1x1 convolution as C_in/groups broadcast multiply-adds, in the channels-last layout.

    y[..., g, :] = sum_c x[..., g, c] * w[c, g, :]. A batched matmul over groups needs the group axis major:
    a transpose that XLA:CPU fuses with the producer (LiteMLA's depthwise 5x5) into a strided loop about 15x
    slower than this form, which never moves data.
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


def with_backward_of(forward: Callable[..., jax.Array], backward_of: Callable[..., jax.Array],
                     num_static: int) -> Callable[..., jax.Array]:
    """`forward` with the gradient of `backward_of` (the same function, written another way).

    The broadcast formulations are fast forward, but their autodiff kernel gradient is one strided
    reduction per broadcast term, which XLA:CPU does not vectorise (7-12x slower than the gradient of
    the matmul / lax.conv form). Arguments are (x, kernel, *static ints).
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=tuple(range(2, 2 + num_static)))
    def fn(x, kernel, *static):
        return forward(x, kernel, *static)

    def fwd(x, kernel, *static):
        return forward(x, kernel, *static), (x, kernel)

    def bwd(*args):
        static, (x, kernel), cotangent = args[:num_static], args[num_static], args[num_static + 1]
        _, vjp = jax.vjp(lambda x, k: backward_of(x, k, *static), x, kernel)
        return vjp(cotangent)

    fn.defvjp(fwd, bwd)
    return fn


def _dense_lax_conv2d(x, kernel, stride, padding):
    return lax_conv2d(x, kernel, stride, padding, 1)


fast_stem_conv2d = with_backward_of(conv2d_few_inputs_broadcast, _dense_lax_conv2d, num_static=2)
fast_grouped_pointwise_conv2d = with_backward_of(grouped_pointwise_conv2d_broadcast, pointwise_conv2d_matmul,
                                                 num_static=1)


# Formulation limits, from micro-benchmarks on the 2-core dev machine (docs/performance.md).
MAX_BROADCAST_GROUP_CHANNELS = 32  # grouped 1x1: broadcast multiply-adds up to this many inputs per group
MAX_BROADCAST_CONV_INPUTS = 4  # dense k x k conv: broadcast multiply-adds up to this many input channels


def use_fast_path(conv_impl: str) -> bool:
    """Whether `conv_impl` selects the CPU formulations on the current default backend."""
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

    conv_impl="auto" uses lax.conv on GPU/TPU and the fast CPU formulations on CPU:
    depthwise -> shift-and-add; 1x1 -> matmul (grouped with few channels per group -> broadcast
    multiply-adds); dense k x k with <= 4 input channels -> broadcast multiply-adds; other dense convs ->
    lax.conv (XLA:CPU's dense convolution beats im2col and shifted matmuls here).
    """
    kh, kw, c_in_per_group, c_out = kernel.shape
    c_in = x.shape[-1]
    if c_in != c_in_per_group * groups:
        raise ValueError(f"conv2d: input has {c_in} channels, kernel expects {c_in_per_group} x {groups} groups")
    if not use_fast_path(conv_impl):
        return lax_conv2d(x, kernel, stride, padding, groups)
    if kh == kw == 1 and stride == 1 and padding == 0:
        if groups > 1 and c_in_per_group <= MAX_BROADCAST_GROUP_CHANNELS:
            return fast_grouped_pointwise_conv2d(x, kernel, groups)
        return pointwise_conv2d_matmul(x, kernel, groups)
    if groups == c_in and c_in_per_group == 1 and c_out == c_in:
        return depthwise_conv2d_shift_add(x, kernel, stride, padding)
    if groups == 1 and c_in <= MAX_BROADCAST_CONV_INPUTS:
        return fast_stem_conv2d(x, kernel, stride, padding)
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
