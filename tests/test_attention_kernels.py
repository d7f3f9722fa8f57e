"""Attention kernels: linear forms equal their naive quadratic forms, softmax equals a reference,
finite gradients (float32 / bfloat16), spec parsing, shared parameters, default bit-identical."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evit_jax.models import create_model
from evit_jax.models import attention_kernels as ak
from evit_jax.models.attention import LiteMLA
from evit_jax.models.layers import LayerConfig

sys.path.insert(0, os.path.dirname(__file__))
from _reference_weights import assert_close_to_torch, seeded_variables  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ["relu_linear", "softmax", "elu_linear", "focused", "focused(value_dwc=0, power=2)", "cosformer",
            "relu_linear(scales=())", "relu_linear(scales=(3,))", "relu_linear(scales=(3, 5))"]


def _qkv(seed=0, b=2, n=37, h=3, d=8):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32) for _ in range(3)]


def _naive(weights_fn, q, k, v, eps):
    """Explicit N x N weight matrix, normalised over keys: out_i = sum_j w_ij v_j / (sum_j w_ij + eps)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, n, h, _ = q.shape
    out = np.zeros_like(v)
    for bi in range(b):
        for hi in range(h):
            w = weights_fn(q[bi, :, hi], k[bi, :, hi])  # (N_q, N_k)
            out[bi, :, hi] = (w @ v[bi, :, hi]) / (w.sum(1, keepdims=True) + eps)
    return out


def _focus(x, p, kernel_eps=1e-6):
    x = np.maximum(x, 0) + kernel_eps
    xp = x ** p
    return xp * np.linalg.norm(x, axis=-1, keepdims=True) / np.linalg.norm(xp, axis=-1, keepdims=True)


def _cos_weights(q, k):
    n = q.shape[0]
    i = np.arange(n)
    return (np.maximum(q, 0) @ np.maximum(k, 0).T) * np.cos(np.pi / 2 * (i[:, None] - i[None, :]) / n)


NAIVE = {
    "relu_linear": lambda q, k: np.maximum(q, 0) @ np.maximum(k, 0).T,
    "elu_linear": lambda q, k: (np.where(q > 0, q + 1, np.exp(q))) @ (np.where(k > 0, k + 1, np.exp(k))).T,
    "focused": lambda q, k: _focus(q, 3.0) @ _focus(k, 3.0).T,
    "cosformer": _cos_weights,
}


@pytest.mark.parametrize("name", sorted(NAIVE))
def test_linear_kernel_equals_naive_quadratic(name):
    q, k, v = _qkv()
    eps = 1e-6
    got = ak.get_attention_kernel(name)(q, k, v, eps=eps)
    np.testing.assert_allclose(np.asarray(got), _naive(NAIVE[name], q, k, v, eps), rtol=2e-5, atol=2e-6)


def test_focused_power_option():
    q, k, v = _qkv(1)
    got = ak.focused_linear_attention(q, k, v, eps=1e-6, power=2.0)
    want = _naive(lambda a, b: _focus(a, 2.0) @ _focus(b, 2.0).T, q, k, v, 1e-6)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)


def test_relu_quadratic_fallback_equals_linear():
    q, k, v = _qkv(2, n=9)
    np.testing.assert_allclose(np.asarray(ak.relu_quadratic_attention(q, k, v, eps=1e-6)),
                               np.asarray(ak.relu_linear_attention(q, k, v, eps=1e-6)), rtol=2e-5, atol=2e-6)


def test_softmax_equals_reference():
    q, k, v = _qkv(3)
    got = np.asarray(ak.softmax_attention(q, k, v, eps=1e-15))
    qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", qn, kn) / np.sqrt(q.shape[-1])
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, np.einsum("bhqk,bkhe->bqhe", w, vn), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("attention", VARIANTS)
def test_gradients_finite(attention, dtype):
    module = LiteMLA(32, LayerConfig(dtype=dtype), dim=8, attention=attention)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 6, 32)), dtype)
    variables = module.init(jax.random.PRNGKey(0), x)

    def loss(params, x):
        y = module.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])[0]
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)
    leaves = jax.tree_util.tree_leaves(gp) + [gx]
    assert all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in leaves)
    assert any(float(jnp.max(jnp.abs(g.astype(jnp.float32)))) > 0 for g in jax.tree_util.tree_leaves(gp))


def test_all_kernels_share_the_official_parameter_tree():
    x = jnp.zeros((1, 64, 64, 3))

    def shapes(**kw):
        m = create_model("efficientvit_b0", **kw)
        v = jax.eval_shape(lambda x: m.init(jax.random.PRNGKey(0), x), x)
        return jax.tree_util.tree_map(lambda a: a.shape, v)

    default = shapes()
    for name in ("softmax", "elu_linear", "cosformer"):
        assert shapes(attention=name) == default
    assert shapes(attention="focused", attention_options={"value_dwc": 0}) == default
    with_dwc = shapes(attention="focused")["params"]["backbone"]["stages_2_op_list_1"]["context_module"]["main"]
    assert with_dwc["value_dwc"]["kernel"] == (5, 5, 1, 16)


def test_spec_parsing_and_errors():
    spec = ak.parse_attention("focused(power=2, scales=(3, 5))")
    assert spec.name == "focused" and dict(spec.kernel_options) == {"power": 2} and spec.scales == (3, 5)
    assert spec.value_dwc == 5  # FLatten's default DWC
    assert ak.parse_attention(spec.to_string()) == spec
    assert ak.attention_spec_string("relu_linear") == "relu_linear"
    assert ak.attention_spec_string("relu_linear", {}, (3, 5)) == "relu_linear(scales=(3, 5))"
    assert ak.attention_spec_string("focused", {"value_dwc": 0}) == "focused(value_dwc=0)"
    for bad, message in [("nope", "unknown attention"), ("softmax(power=2)", "has no option"),
                         ("relu_linear(scales=(4,))", "scales"), ("focused(value_dwc=2)", "odd"),
                         ("relu_linear(", "is not `name`")]:
        with pytest.raises(ValueError, match=message):
            ak.parse_attention(bad)
    with pytest.raises(ValueError, match="both"):
        create_model("efficientvit_b0", attention="relu_linear(scales=(3,))", scales=(5,))


@pytest.mark.parametrize("name,res,batch", [("efficientvit_b0", 160, 2), ("efficientvit_b0", 64, 2),
                                            ("efficientvit_backbone_l0", 224, 1)])
def test_default_model_equals_frozen_reference(name, res, batch, highest_precision):
    """Outputs recorded at commit 827a72c by tests/data/record_attention_reference.py (conv_impl="lax",
    so that changes of the CPU fast-path formulations in ops.py do not move the reference). Not bit for
    bit: XLA:CPU's code depends on the host's instruction set (recorded on an Intel Xeon with AMX; an AMD
    EPYC differs by ~1e-6 relative), so float32 rounding is allowed and nothing more (a changed kernel,
    eps or layer moves the outputs by orders of magnitude more)."""
    reference = np.load(os.path.join(os.path.dirname(__file__), "data", "attention_default_reference.npz"))
    model = create_model(name, conv_impl="lax")
    x = jnp.asarray(np.random.default_rng(1).standard_normal((batch, res, res, 3), np.float32))
    variables = seeded_variables(model, x.shape, seed=0)
    y = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    y = y["stage_final"] if isinstance(y, dict) else y
    assert_close_to_torch(y, reference[f"{name}_{res}"])


_TRAIN_SCRIPT = textwrap.dedent("""
    import os, sys, tempfile
    import jax, jax.numpy as jnp, numpy as np, optax, flax.linen as nn
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from evit_jax.models.attention import EfficientViTBlock
    from evit_jax.models.layers import ConvLayer, LayerConfig
    from evit_jax.models.v1 import DownsampleWithShortcut

    assert jax.device_count() == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch_sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

    class Tiny(nn.Module):
        # stem -> one EfficientViT block (the variant under test) -> pool -> classifier
        attention: str
        design: str

        @nn.compact
        def __call__(self, x, train=False):
            cfg = LayerConfig()
            x = ConvLayer(32, 3, cfg, stride=2, act="hswish")(x, train)
            if self.design == "v1":
                x = DownsampleWithShortcut(32, cfg, fewer_norm=True)(x, train)
                x = EfficientViTBlock(cfg, dim=8, scales=(), local_kernel_size=5, attention=self.attention)(x, train)
            else:
                x = EfficientViTBlock(cfg, dim=8, attention=self.attention)(x, train)
            return nn.Dense(4)(jnp.mean(x, axis=(1, 2)))

    for item in sys.argv[1:]:
        design, attention = item.split("@", 1)
        model = Tiny(attention, design)
        rng = np.random.default_rng(0)
        x = jax.device_put(jnp.asarray(rng.standard_normal((4, 16, 16, 3)), jnp.float32), batch_sharding)
        y = jax.device_put(jnp.asarray(rng.integers(0, 4, 4)), batch_sharding)
        variables = jax.device_put(model.init(jax.random.PRNGKey(0), x[:1]), replicated)
        tx = optax.adamw(1e-2)
        state = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        state["opt"] = tx.init(state["params"])

        @jax.jit
        def step(state, x, y):
            def loss_fn(params):
                logits, upd = model.apply({"params": params, "batch_stats": state["batch_stats"]}, x, train=True,
                                          mutable=["batch_stats"])
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
            (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
            updates, opt = tx.update(grads, state["opt"], state["params"])
            return {"params": optax.apply_updates(state["params"], updates), "batch_stats": upd["batch_stats"],
                    "opt": opt}, loss

        losses = []
        for _ in range(4):
            state, loss = step(state, x, y)
            losses.append(float(loss))
        assert all(np.isfinite(losses)) and losses[-1] < losses[0], (item, losses)
        with tempfile.TemporaryDirectory() as d:
            ckpt = ocp.StandardCheckpointer()
            ckpt.save(os.path.join(d, "s"), state)
            ckpt.wait_until_finished()
            abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
            restored = ckpt.restore(os.path.join(d, "s"), abstract)
        for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        _, loss_a = step(state, x, y)
        _, loss_b = step(restored, x, y)
        assert float(loss_a) == float(loss_b)
        print("OK", item, losses[0], losses[-1], flush=True)
""")


def test_every_variant_trains_on_a_sharded_mesh_and_checkpoints():
    """Each variant: 4 jit steps of adamw on a batch sharded over 2 CPU devices, loss decreases,
    Orbax save/restore round-trips exactly and the restored state continues identically."""
    items = [f"v2@{a}" for a in VARIANTS] + ["v1@relu_linear"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT, *items], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("OK ") == len(items)
