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
