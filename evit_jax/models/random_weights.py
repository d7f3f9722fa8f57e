"""Random model variables without running the initialiser: numpy fills the abstract tree from
`jax.eval_shape`, so any model at any input size gets its variables in milliseconds.

Used where the values do not matter but must be realistic (cost sweeps, parity tests, exports):
kernels have unit-gain fan-in scaling, so activations stay O(1) through a deep EfficientViT, and
BatchNorm statistics and affine parameters are random, so no normalisation is an identity.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(module, input_shape: Sequence[int], seed: int = 0, dtype: Any = jnp.float32) -> dict:
    """Variables of `module` for an input of `input_shape`, drawn from numpy's PCG64 with `seed`."""
    abstract = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False),
                              jax.ShapeDtypeStruct(tuple(input_shape), dtype))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        shape, leaf_dtype = leaf.shape, leaf.dtype
        if not jnp.issubdtype(leaf_dtype, jnp.floating):
            return jnp.zeros(shape, leaf_dtype)
        if "'var'" in name:
            value = rng.uniform(0.5, 1.5, shape)
        elif "'mean'" in name or "'bias'" in name:
            value = 0.1 * rng.standard_normal(shape)
        elif "'scale'" in name:
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:  # conv (kh, kw, cin, cout) or dense (cin, cout) kernel: unit-gain fan-in scaling
            fan_in = int(np.prod(shape[:-1]))
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        return jnp.asarray(value, leaf_dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)
