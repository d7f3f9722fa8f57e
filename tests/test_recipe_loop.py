"""The loop side of the official ImageNet recipe, in process on the tiny models (tests/_train_helpers.py):

- training progress: the official `RunConfig.progress` formula, and the value every DropPath sees in
  the train step (model.drop_path_scheduled);
- MESA: loss and gradients of a train step against the formula
  loss + ratio x BCE(outputs, sigmoid(EMA model, eval mode, on the same mixed batch)), written out here;
  no teacher term below the threshold;
- BatchNorm re-estimation: the re-estimated statistics against the plain mean / variance formula over the
  same images, computed here layer by layer; deterministic; EMA or raw weights only;
- per-class top-1 from the summed statistics against a count over the model's predictions.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests._train_helpers import TINY_EVIT, register_tiny_model

register_tiny_model()
from configs import demo  # noqa: E402
from evit_jax.data.transforms import normalize_images  # noqa: E402
from evit_jax.models import layers  # noqa: E402
from evit_jax.train import loop, optim  # noqa: E402
from evit_jax.train.state import model_variables  # noqa: E402

TOTAL, WARMUP = 20, 4


def _config(data_dir, **overrides):
    c = demo.get_config("smoke")
    c.data.data_dir = data_dir
    c.model.name = TINY_EVIT
    c.total_steps, c.warmup_steps = TOTAL, WARMUP
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _batch(experiment, seed=0):
    res = experiment.task.train_resolutions()[0]
    spec = experiment.task.train_batch_spec(experiment.config.global_batch_size, res)
    local = next(experiment.task.train_iterator(seed, experiment.local_batch_size(experiment.config.global_batch_size)))
    return experiment.global_batch(local, spec)


def _official_progress(step: int) -> float:
    """apps/trainer/run_config.py: max(0, global_step - warmup_steps) / (n_epochs * batch_per_epoch)."""
    return max(0, step - WARMUP) / (TOTAL - WARMUP)


def test_training_progress_is_the_official_formula(data_dir):
    e = loop.setup_experiment(_config(data_dir))
    for step in range(TOTAL + 1):
        assert float(e.training_progress(jnp.int32(step))) == pytest.approx(_official_progress(step), abs=1e-7)


def test_train_step_passes_the_progress_to_every_drop_path(data_dir):
    e = loop.setup_experiment(_config(data_dir, **{"model.drop_path_rate": 0.3, "model.drop_path_scheduled": True}))
    state, batch = e.init_state(), _batch(e)
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, layers.DropPath) and context.method_name == "__call__":
            seen.append(float(context.module.scope.root.get_variable(layers.SCHEDULE_COLLECTION, layers.PROGRESS)))
        return next_fun(*args, **kwargs)

    for step in (0, WARMUP, WARMUP + 3, TOTAL - 1):
        seen.clear()
        with nn.intercept_methods(record):  # eager: the values are concrete
            _, metrics = e.train_step(state.replace(step=jnp.int32(step)), batch)
        assert seen == [pytest.approx(_official_progress(step), abs=1e-7)], step
        assert float(metrics["progress"]) == pytest.approx(_official_progress(step), abs=1e-7)
    e = loop.setup_experiment(_config(data_dir, **{"model.drop_path_rate": 0.3}))  # not scheduled: unscaled rates
    seen.clear()
    with nn.intercept_methods(lambda f, a, k, ctx: seen.append(ctx.module.scope.root.get_variable(
            layers.SCHEDULE_COLLECTION, layers.PROGRESS)) or f(*a, **k) if isinstance(ctx.module, layers.DropPath)
            else f(*a, **k)):
        _, metrics = e.train_step(state, batch)
    assert seen == [None] and "progress" not in metrics


def _distinct_ema(state):
    """The EMA weights made different from the raw ones (a teacher that is not the student)."""
    noise = lambda x, i: x * 0.8 + 0.01 * jax.random.normal(jax.random.key(i), x.shape, x.dtype)
    leaves, tree = jax.tree_util.tree_flatten(state.ema_params)
    ema = jax.tree_util.tree_unflatten(tree, [noise(x, i) for i, x in enumerate(leaves)])
    stats = jax.tree_util.tree_map(lambda x: x + 0.1 if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                   state.ema_batch_stats)
    return state.replace(ema_params=ema, ema_batch_stats=stats)


@pytest.mark.parametrize("step", [WARMUP + 3, WARMUP + 8])  # progress 0.1875 (< 0.25: no MESA), 0.5
def test_mesa_loss_and_gradients_follow_the_formula(data_dir, step):
    ratio, threshold = 2.0, 0.25
    c = _config(data_dir, **{"mesa.ratio": ratio, "mesa.threshold": threshold, "mix.mixup_alpha": 0.5,
                             "mix.cutmix_alpha": 0.5, "loss.bce": True, "model.drop_path_rate": 0.2})
    e = loop.setup_experiment(c)
    state = _distinct_ema(e.init_state()).replace(step=jnp.int32(step))
    batch = _batch(e)
    new_state, metrics = jax.jit(e.train_step)(state, batch)

    # The formula, written out: the step's keys, the mixed batch, the teacher in eval mode.
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    aug_rng, dropout_rng = jax.random.split(rng)
    inputs, targets = e.task.preprocess_train(batch, aug_rng)
    teacher = e.model.apply(model_variables(state, use_ema=True), inputs, train=False)
    active = _official_progress(step) >= threshold

    def loss_fn(params):
        outputs, _ = e.model.apply({"params": params, "batch_stats": state.batch_stats}, inputs, train=True,
                                   mutable=["batch_stats"], rngs={"dropout": dropout_rng})
        plain = optax.sigmoid_binary_cross_entropy(outputs, targets["soft"]).mean()
        mesa = optax.sigmoid_binary_cross_entropy(outputs, jax.nn.sigmoid(teacher)).mean()
        return plain + (ratio * mesa if active else 0.0), mesa

    (loss, mesa), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, _ = e.tx.update(grads, state.opt_state, state.params)
    expected_params = optax.apply_updates(state.params, updates)

    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(metrics["teacher_loss"]) == (pytest.approx(float(mesa), rel=1e-5) if active else 0.0)
    assert active == (step == WARMUP + 8)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7),
                           new_state.params, expected_params)
    # The teacher's weights are only read: the EMA moves by its own update rule.
    decay = float(optim.ema_decay(step + 1, c.ema.decay, c.ema.warmup_steps))
    jax.tree_util.tree_map(
        lambda new, old, p: np.testing.assert_allclose(np.asarray(new), np.asarray(old - (1 - decay) * (old - p)),
                                                       rtol=1e-5, atol=1e-7),
        new_state.ema_params, state.ema_params, new_state.params)


def test_no_teacher_without_mesa(data_dir):
    """mesa.ratio 0 (the default): the train step never runs the EMA model and logs no teacher term."""
    e = loop.setup_experiment(_config(data_dir))
    assert e.task.teacher_weight(jnp.float32(1.0)) is None
    _, metrics = jax.jit(e.train_step)(e.init_state(), _batch(e))
    assert "teacher_loss" not in metrics and "progress" not in metrics


# ---------------------------------------------------------------------------- BN re-estimation
def _conv(x, kernel, stride):
    return np.asarray(jax.lax.conv_general_dilated(
        jnp.asarray(x, jnp.float32), kernel, (stride, stride), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST), np.float64)


def _reference_moments(params, images, eps):
    """tiny_test_evit's two BatchNorms on one batch, as the official reset_bn forward computes them:
    each normalises with its batch's mean / biased variance (float64 here)."""
    def bn(y, p):
        mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
        return (y - mean) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"]), mean, var

    x = np.asarray(normalize_images(jnp.asarray(images)), np.float64)
    stem, stem_mean, stem_var = bn(_conv(x, params["stem"]["conv"]["kernel"], 2), params["stem"]["norm"])
    stem = np.maximum(stem, 0.0)
    _, res_mean, res_var = bn(_conv(stem, params["res"]["main"]["conv"]["kernel"], 1), params["res"]["main"]["norm"])
    return {"stem": (stem_mean, stem_var), "res/main": (res_mean, res_var)}


def _trained_state(e):
    """A state whose raw and EMA weights differ and whose BN scales/biases are not 1/0."""
    state = _distinct_ema(e.init_state())
    bump = lambda t: jax.tree_util.tree_map(lambda x: x * 1.5 + 0.05, t)
    return state.replace(params=bump(state.params), ema_params=bump(state.ema_params))


@pytest.fixture(scope="module")
def reestimation(data_dir):
    c = _config(data_dir, **{"reset_bn.num_images": 48, "reset_bn.global_batch_size": 16})
    e = loop.setup_experiment(c)
    state = _trained_state(e)
    return e, state, e.reestimate_bn(state, use_ema=True)


def test_reestimated_statistics_are_the_mean_of_the_batch_moments(reestimation):
    e, state, new = reestimation
    batches = list(e.task.bn_reestimation_iterator(16))
    assert len(batches) == 3 and all(b["image"].shape == (16, 32, 32, 3) for b in batches)
    params = jax.device_get(state.ema_params)
    per_batch = [_reference_moments(params, b["image"], eps=1e-5) for b in batches]
    stats = jax.device_get(new.ema_batch_stats)
    for path in ("stem", "res/main"):
        node = stats
        for key in (path + "/norm").split("/"):
            node = node[key]
        np.testing.assert_allclose(node["mean"], np.mean([m[path][0] for m in per_batch], axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(node["var"], np.mean([m[path][1] for m in per_batch], axis=0), rtol=1e-5, atol=1e-6)
        old = state.ema_batch_stats
        for key in (path + "/norm").split("/"):
            old = old[key]
        assert int(node["num_batches_tracked"]) == int(old["num_batches_tracked"])  # kept, as the official code


def test_reestimation_touches_only_the_chosen_weights_and_is_deterministic(reestimation):
    e, state, new = reestimation
    same = lambda a, b: jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    same(new.params, state.params)
    same(new.batch_stats, state.batch_stats)
    same(new.ema_params, state.ema_params)
    same(e.reestimate_bn(state, use_ema=True).ema_batch_stats, new.ema_batch_stats)  # same images, same result
    same(e.reestimate_bn(new, use_ema=True).ema_batch_stats, new.ema_batch_stats)  # independent of the old stats
    raw = e.reestimate_bn(state, use_ema=False)
    same(raw.ema_batch_stats, state.ema_batch_stats)
    assert not np.allclose(raw.batch_stats["stem"]["norm"]["mean"], state.batch_stats["stem"]["norm"]["mean"])


def test_reestimation_images_are_a_fixed_subset_of_the_train_split(data_dir):
    c = _config(data_dir, **{"reset_bn.num_images": 1000, "reset_bn.global_batch_size": 16})
    e = loop.setup_experiment(c)
    indices = e.task.bn_reestimation_images(300)
    assert len(indices) == 288 and len(set(indices.tolist())) == 288  # capped at the split, whole batches
    np.testing.assert_array_equal(indices, e.task.bn_reestimation_images(300))
    c.unlock()
    c.reset_bn.global_batch_size = 400
    with pytest.raises(ValueError, match="reset_bn.global_batch_size=400 exceeds the training split's 300"):
        loop.setup_experiment(c)


# ---------------------------------------------------------------------------- per-class metrics
def test_per_class_top1_matches_the_predictions(data_dir):
    e = loop.setup_experiment(_config(data_dir, **{"per_class_metrics": True}))
    state = _trained_state(e)
    variables = model_variables(state)
    results = loop.evaluate(e, state, include_ema=False)
    predictions, labels = [], []
    for local in e.task.eval_iterator(e.local_batch_size(e.config.eval_batch_size)):
        real = local["mask"].astype(bool)
        inputs = normalize_images(jnp.asarray(local["image"]))
        predictions.append(np.argmax(np.asarray(e.model.apply(variables, inputs, train=False)), -1)[real])
        labels.append(local["label"][real])
    predictions, labels = np.concatenate(predictions), np.concatenate(labels)
    names = e.task.class_names()
    assert names[:3] == ["circle", "square", "triangle"]
    for c, name in enumerate(names):
        if (labels == c).any():
            assert results[f"eval/top1/{name}"] == pytest.approx(100 * np.mean(predictions[labels == c] == c))
        else:
            assert f"eval/top1/{name}" not in results
    assert results["eval/top1"] == pytest.approx(100 * np.mean(predictions == labels))


def test_per_class_names_are_unique(data_dir):
    """A name two classes share (ImageNet's two "crane"s) is followed by the class index."""
    import dataclasses

    e = loop.setup_experiment(_config(data_dir, **{"per_class_metrics": True}))
    names = ("n02012849", "cat", "n03126707") + tuple(f"c{i}" for i in range(7))  # synsets of both cranes
    e.task._info = dataclasses.replace(e.task.info, class_names=names)
    assert e.task.class_names()[:3] == ["crane (0)", "cat", "crane (2)"]
