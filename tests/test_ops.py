"""Every fast convolution formulation in evit_jax.models.ops equals lax.conv (values and gradients).

The float32 comparisons run at 'highest' matmul precision (the `highest_precision` fixture): the fast
paths are matmuls, which an accelerator computes in TF32/bf16 passes at the default precision (on an
H200 that alone gave differences of 1e-3).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evit_jax.models import ops

F32_TOL = dict(rtol=1e-5, atol=1e-5)
BF16_TOL = dict(rtol=5e-2, atol=5e-2)


def _inputs(shape_x, shape_k, seed=0, dtype=jnp.float32):
    kx, kk = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, shape_x, jnp.float32)
    k = jax.random.normal(kk, shape_k, jnp.float32) / np.sqrt(np.prod(shape_k[:3]))
    return x.astype(dtype), k.astype(dtype)


def _reference(x, k, stride, padding, groups):
    with jax.default_matmul_precision("highest"):
        return ops.lax_conv2d(x.astype(jnp.float32), k.astype(jnp.float32), stride, padding, groups)


def _fast(x, k, stride, padding, groups):
    return ops.conv2d(x, k, stride=stride, padding=padding, groups=groups, conv_impl="fast")


# (name, x shape, kernel shape, stride, groups): the convolution shapes EfficientViT uses.
CASES = [
    # Height 7 (odd) and width 8 (even) in one input: both stride-2 edge cases at once.
    *[(f"dw{k}x{k}_s{s}", (2, 7, 8, 6), (k, k, 1, 6), s, 6) for k in (3, 5) for s in (1, 2)],
    ("pw_dense", (2, 5, 6, 12), (1, 1, 12, 20), 1, 1),
    # LiteMLA aggregation: groups = 3 * heads, dim channels per group (broadcast path).
    ("pw_grouped_3heads", (2, 5, 6, 3 * 2 * 4), (1, 1, 4, 3 * 2 * 4), 1, 3 * 2),
    ("pw_grouped_dim16", (1, 3, 4, 3 * 2 * 16), (1, 1, 16, 3 * 2 * 16), 1, 3 * 2),
    # Wide groups go through the batched matmul path.
    ("pw_grouped_wide", (1, 3, 4, 2 * 40), (1, 1, 40, 2 * 24), 1, 2),
    # Dense k x k with more than 4 inputs: lax.conv forward, im2col kernel gradient (dense_conv2d).
    *[(f"full3x3_s{s}", (2, 7, 8, 5), (3, 3, 5, 7), s, 1) for s in (1, 2)],
    # The 3-channel stem takes the broadcast path (custom backward: dense_conv2d's).
    *[(f"stem3x3_s{s}", (2, 9, 8, 3), (3, 3, 3, 8), s, 1) for s in (1, 2)],
    ("full1x1_s2", (2, 8, 8, 4), (1, 1, 4, 6), 2, 1),
    ("full1x1_s2_wide", (2, 7, 8, 6), (1, 1, 6, 5), 2, 1),
]


@pytest.mark.parametrize("name,shape_x,shape_k,stride,groups", CASES, ids=[c[0] for c in CASES])
def test_fast_equals_lax_float32(name, shape_x, shape_k, stride, groups, highest_precision):
    x, k = _inputs(shape_x, shape_k)
    padding = shape_k[0] // 2
    want = _reference(x, k, stride, padding, groups)
    got = jax.jit(functools.partial(_fast, stride=stride, padding=padding, groups=groups))(x, k)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **F32_TOL)


@pytest.mark.parametrize("name,shape_x,shape_k,stride,groups", CASES, ids=[c[0] for c in CASES])
def test_fast_equals_lax_bfloat16(name, shape_x, shape_k, stride, groups):
    x, k = _inputs(shape_x, shape_k, dtype=jnp.bfloat16)
    padding = shape_k[0] // 2
    want = _reference(x, k, stride, padding, groups)
    got = _fast(x, k, stride, padding, groups)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), **BF16_TOL)


@pytest.mark.parametrize("name,shape_x,shape_k,stride,groups", CASES, ids=[c[0] for c in CASES])
def test_fast_gradients_equal_lax(name, shape_x, shape_k, stride, groups, highest_precision):
    x, k = _inputs(shape_x, shape_k, seed=1)
    padding = shape_k[0] // 2
    # A fixed random cotangent so that every output element matters.
    probe = jax.random.normal(jax.random.PRNGKey(2), _reference(x, k, stride, padding, groups).shape)

    def loss(conv):
        return lambda x, k: jnp.sum(conv(x, k, stride, padding, groups) * probe)

    with jax.default_matmul_precision("highest"):
        want = jax.grad(loss(ops.lax_conv2d), argnums=(0, 1))(x, k)
    got = jax.jit(jax.grad(loss(_fast), argnums=(0, 1)))(x, k)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), **F32_TOL)


@pytest.mark.parametrize("name,shape_x,shape_k,stride,groups", CASES, ids=[c[0] for c in CASES])
def test_fast_gradients_equal_lax_bfloat16(name, shape_x, shape_k, stride, groups):
    """bfloat16 gradients (float32 reference on the same rounded inputs), with the cotangent's dtype."""
    x, k = _inputs(shape_x, shape_k, seed=5, dtype=jnp.bfloat16)
    padding = shape_k[0] // 2
    probe = jax.random.normal(jax.random.PRNGKey(6), _reference(x, k, stride, padding, groups).shape)

    def loss(conv, dtype):
        return lambda x, k: jnp.sum(conv(x.astype(dtype), k.astype(dtype), stride, padding, groups).astype(
            jnp.float32) * probe)

    with jax.default_matmul_precision("highest"):
        want = jax.grad(loss(ops.lax_conv2d, jnp.float32), argnums=(0, 1))(x, k)
    got = jax.jit(jax.grad(loss(_fast, jnp.bfloat16), argnums=(0, 1)))(x, k)
    for g, w in zip(got, want):
        assert g.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=5e-2, atol=2e-2 * scale)


# Depthwise custom VJP on shapes the model cases above do not reach: batch sizes that give 1 slab (1, and
# 17: a prime above MAX_KERNEL_GRAD_SLABS), several (6) and 16 (32 = 16 slabs of 2); strides 1, 2, 3;
# padding 0 and k - 1 (a larger output: the input gradient crops the padded cotangent); 1 x 1 maps; a 1 x 1
# kernel with stride 2 (input-gradient phases without taps).
DEPTHWISE_CASES = [  # (batch, (h, w), k, stride, padding)
    (1, (5, 9), 3, 2, 1),
    (17, (4, 4), 5, 1, 2),
    (32, (6, 5), 3, 2, 1),
    (6, (7, 8), 5, 2, 2),
    (6, (7, 8), 3, 2, 0),
    (6, (7, 8), 3, 1, 2),
    (4, (7, 8), 5, 3, 2),
    (3, (1, 1), 3, 1, 1),
    (3, (1, 1), 5, 2, 2),
    (2, (6, 6), 1, 2, 0),
]


def _assert_vjp_equals_lax(conv, x, kernel, stride, padding, groups, probe_seed, kernel_grad_scaled=False):
    """conv(x, kernel, stride, padding)'s value and gradients (jitted, for a random cotangent) equal
    lax.conv's at F32_TOL. kernel_grad_scaled: the kernel gradient's absolute tolerance is F32_TOL's times
    its largest magnitude (at least 1); the value and the input gradient keep F32_TOL."""

    def value_and_vjp(conv):
        @jax.jit
        def run(x, kernel, probe):
            y, vjp = jax.vjp(lambda x, w: conv(x, w, stride, padding), x, kernel)
            return y, vjp(probe)
        return run

    reference = functools.partial(ops.lax_conv2d, groups=groups)
    probe = jax.random.normal(jax.random.PRNGKey(probe_seed), reference(x, kernel, stride, padding).shape)
    want_y, want_grads = value_and_vjp(reference)(x, kernel, probe)
    got_y, got_grads = value_and_vjp(conv)(x, kernel, probe)
    np.testing.assert_allclose(np.asarray(got_y), np.asarray(want_y), **F32_TOL)
    for name, g, w in zip(("input", "kernel"), got_grads, want_grads):
        assert g.shape == w.shape and g.dtype == w.dtype
        scale = max(1.0, float(jnp.max(jnp.abs(w)))) if kernel_grad_scaled and name == "kernel" else 1.0
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=F32_TOL["rtol"], atol=F32_TOL["atol"] * scale,
                                   err_msg=f"{name} gradient")


@pytest.mark.parametrize("batch,hw,k,stride,padding", DEPTHWISE_CASES)
def test_depthwise_custom_vjp_equals_lax(batch, hw, k, stride, padding, highest_precision):
    channels = 5
    x, kernel = _inputs((batch, *hw, channels), (k, k, 1, channels), seed=batch + k)
    _assert_vjp_equals_lax(ops.depthwise_conv2d, x, kernel, stride, padding, groups=channels, probe_seed=7)


# Dense custom VJP (lax.conv forward and input gradient, im2col kernel gradient) beyond the model cases:
# odd and even sizes with stride 2, padding 0 and k - 1, a 5 x 5 kernel, stride 3, 1 x 1 maps, and row
# counts that give 1 (prime), several and 32 gram blocks.
DENSE_CASES = [  # (batch, (h, w), k, stride, padding, c_in, c_out)
    (1, (7, 8), 3, 2, 1, 5, 7),
    (3, (7, 8), 3, 1, 0, 6, 4),
    (2, (6, 5), 5, 2, 2, 5, 3),
    (2, (6, 6), 3, 1, 2, 8, 8),
    (4, (9, 7), 3, 3, 1, 5, 6),
    (3, (1, 1), 3, 1, 1, 6, 5),
    (1, (13, 1), 3, 1, 1, 5, 2),
    (32, (8, 8), 3, 1, 1, 6, 6),
]


@pytest.mark.parametrize("batch,hw,k,stride,padding,c_in,c_out", DENSE_CASES)
def test_dense_custom_vjp_equals_lax(batch, hw, k, stride, padding, c_in, c_out, highest_precision):
    x, kernel = _inputs((batch, *hw, c_in), (k, k, c_in, c_out), seed=batch + k + c_in)
    # The kernel gradient sums up to 2048 products in another order than lax.conv: float32 rounding grows
    # with the gradient's scale, so the absolute tolerance is relative to it.
    _assert_vjp_equals_lax(ops.dense_conv2d, x, kernel, stride, padding, groups=1, probe_seed=8,
                           kernel_grad_scaled=True)


@pytest.mark.parametrize("rows,batch_axes,p,q", [
    (6 * 64, (), 3, 5),        # 32 blocks
    (7 * 11, (), 4, 4),        # 7 blocks: the largest divisor of the rows within the size limit
    (13, (), 6, 2),            # prime: one block
    (50, (), 40, 48),          # many channels: the partial products would be too large, one block
    (4 * 96, (6,), 4, 4),      # grouped (LiteMLA's aggregation)
])
def test_row_blocked_gram_equals_numpy(rows, batch_axes, p, q):
    a, b = _inputs((rows, *batch_axes, p), (rows, *batch_axes, q), seed=rows)
    got = ops.row_blocked_gram(a, b)
    want = np.einsum("n...p,n...q->...pq", np.asarray(a, np.float64), np.asarray(b, np.float64))
    assert got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, **F32_TOL)


@pytest.mark.parametrize("shape", [(1, 3), (32, 4, 5), (7, 2, 3, 4)])
def test_sum_leading_axis_equals_numpy(shape):
    x = jax.random.normal(jax.random.PRNGKey(len(shape)), shape, jnp.float32)
    got = jax.jit(ops.sum_leading_axis)(x)
    want = np.asarray(x, np.float64).sum(axis=0)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, **F32_TOL)


def test_grouped_channel_order_matches_pytorch():
    """Grouped 1x1 output channel o belongs to group o // (C_out / groups), as in torch.nn.Conv2d."""
    torch = pytest.importorskip("torch")
    groups, c_in_per_group, c_out = 6, 4, 24
    x, k = _inputs((2, 3, 5, groups * c_in_per_group), (1, 1, c_in_per_group, c_out), seed=3)
    weight = torch.from_numpy(np.asarray(k).transpose(3, 2, 0, 1).copy())  # HWIO -> OIHW
    want = torch.nn.functional.conv2d(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()), weight,
                                      groups=groups)
    want = want.numpy().transpose(0, 2, 3, 1)
    for impl in ("lax", "fast"):
        got = ops.conv2d(x, k, groups=groups, conv_impl=impl)
        np.testing.assert_allclose(np.asarray(got), want, **F32_TOL)


def test_depthwise_stride2_matches_pytorch_padding():
    """Symmetric k//2 padding with stride 2 on an even size (where 'SAME' would differ)."""
    torch = pytest.importorskip("torch")
    x, k = _inputs((1, 8, 8, 4), (3, 3, 1, 4), seed=4)
    weight = torch.from_numpy(np.asarray(k).transpose(3, 2, 0, 1).copy())
    want = torch.nn.functional.conv2d(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()), weight,
                                      stride=2, padding=1, groups=4).numpy().transpose(0, 2, 3, 1)
    got = ops.conv2d(x, k, stride=2, padding=1, groups=4, conv_impl="fast")
    np.testing.assert_allclose(np.asarray(got), want, **F32_TOL)


def test_auto_picks_fast_path_on_cpu_and_lax_elsewhere(monkeypatch):
    assert ops.use_fast_path("fast") and not ops.use_fast_path("lax")
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert ops.use_fast_path("auto")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not ops.use_fast_path("auto")


def test_bad_arguments_raise_one_clear_error():
    x, k = _inputs((1, 4, 4, 6), (3, 3, 1, 6))
    with pytest.raises(ValueError, match="conv_impl"):
        ops.conv2d(x, k, groups=6, conv_impl="cuda")
    with pytest.raises(ValueError, match="channels"):
        ops.conv2d(x, k, groups=3)


def test_whole_model_gradient_matches_float64(highest_precision):
    """Seg-B0 in train mode (every conv formulation, BatchNorm batch statistics, LiteMLA): the fast path's
    float32 parameter gradients equal a float64 lax.conv reference. Per-op tests cannot catch a wrong
    composition, and a training run is too sensitive to rounding to tell (the segmentation demo's result
    moved by 0.2 mIoU between seeds). Tolerance 1e-4 relative per leaf; leaves whose exact gradient is
    ~0 (a BatchNorm bias followed by another BatchNorm) are rounding noise and skipped."""
    from evit_jax.models.random_weights import random_variables
    from evit_jax.models.zoo import create_model

    name, batch, res = "efficientvit_seg_b0_cityscapes", 2, 64
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, res, res, 3), jnp.float32)
    model32 = create_model(name, num_classes=5, conv_impl="fast")
    # Random BatchNorm scales and biases (not the zero-initialised gammas) carry gradient through every branch.
    variables = random_variables(model32, x.shape, seed=1)
    params = variables["params"]
    probe = jax.random.normal(jax.random.PRNGKey(3), (batch, res // 8, res // 8, 5), jnp.float32)

    def gradients(model, dtype):
        cast = functools.partial(jax.tree_util.tree_map, lambda a: np.asarray(a).astype(dtype))

        def loss(p, stats, x, probe):
            y, _ = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return jnp.sum(y.astype(dtype) * probe)

        return jax.tree_util.tree_leaves(jax.jit(jax.grad(loss))(
            cast(params), cast(variables["batch_stats"]), cast(x), cast(probe)))

    got = gradients(model32, np.float32)
    with jax.enable_x64(True):
        model64 = create_model(name, num_classes=5, conv_impl="lax", dtype=jnp.float64, param_dtype=jnp.float64)
        want = gradients(model64, np.float64)
    scale = max(np.linalg.norm(w) for w in want)
    checked = 0
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float64), np.asarray(w)
        if np.linalg.norm(w) < 1e-6 * scale:
            continue
        checked += 1
        assert np.linalg.norm(g - w) <= 1e-4 * np.linalg.norm(w), (np.linalg.norm(g - w) / np.linalg.norm(w))
    assert checked > 100
