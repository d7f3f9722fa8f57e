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
import math
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


def _pad_hw(x: jax.Array, padding: int) -> jax.Array:
    """Zero-pads the two spatial axes of an NHWC array by `padding` on each side."""
    return x if padding == 0 else jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def _windows(xp: jax.Array, kh: int, kw: int, stride: int, h_out: int,
             w_out: int) -> Iterator[tuple[int, int, jax.Array]]:
    """(i, j, window) for every kernel tap: the (h_out, w_out) strided window of the padded xp it multiplies."""
    for i in range(kh):
        for j in range(kw):
            limit = (xp.shape[0], i + (h_out - 1) * stride + 1, j + (w_out - 1) * stride + 1, xp.shape[3])
            yield i, j, lax.slice(xp, (0, i, j, 0), limit, (1, stride, stride, 1))


def _taps(x: jax.Array, kh: int, kw: int, stride: int, padding: int) -> Iterator[tuple[int, int, jax.Array]]:
    """(i, j, window) for every kernel tap: the output-grid window of a zero-padded copy of x.

    XLA fuses the pad into the producer of x (the previous layer's norm/activation), so the padded copy
    costs no extra pass, and every tap is a plain (strided) read of it. Reading the unpadded x with per-tap
    zero extension instead avoids the copy but makes XLA recompute the producer in every tap; it measured
    slower inside the models, also for stride 2 (docs/performance.md).
    """
    h_out, w_out = _out_size(x.shape[1], kh, stride, padding), _out_size(x.shape[2], kw, stride, padding)
    return _windows(_pad_hw(x, padding), kh, kw, stride, h_out, w_out)


def _shift_add(xp: jax.Array, taps: jax.Array, stride: int, h_out: int, w_out: int) -> jax.Array:
    """sum over taps (i, j) of window(i, j) * taps[i, j]: a depthwise correlation of the padded xp."""
    out = None
    for i, j, window in _windows(xp, taps.shape[0], taps.shape[1], stride, h_out, w_out):
        term = window * taps[i, j]
        out = term if out is None else out + term
    return out


def depthwise_conv2d_shift_add(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Depthwise convolution as a sum of k*k shifted, channel-scaled copies of the input.

    kernel: (kh, kw, 1, C). Fast on CPU because every tap is a fused elementwise multiply-add over the
    contiguous channel axis (XLA:CPU's grouped convolution is a slow generic loop).
    """
    kh, kw, _, channels = kernel.shape
    h_out, w_out = _out_size(x.shape[1], kh, stride, padding), _out_size(x.shape[2], kw, stride, padding)
    return _shift_add(_pad_hw(x, padding), kernel.reshape(kh, kw, channels), stride, h_out, w_out)


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


# Depthwise kernel gradient: batch slabs summed elementwise before the one reduction (see below).
MAX_KERNEL_GRAD_SLABS = 16


def depthwise_kernel_grad(xp: jax.Array, cotangent: jax.Array, kh: int, kw: int, stride: int) -> jax.Array:
    """Gradient of the depthwise kernel: per tap (i, j), sum over (B, H, W) of window(i, j) * cotangent.

    xp: the zero-padded input; cotangent: (B, H_out, W_out, C). Returns (kh, kw, 1, C) float32.
    The batch is cut into up to 16 slabs that are multiplied and summed as one elementwise expression per
    tap (one fused pass over the window, vectorised over channels, that leaves 1/16 of the data), and one
    reduction of the stacked partial sums finishes. Reducing each tap's product over (B, H, W) directly
    is a column reduction that XLA:CPU neither fuses with the shifted window nor vectorises (5-10x slower).
    Every window is sliced per slab straight from xp: a reshape of a strided window makes XLA materialise
    the window, and a reshape of xp makes it recompute xp's producer for the backward.
    """
    batch, h_out, w_out, channels = cotangent.shape
    slabs = _largest_divisor_at_most(batch, MAX_KERNEL_GRAD_SLABS)
    per_slab = batch // slabs
    g = cotangent.astype(jnp.float32)
    partial_sums = []
    for i in range(kh):
        for j in range(kw):
            acc = None
            for u in range(slabs):
                rows = (u * per_slab, (u + 1) * per_slab)
                window = lax.slice(xp, (rows[0], i, j, 0),
                                   (rows[1], i + (h_out - 1) * stride + 1, j + (w_out - 1) * stride + 1, channels),
                                   (1, stride, stride, 1))
                term = window.astype(jnp.float32) * g[rows[0]:rows[1]]
                acc = term if acc is None else acc + term
            partial_sums.append(acc)
    return jnp.sum(jnp.stack(partial_sums), axis=(1, 2, 3)).reshape(kh, kw, 1, channels)


def depthwise_input_grad(cotangent: jax.Array, kernel: jax.Array, stride: int, padding: int, h_in: int,
                         w_in: int) -> jax.Array:
    """Gradient of a depthwise convolution w.r.t. its (h_in, w_in) input: the transposed convolution.

    Written per output phase: input row y = stride * m + r receives the taps i with (r + padding - i)
    divisible by the stride, each reading cotangent row m + (r + padding - i) // stride. Every phase is
    a shift-and-add over a zero-padded cotangent (stride 1: one phase, the correlation with the flipped
    kernel); the stride x stride phases are interleaved by one reshape. Nothing is computed for the
    zeros that a dilated cotangent would hold.
    """
    kh, kw, _, channels = kernel.shape
    taps = kernel.reshape(kh, kw, channels)
    batch, h_out, w_out, _ = cotangent.shape
    m_rows, m_cols = -(-h_in // stride), -(-w_in // stride)

    def phase_taps(size: int) -> list[list[tuple[int, int]]]:
        return [[(i, (r + padding - i) // stride) for i in range(size) if (r + padding - i) % stride == 0]
                for r in range(stride)]

    rows, cols = phase_taps(kh), phase_taps(kw)

    def pads(phases, rows_needed, available):
        offsets = [d for phase in phases for _, d in phase] or [0]
        low = max(0, -min(offsets))
        return low, rows_needed - 1 + max(offsets) - (available - 1)

    (top, bottom), (left, right) = pads(rows, m_rows, h_out), pads(cols, m_cols, w_out)
    zero = jnp.zeros((), cotangent.dtype)
    gp = lax.pad(cotangent, zero, ((0, 0, 0), (top, max(bottom, 0), 0), (left, max(right, 0), 0), (0, 0, 0)))
    phases = []
    for row_taps in rows:
        phase_row = []
        for col_taps in cols:
            acc = None
            for i, di in row_taps:
                for j, dj in col_taps:
                    window = lax.slice(gp, (0, top + di, left + dj, 0),
                                       (batch, top + di + m_rows, left + dj + m_cols, channels))
                    term = window * taps[i, j]
                    acc = term if acc is None else acc + term
            phase_row.append(jnp.zeros((batch, m_rows, m_cols, channels), cotangent.dtype) if acc is None else acc)
        phases.append(phase_row)
    if stride == 1:
        return phases[0][0][:, :h_in, :w_in]
    # (B, M, r, N, q, C) -> (B, M * stride, N * stride, C): row stride * m + r, column stride * n + q.
    interleaved = jnp.stack([jnp.stack(phase_row, axis=3) for phase_row in phases], axis=2)
    return interleaved.reshape(batch, m_rows * stride, m_cols * stride, channels)[:, :h_in, :w_in]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Depthwise convolution (kernel (kh, kw, 1, C)) in the formulations XLA:CPU runs fastest.

    Forward: shift-and-add. Backward (a custom VJP; autodiff of the shift-and-add keeps every tap's window
    for the backward and reduces each tap's product separately): the input gradient by
    `depthwise_input_grad`, the kernel gradient by `depthwise_kernel_grad`, from the padded input alone.
    """
    return depthwise_conv2d_shift_add(x, kernel, stride, padding)


def _depthwise_fwd(x, kernel, stride, padding):
    kh, kw, _, channels = kernel.shape
    h_out, w_out = _out_size(x.shape[1], kh, stride, padding), _out_size(x.shape[2], kw, stride, padding)
    xp = _pad_hw(x, padding)
    return _shift_add(xp, kernel.reshape(kh, kw, channels), stride, h_out, w_out), (xp, kernel)


def _depthwise_bwd(stride, padding, residuals, cotangent):
    # The barrier keeps XLA from merging the kernel gradient's windows with the forward's identical
    # slices of xp (common-subexpression elimination), which would materialise every window in the
    # forward and keep it alive until here.
    xp, kernel = lax.optimization_barrier(residuals)
    kh, kw = kernel.shape[:2]
    h_in, w_in = xp.shape[1] - 2 * padding, xp.shape[2] - 2 * padding
    dx = depthwise_input_grad(cotangent, kernel, stride, padding, h_in, w_in)
    dk = depthwise_kernel_grad(xp, cotangent, kh, kw, stride)
    return dx.astype(xp.dtype), dk.astype(kernel.dtype)


depthwise_conv2d.defvjp(_depthwise_fwd, _depthwise_bwd)


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


def _pointwise_forward(x: jax.Array, kernel: jax.Array, groups: int) -> jax.Array:
    c_in_per_group, c_out = kernel.shape[2], kernel.shape[3]
    w = kernel.reshape(c_in_per_group, c_out)
    if groups == 1:
        return jnp.einsum("bhwc,cd->bhwd", x, w)
    xg = x.reshape(*x.shape[:3], groups, c_in_per_group)
    y = jnp.einsum("bhwgc,gcd->bhwgd", xg, _group_major(w, groups))
    return y.reshape(*x.shape[:3], c_out)


def _group_major(w: jax.Array, groups: int) -> jax.Array:
    """(C_in/G, C_out) -> (G, C_in/G, C_out/G). PyTorch orders grouped output channels group-major:
    out channel o belongs to group o // (C_out/G)."""
    return w.reshape(w.shape[0], groups, w.shape[1] // groups).transpose(1, 0, 2)


# Row blocks of the weight-gradient matmul (see `row_blocked_gram`): at most 32, and their partial products
# at most a quarter of the operands' size.
MAX_GRAM_ROW_BLOCKS = 32
MAX_GRAM_PARTIAL_FRACTION = 0.25


def row_blocked_gram(a: jax.Array, b: jax.Array) -> jax.Array:
    """sum_n a[n, ..., p] b[n, ..., q] -> (..., p, q) in float32: a 1x1 convolution's weight gradient.

    a: (n, *batch, p), b: (n, *batch, q) with the same batch axes (the groups of a grouped convolution).
    The n rows (every pixel of every image) are cut into up to 32 blocks that become a batch axis of one
    dot_general, and the per-block products are summed. XLA:CPU runs the plain a^T b (a contraction over
    the major axis of both operands) on one thread, and in the train step lays the larger operand out
    transposed for it, writing it from a strided loop fused with the producer (docs/performance.md).
    Few rows and many channels (the 7x7 stages) keep one block: partial products larger than the
    operands would cost more than they save.
    """
    n, p, q = a.shape[0], a.shape[-1], b.shape[-1]
    per_block = math.prod(a.shape[1:-1]) * p * q
    affordable = int(MAX_GRAM_PARTIAL_FRACTION * (a.size + b.size) / per_block)
    blocks = _largest_divisor_at_most(n, max(1, min(MAX_GRAM_ROW_BLOCKS, affordable)))
    batch_axes = tuple(range(2, a.ndim))  # the block axis, then a's batch axes
    dims = (((1,), (1,)), ((0, *batch_axes), (0, *batch_axes)))
    partial = lax.dot_general(a.reshape(blocks, n // blocks, *a.shape[1:]),
                              b.reshape(blocks, n // blocks, *b.shape[1:]), dims,
                              preferred_element_type=jnp.float32)
    return sum_leading_axis(partial)


def sum_leading_axis(x: jax.Array) -> jax.Array:
    """x.sum(axis=0), written as one elementwise sum of the slices x[0] + x[1] + ...

    XLA:CPU hands reductions to YNNPACK, whose reduction over the leading (outermost) axis ran 25-40x
    slower than this form in isolation (the sum of 32 blocks of a 576 x 1024 gram: 89 ms against 3.7 ms,
    2-core AMD EPYC). A matmul with a row of ones was as fast in isolation but not inside the train step.
    """
    out = x[0]
    for i in range(1, x.shape[0]):
        out = out + x[i]
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def pointwise_conv2d_matmul(x: jax.Array, kernel: jax.Array, groups: int) -> jax.Array:
    """1x1 convolution (stride 1, possibly grouped) as a matmul over channels.

    The backward is a custom VJP: the input gradient is the matmul with the transposed kernel, the kernel
    gradient is `row_blocked_gram` of the input and the cotangent.
    """
    return _pointwise_forward(x, kernel, groups)


def _pointwise_fwd(x, kernel, groups):
    return _pointwise_forward(x, kernel, groups), (x, kernel)


def _pointwise_bwd(groups, residuals, cotangent):
    # Materialised as they are: otherwise XLA fuses their producers (for LiteMLA's grouped 1x1: the 5x5
    # depthwise sum, the attention's backward) into the transposed copies the weight gradient reads, and
    # recomputes them in strided order.
    x, kernel, cotangent = lax.optimization_barrier((*residuals, cotangent))
    c_in_per_group, c_out = kernel.shape[2], kernel.shape[3]
    c_out_per_group = c_out // groups
    w = kernel.reshape(c_in_per_group, c_out)
    n = x.size // x.shape[-1]
    if groups == 1:
        dx = jnp.einsum("bhwd,cd->bhwc", cotangent, w)
        dw = row_blocked_gram(x.reshape(n, c_in_per_group), cotangent.reshape(n, c_out))
        return dx.astype(x.dtype), dw.reshape(kernel.shape).astype(kernel.dtype)
    g = cotangent.reshape(*cotangent.shape[:3], groups, c_out_per_group)
    if c_out_per_group <= MAX_BROADCAST_GROUP_CHANNELS:
        # The input gradient is the grouped 1x1 convolution of the cotangent with each group's kernel
        # transposed: (C_out/G, G * C_in/G), in the broadcast form of the forward (no group-major copies).
        transposed = w.reshape(c_in_per_group, groups, c_out_per_group).transpose(2, 1, 0)
        dx = grouped_pointwise_conv2d_broadcast(cotangent, transposed.reshape(1, 1, c_out_per_group, -1), groups)
    else:
        dx = jnp.einsum("bhwgd,gcd->bhwgc", g, _group_major(w, groups)).reshape(x.shape)
    dw_groups = row_blocked_gram(x.reshape(n, groups, c_in_per_group), g.reshape(n, groups, c_out_per_group))
    dw = dw_groups.transpose(1, 0, 2).reshape(c_in_per_group, c_out)
    return dx.astype(x.dtype), dw.reshape(kernel.shape).astype(kernel.dtype)


pointwise_conv2d_matmul.defvjp(_pointwise_fwd, _pointwise_bwd)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense_conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Dense (groups=1) convolution: lax.conv forward and input gradient, the kernel gradient as a matmul.

    XLA:CPU's lax.conv runs the forward and the input gradient near the matmul peak, but runs its kernel
    gradient (a convolution that contracts over every pixel of every image) 2-6x slower than the forward
    (docs/performance.md). Here the kernel gradient is `row_blocked_gram` of the im2col matrix (every
    output pixel's kh*kw*C_in input window, one row per pixel) and the cotangent. The im2col matrix is
    a temporary of the backward, up to kh*kw times the input's size (231 MB for L1's first ResBlock conv at
    batch 16).
    """
    return lax_conv2d(x, kernel, stride, padding, 1)


def _dense_fwd(x, kernel, stride, padding):
    return lax_conv2d(x, kernel, stride, padding, 1), (x, kernel)


def _dense_bwd(stride, padding, residuals, cotangent):
    # As in _pointwise_bwd: keeps XLA from recomputing x's producer in the strided im2col reads.
    x, kernel, cotangent = lax.optimization_barrier((*residuals, cotangent))
    kh, kw, c_in, c_out = kernel.shape
    _, input_vjp = jax.vjp(lambda x: lax_conv2d(x, kernel, stride, padding, 1), x)
    (dx,) = input_vjp(cotangent)
    rows = cotangent.size // c_out
    # Columns in the kernel's (kh, kw, C_in) order, so that the gram reshapes straight to HWIO.
    im2col = jnp.concatenate([window for _, _, window in _taps(x, kh, kw, stride, padding)], axis=-1)
    dk = row_blocked_gram(im2col.reshape(rows, kh * kw * c_in), cotangent.reshape(rows, c_out))
    return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


dense_conv2d.defvjp(_dense_fwd, _dense_bwd)

fast_stem_conv2d = with_backward_of(conv2d_few_inputs_broadcast, dense_conv2d, num_static=2)
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
    `dense_conv2d` (lax.conv forward: XLA:CPU's dense convolution beats im2col and shifted matmuls there;
    the kernel gradient as an im2col matmul).
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
        return depthwise_conv2d(x, kernel, stride, padding)
    if groups == 1 and c_in <= MAX_BROADCAST_CONV_INPUTS:
        return fast_stem_conv2d(x, kernel, stride, padding)
    if groups == 1:
        return dense_conv2d(x, kernel, stride, padding)
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
