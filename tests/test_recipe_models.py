"""The model side of the official ImageNet recipe (mit-han-lab/efficientvit), checked against its rules:

- initialisation: every conv/linear kernel ~ torch's `trunc_normal_(std=0.02)` (bounds +-2 absolute:
  N(0, 0.02^2) in effect), compared with torch's own draws; biases 0, norm scales 1;
- zero-gamma (`--last_gamma 0`, apps/utils/init.py `zero_last_gamma`): exactly the last BatchNorm of
  every identity-residual block, found by applying the official rule to timm's port of the model;
- drop path (models/nn/drop.py `apply_droppath` on `backbone.stages`): which blocks, which rates;
- scheduled drop path: the drop probability at progress p is rate x p (statistics over many draws), every
  model family takes the progress, train=False ignores it;
- the BatchNorm re-estimation mode of `layers.BatchNorm` normalises like training and records the
  batch moments of every BatchNorm.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evit_jax import convert
from evit_jax.models import create_model, layers

INIT_STD = 0.02


def _run_once(fn, *args):
    """fn(*args) jitted without optimisation (init-like code that runs once: compiles fast on CPU)."""
    from evit_jax.train.loop import _run_once_compiler_options

    return jax.jit(fn).lower(*args).compile(compiler_options=_run_once_compiler_options())(*args)


def _init(model, res=32):
    x = jnp.zeros((1, res, res, 3), jnp.float32)
    return _run_once(lambda k: model.init({"params": k, "dropout": k}, x, train=False), jax.random.key(0))


@pytest.fixture(scope="module")
def b0_variables():
    return _init(create_model("efficientvit_b0", conv_impl="lax"))


def _leaves(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _tail_fractions(w: np.ndarray) -> tuple[float, float]:
    a = np.abs(w)
    return float(np.mean(a > 2 * INIT_STD)), float(np.mean(a > 3 * INIT_STD))


# ---------------------------------------------------------------------------- initialisation
def test_kernels_follow_torch_trunc_normal_and_other_parameters_start_at_0_or_1(b0_variables, torch):
    params = _leaves(b0_variables["params"])
    kernels = np.concatenate([v.ravel() for k, v in params.items() if k.endswith("kernel")])
    n = kernels.size
    reference = torch.nn.init.trunc_normal_(torch.empty(n, dtype=torch.float64), std=INIT_STD,
                                            generator=torch.Generator().manual_seed(0)).numpy()
    # Sample std and mean: both draws within 5 sigma of N(0, 0.02^2) (sd of a sample std: std / sqrt(2n)).
    for w in (kernels, reference):
        assert abs(w.std() - INIT_STD) < 5 * INIT_STD / np.sqrt(2 * n), w.std()
        assert abs(w.mean()) < 5 * INIT_STD / np.sqrt(n), w.mean()
    # Tails of an untruncated normal (4.55% beyond 2 sigma, 0.27% beyond 3; Flax's default +-2 sigma
    # truncation would give 0), the same in both draws within 6 binomial sigma.
    for ours, theirs, p in zip(_tail_fractions(kernels), _tail_fractions(reference), (0.0455, 0.0027)):
        tol = 6 * np.sqrt(p * (1 - p) / n)
        assert abs(ours - theirs) < 2 * tol and abs(ours - p) < tol, (ours, theirs, p)
    for key, v in params.items():
        if key.endswith("bias"):
            assert not v.any(), key
        elif key.endswith("scale"):  # BatchNorm / LayerNorm weight: 1, or 0 for zero-gamma
            assert set(np.unique(v)) <= {0.0, 1.0}, key


def _zero_gamma_variables(model) -> dict:
    """The model's variables with every BatchNorm scale as its initialiser makes it (0 for zero-gamma,
    else 1) and everything else 0, from tracing init only (no compilation)."""
    zero = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, layers.BatchNorm) and context.method_name == "__call__":
            zero[tuple(context.module.scope.path)] = context.module.zero_init
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        shapes = jax.eval_shape(lambda k: model.init({"params": k}, jnp.zeros((1, 32, 32, 3)), train=False),
                                jax.random.key(0))

    def value(path, leaf):
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        is_scale = keys[0] == "params" and keys[-1] == "scale"
        return np.full(leaf.shape, float(is_scale and not zero.get(keys[1:-1], False)), leaf.dtype)

    return jax.tree_util.tree_map_with_path(value, shapes)


def _official_zero_gamma_keys(torch_model) -> set[str]:
    """The official `zero_last_gamma` rule applied to timm's port (same modules, timm's names): the
    last norm of every residual block with an identity shortcut."""
    import torch.nn as tnn
    from timm.models import efficientvit_mit as t

    keys = set()
    for name, m in torch_model.named_modules():
        if isinstance(m, t.ResidualBlock) and isinstance(m.shortcut, tnn.Identity):
            last = {t.DSConv: "point_conv", t.MBConv: "point_conv", t.FusedMBConv: "point_conv",
                    t.ConvBlock: "conv2", t.LiteMLA: "proj"}.get(type(m.main))
            if last is not None and isinstance(getattr(m.main, last).norm, tnn.BatchNorm2d):
                keys.add(f"{name}.main.{last}.norm.weight")
    return keys


def test_zero_gamma_of_the_initialised_model(b0_variables):
    """The traced initialisers (used for every model below) are what init produces."""
    traced = _leaves(_zero_gamma_variables(create_model("efficientvit_b0", conv_impl="lax"))["params"])
    real = _leaves(b0_variables["params"])
    scales = [key for key in real if key.endswith("/scale")]
    assert scales and any(not real[key].any() for key in scales)
    for key in scales:
        np.testing.assert_array_equal(real[key], traced[key], err_msg=key)


@pytest.mark.parametrize("variant", ["b0", "b3", "l1", "l3"])
def test_zero_gamma_exactly_where_the_official_rule_puts_it(variant, torch):
    import timm

    name = f"efficientvit_{variant}"
    expected = _official_zero_gamma_keys(timm.create_model(name, pretrained=False))
    state = convert.flax_to_torch(_zero_gamma_variables(create_model(name)), name, layout="timm")
    bn_weights = {k[:-len("running_mean")] + "weight" for k in state if k.endswith("running_mean")}
    zero = {k for k in bn_weights if not np.asarray(state[k]).any()}
    assert expected and zero == expected


# ---------------------------------------------------------------------------- drop path
def _residual_calls(model, res=32) -> list[tuple[tuple[str, ...], bool, float]]:
    """(module path, identity shortcut, drop_path_rate) of every Residual, in forward order."""
    calls = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, layers.Residual) and context.method_name == "__call__":
            m = context.module
            calls.append((tuple(m.scope.path), m.shortcut, m.drop_path_rate))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda k: model.init({"params": k, "dropout": k}, jnp.zeros((1, res, res, 3)), train=False),
                       jax.random.key(0))
    return calls


def _official_rates(calls, rate: float, skip: int) -> dict[tuple[str, ...], float]:
    """Official apply_droppath on `backbone.stages`: identity-residual blocks there, in depth order,
    the first `skip` exempt, then rate * (i + 1) / n."""
    valid = [path for path, shortcut, _ in calls if shortcut and path[1].startswith("stages_")]
    n = len(valid) - skip
    return {path: 0.0 if i < skip else rate * (i - skip + 1) / n for i, path in enumerate(valid)}


def _official_stage_block_count(timm_model, family: str) -> int:
    """Identity-residual blocks under the official `backbone.stages` (timm: `stages`, plus the L
    series' stem, which is the official `stages.0`)."""
    import torch.nn as tnn
    from timm.models import efficientvit_mit as t

    prefixes = ("stages.",) + (("stem.",) if family == "l" else ())
    return sum(1 for name, m in timm_model.named_modules()
               if name.startswith(prefixes) and isinstance(m, t.ResidualBlock) and isinstance(m.shortcut, tnn.Identity))


@pytest.mark.parametrize("name,rate,skip", [("efficientvit_b1", 0.05, 0), ("efficientvit_b3", 0.1, 0),
                                            ("efficientvit_l1", 0.1, 2), ("efficientvit_l2", 0.1, 3),
                                            ("efficientvit_v1_b1", 0.05, 0)])
def test_drop_path_rates_follow_the_official_rule(name, rate, skip, torch):
    import timm

    calls = _residual_calls(create_model(name, drop_path_rate=rate, drop_path_skip=skip))
    expected = _official_rates(calls, rate, skip)
    got = {path: r for path, shortcut, r in calls if shortcut}
    assert {p: got[p] for p in expected} == pytest.approx(expected)
    assert all(r == 0.0 for p, r in got.items() if p not in expected)  # the B input stem, nothing else
    if "v1" not in name:
        tm = timm.create_model(name, pretrained=False)
        assert len(expected) == _official_stage_block_count(tm, name.split("_")[-1][0])


def test_drop_probability_is_rate_times_progress():
    rate, n = 0.3, 200_000
    x = jnp.ones((n, 1))
    drop_path = layers.DropPath(rate)

    def dropped(progress):
        variables = {} if progress is None else layers.schedule_variables(progress)
        y = np.asarray(drop_path.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)}))
        p = (y == 0).mean()
        kept = np.unique(y[y != 0])
        return p, kept

    for progress, effective in ((0.0, 0.0), (0.25, 0.075), (0.5, 0.15), (1.0, 0.3), (None, 0.3), (1.7, 0.3),
                                (-0.5, 0.0)):
        p, kept = dropped(progress)
        assert abs(p - effective) <= 5 * np.sqrt(effective * (1 - effective) / n) + 1e-12, (progress, p)
        np.testing.assert_allclose(kept, [1 / (1 - effective)], rtol=1e-6)  # kept branches rescaled
    y = drop_path.apply(layers.schedule_variables(0.5), x, train=False)
    assert (np.asarray(y) == 1).all()  # train=False ignores the progress


FAMILIES = ["efficientvit_b1", "efficientvit_l1", "efficientvit_backbone_l0", "efficientvit_v1_b0",
            "efficientvit_seg_b0_cityscapes", "efficientvit_seg_l1_ade20k", "efficientvit_seg_v1_b1_ade20k"]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_drop_path_of_every_model_family_sees_the_progress(name):
    """Traced (no compilation): a training apply with the progress reaches every DropPath, with the
    value passed; an eval apply calls none."""
    model = create_model(name, drop_path_rate=0.1)
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, layers.DropPath) and context.method_name == "__call__":
            seen.append((args[1] if len(args) > 1 else kwargs["train"],
                         context.module.scope.root.get_variable(layers.SCHEDULE_COLLECTION, layers.PROGRESS)))
        return next_fun(*args, **kwargs)

    x = jnp.zeros((2, 32, 32, 3))
    variables = jax.eval_shape(lambda k: model.init({"params": k}, x, train=False), jax.random.key(0))
    expected = sum(shortcut and rate > 0 for _, shortcut, rate in _residual_calls(model))
    for train in (True, False):
        seen.clear()
        with nn.intercept_methods(record):
            jax.eval_shape(lambda v, p: model.apply({**v, **layers.schedule_variables(p)}, x, train=train,
                                                    rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"]),
                           variables, 0.5)
        assert len(seen) == expected > 0
        assert all(t == train and p is not None and p.shape == () for t, p in seen)


def test_progress_scales_drop_path_in_a_model():
    """EfficientViT-B0 (non-zero gammas so that every branch matters): progress 0 drops nothing (the
    model without drop path, exactly), progress 1 is the unscaled rates, eval ignores the progress."""
    model = create_model("efficientvit_b0", drop_path_rate=0.5, conv_impl="lax", zero_last_gamma=False)
    no_drop = create_model("efficientvit_b0", drop_path_rate=0.0, conv_impl="lax", zero_last_gamma=False)
    variables = _init(model)
    x = jax.random.normal(jax.random.key(2), (4, 32, 32, 3))
    rngs = {"dropout": jax.random.key(3)}

    def outputs(v, x):
        train = lambda m, extra: m.apply({**v, **extra}, x, train=True, rngs=rngs, mutable=["batch_stats"])[0]
        return (train(model, layers.schedule_variables(0.0)), train(no_drop, {}),
                train(model, layers.schedule_variables(1.0)), train(model, {}),
                model.apply({**v, **layers.schedule_variables(0.5)}, x, train=False), model.apply(v, x, train=False))

    at_0, without, at_1, unscaled, eval_p, eval_plain = map(np.asarray, _run_once(outputs, variables, x))
    np.testing.assert_array_equal(at_0, without)
    np.testing.assert_allclose(at_1, unscaled, rtol=1e-5, atol=1e-6)
    assert not np.allclose(at_1, without, atol=1e-3)
    np.testing.assert_array_equal(eval_p, eval_plain)


def test_bn_reestimation_mode_normalises_like_training_and_records_every_batchnorm(b0_variables):
    model = create_model("efficientvit_b0", conv_impl="lax")
    variables = b0_variables
    x = jax.random.normal(jax.random.key(4), (6, 32, 32, 3))

    def both(v, x):
        return (model.apply(v, x, train=True, mutable=["batch_stats"])[0],
                model.apply(v, x, train=False, mutable=[layers.BN_MOMENTS_COLLECTION]))

    trained, (out, moments) = _run_once(both, variables, x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(trained))
    stats_paths = {k.rsplit("/", 1)[0] for k in _leaves(variables["batch_stats"])}
    moment_keys = _leaves(moments[layers.BN_MOMENTS_COLLECTION])
    assert {k.rsplit("/", 1)[0] for k in moment_keys} == stats_paths
    assert {k.rsplit("/", 1)[1] for k in moment_keys} == {"mean", "var"}
    # The first BatchNorm sees the stem conv's output: its moments are that output's plain mean/variance.
    conv = jax.lax.conv_general_dilated(x, variables["params"]["backbone"]["input_stem_op_list_0"]["conv"]["kernel"],
                                        (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)
    conv = np.asarray(conv, np.float64)
    first = moments[layers.BN_MOMENTS_COLLECTION]["backbone"]["input_stem_op_list_0"]["norm"]
    np.testing.assert_allclose(first["mean"], conv.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first["var"], conv.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    assert set(variables) == {"params", "batch_stats"}  # init does not create the moments collection
