"""Deterministic, fast model variables for parity tests (no `model.init` compile: numpy fills the
abstract tree from `jax.eval_shape`). Scales keep activations O(1) through a deep EfficientViT."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def seeded_variables(model, input_shape, seed: int = 0):
    """Variables of `model` for an input of `input_shape`, drawn from numpy's PCG64 with `seed`."""
    abstract = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                              jax.ShapeDtypeStruct(input_shape, jnp.float32))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        shape, dtype = leaf.shape, leaf.dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            return jnp.zeros(shape, dtype)
        if "'var'" in name:
            value = rng.uniform(0.5, 1.5, shape)
        elif "'mean'" in name or "'bias'" in name:
            value = 0.1 * rng.standard_normal(shape)
        elif "'scale'" in name:
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:  # conv (kh, kw, cin, cout) or dense (cin, cout) kernel: unit-gain fan-in scaling
            fan_in = int(np.prod(shape[:-1]))
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        return jnp.asarray(value, dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


# float32 parity against PyTorch: measured errors are ~1e-6 relative (layers, whole models at highest
# matmul precision); this leaves about 10x headroom.
PARITY_RTOL = 1e-5


def assert_close_to_torch(out, ref, rtol: float = PARITY_RTOL) -> float:
    """max|out - ref| <= rtol * max(1, max|ref|); returns the error."""
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(out - ref).max())
    assert err <= rtol * scale, f"max|jax - torch| = {err:.3g} > {rtol:g} * {scale:.3g}"
    return err
