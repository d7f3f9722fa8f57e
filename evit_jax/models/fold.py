"""Inference-mode BatchNorm folded into the preceding convolution.

In eval mode a BatchNorm is a per-channel affine map, y = (x - mean) * scale / sqrt(var + eps) + bias, so
conv -> BN equals one conv with kernel' = kernel * m and bias' = (bias - mean) * m + beta, where
m = scale / sqrt(var + eps). Folding removes every BatchNorm pass from an inference graph (exports, CPU
serving). LayerNorm is not foldable (its statistics depend on the input) and is kept.

    model, variables = folded_model("efficientvit_b1", variables)     # then model.apply(variables, x)

or in two steps: `fold_batch_norm(variables, batch_norm_eps(model, input_shape))` gives the variables of
`create_model(name, fold_batch_norm=True)`. Everything here is pure: no I/O, no global state.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from evit_jax.models.layers import BatchNorm
from evit_jax.models.zoo import create_model

Path = tuple[str, ...]
# Any input the whole zoo accepts (a multiple of 32, large enough for every stage); the BN settings do not
# depend on it.
PROBE_INPUT_SHAPE = (1, 64, 64, 3)


def batch_norm_eps(model: nn.Module, input_shape: Sequence[int] = PROBE_INPUT_SHAPE) -> dict[Path, float]:
    """The epsilon of every BatchNorm of `model`, keyed by the BatchNorm's module path.

    Read from the modules themselves while tracing an abstract `init` (no computation), so per-layer
    overrides (the timm-numerics L classifiers keep 1e-5 in one head BN) are honoured.
    """
    found: dict[Path, float] = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, BatchNorm) and context.method_name == "__call__":
            found[tuple(module.path)] = float(module.cfg.bn_eps if module.eps is None else module.eps)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                       jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
    return found


def fold_batch_norm(variables: Mapping[str, Any], eps: float | Mapping[Path, float]) -> dict[str, Any]:
    """Variables with every BatchNorm folded into its sibling `conv` (the variables of a
    `create_model(..., fold_batch_norm=True)` model).

    variables: {"params", "batch_stats"} of the unfolded model; eps: one epsilon for every BatchNorm, or
    the per-layer map of `batch_norm_eps`. Each BatchNorm `.../norm` must have a sibling `.../conv/kernel`
    (a ConvLayer); the folded conv gets a `bias`. The arithmetic runs in float64 and the results take the
    kernel's dtype. Returns {"params": ...} only: a folded model has no batch statistics.
    """
    params = traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(variables["params"])))
    stats = traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(variables.get("batch_stats", {}))))
    norms = sorted({key[:-1] for key in stats if key[-1] == "mean"})
    if not norms:
        raise ValueError("fold_batch_norm: the variables have no BatchNorm statistics (already folded?)")
    for norm in norms:
        parent = norm[:-1]
        kernel_key, bias_key = parent + ("conv", "kernel"), parent + ("conv", "bias")
        if kernel_key not in params:
            raise ValueError(f"fold_batch_norm: BatchNorm {'/'.join(norm)} has no preceding conv "
                             f"({'/'.join(kernel_key)} is missing)")
        layer_eps = eps if isinstance(eps, (int, float)) else eps.get(norm)
        if layer_eps is None:
            raise ValueError(f"fold_batch_norm: no epsilon for BatchNorm {'/'.join(norm)}")
        kernel = params[kernel_key]
        mean, var = stats[norm + ("mean",)].astype(np.float64), stats[norm + ("var",)].astype(np.float64)
        scale = params.pop(norm + ("scale",)).astype(np.float64)
        beta = params.pop(norm + ("bias",)).astype(np.float64)
        multiplier = scale / np.sqrt(var + layer_eps)
        bias = params[bias_key].astype(np.float64) if bias_key in params else np.zeros_like(mean)
        params[kernel_key] = (kernel.astype(np.float64) * multiplier).astype(kernel.dtype)  # output channels last
        params[bias_key] = ((bias - mean) * multiplier + beta).astype(kernel.dtype)
    return {"params": traverse_util.unflatten_dict(params)}


def folded_model(name: str, variables: Mapping[str, Any], **model_kwargs) -> tuple[nn.Module, dict[str, Any]]:
    """(inference-only model, folded variables) of `create_model(name, **model_kwargs)` with `variables`.

    The folded model computes the unfolded one's eval-mode function up to float rounding.
    """
    unfolded = create_model(name, **model_kwargs)
    folded = fold_batch_norm(variables, batch_norm_eps(unfolded))
    return create_model(name, **model_kwargs, fold_batch_norm=True), folded
