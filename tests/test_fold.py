"""BatchNorm folding (evit_jax/models/fold.py): the folded model computes the unfolded eval-mode model.

Random variables with random BN statistics and affine parameters (random_variables), so no BatchNorm is an
identity. Tolerance: 1e-5 x max |unfolded output| (folding only reorders float32 roundings; measured
~1e-6 on these models).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import traverse_util

from evit_jax.models import create_model
from evit_jax.models.fold import batch_norm_eps, fold_batch_norm, folded_model
from evit_jax.models.random_weights import random_variables

SHAPE = (2, 64, 64, 3)
TOLERANCE = 1e-5


def _max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name, kwargs", [
    ("efficientvit_b0", {}),
    ("efficientvit_l1", {"numerics": "timm"}),  # GELU family, eps 1e-7 except one head BN at 1e-5
    ("efficientvit_seg_b0_cityscapes", {}),
    ("efficientvit_v1_b0", {}),
])
def test_folded_equals_unfolded(name, kwargs):
    kwargs = dict(kwargs, conv_impl="lax")  # the quickest to compile; every conv formulation is tested in test_ops
    model = create_model(name, **kwargs)
    variables = random_variables(model, (1,) + SHAPE[1:], seed=3)
    folded, folded_vars = folded_model(name, variables, **kwargs)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    reference = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    out = jax.jit(lambda v, x: folded.apply(v, x, train=False))(folded_vars, x)
    assert _max_rel(out, reference) < TOLERANCE
    # No BatchNorm is left: no statistics, no ConvLayer `norm` (LayerNorm of the classifier head stays).
    assert set(folded_vars) == {"params"}
    flat = traverse_util.flatten_dict(folded_vars["params"])
    assert not any(k[-2] == "norm" and (k[:-2] + ("conv", "kernel")) in flat for k in flat)


def test_eps_per_layer_is_read_from_the_modules():
    eps = batch_norm_eps(create_model("efficientvit_l1", numerics="timm"))
    assert eps[("head", "op_list_0", "norm")] == 1e-5
    assert eps[("backbone", "stages_0_op_list_0", "norm")] == 1e-7
    assert set(batch_norm_eps(create_model("efficientvit_b0")).values()) == {1e-5}


def test_fold_arithmetic_matches_numpy():
    """One ConvLayer by hand: kernel * s / sqrt(var + eps), bias (0 - mean) * that + beta."""
    model = create_model("efficientvit_b0")
    variables = random_variables(model, (1, 64, 64, 3), seed=5)
    folded = fold_batch_norm(variables, 1e-5)["params"]["backbone"]["input_stem_op_list_0"]
    p = variables["params"]["backbone"]["input_stem_op_list_0"]
    s = variables["batch_stats"]["backbone"]["input_stem_op_list_0"]["norm"]
    m = np.asarray(p["norm"]["scale"], np.float64) / np.sqrt(np.asarray(s["var"], np.float64) + 1e-5)
    np.testing.assert_allclose(folded["conv"]["kernel"], np.asarray(p["conv"]["kernel"]) * m, rtol=1e-6)
    np.testing.assert_allclose(folded["conv"]["bias"], -np.asarray(s["mean"]) * m + np.asarray(p["norm"]["bias"]),
                               rtol=1e-6, atol=1e-7)
    assert "norm" not in folded


def test_bad_uses_are_refused():
    model = create_model("efficientvit_b0")
    variables = random_variables(model, (1, 64, 64, 3))
    folded, folded_vars = folded_model("efficientvit_b0", variables)
    with pytest.raises(ValueError, match="already folded"):
        fold_batch_norm(folded_vars, 1e-5)
    with pytest.raises(ValueError, match="inference-only"):
        folded.apply(folded_vars, np.zeros((2, 64, 64, 3), np.float32), train=True)
    broken = jax.tree.map(lambda x: x, variables)
    del broken["params"]["backbone"]["input_stem_op_list_0"]["conv"]
    with pytest.raises(ValueError, match="no preceding conv"):
        fold_batch_norm(broken, 1e-5)
