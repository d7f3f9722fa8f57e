"""Schedule, EMA, weight-decay mask and clip-by-value of evit_jax.train.optim."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from evit_jax.train import optim


def _official_lr(k, peak, warmup, total):
    # efficientvit apps/utils/lr.py CosineLRwithWarmup with warmup_lr=0, one decay segment.
    if k < warmup:
        return peak * (k + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))


def test_schedule_matches_official_warmup_then_cosine():
    peak, warmup, total = 4e-3, 20, 120
    sched = optim.warmup_cosine_schedule(peak, warmup, total)
    got = np.array([float(sched(k)) for k in range(total)])
    want = np.array([_official_lr(k, peak, warmup, total) for k in range(total)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    assert got[warmup - 1] == pytest.approx(peak)
    assert float(sched(total)) == pytest.approx(0.0, abs=1e-12)  # ends at 0


def test_schedule_rejects_bad_lengths():
    with pytest.raises(ValueError):
        optim.warmup_cosine_schedule(1.0, 10, 5)
    with pytest.raises(ValueError):
        optim.warmup_cosine_schedule(1.0, 0, 0)


def test_peak_lr_rule():
    # official: init_lr = base_lr * world_size with 128 images per GPU.
    assert optim.peak_learning_rate(2.5e-4, 2048, 128) == pytest.approx(4e-3)


def test_ema_decay_formula():
    for t in (1, 10, 2000, 100000):
        assert float(optim.ema_decay(t, 0.9998, 2000.0)) == pytest.approx(0.9998 * (1 - math.exp(-t / 2000)), rel=1e-6)
    assert float(optim.ema_decay(0, 0.9998, 2000.0)) == 0.0  # first update copies the weights


def test_ema_update_official_rule():
    ema = {"w": jnp.array([1.0, 2.0]), "count": jnp.array(3, jnp.int32)}
    new = {"w": jnp.array([3.0, 6.0]), "count": jnp.array(7, jnp.int32)}
    out = optim.ema_update(ema, new, jnp.float32(0.75))
    np.testing.assert_allclose(out["w"], [1.0 - 0.25 * (1 - 3), 2.0 - 0.25 * (2 - 6)])
    assert int(out["count"]) == 7  # non-float leaves follow the model


def test_weight_decay_mask_excludes_norm_and_bias():
    params = {"backbone": {"conv": {"kernel": 0, "bias": 0}, "norm": {"scale": 0, "bias": 0}},
              "head": {"op_list_2": {"linear": {"kernel": 0}, "norm": {"LayerNorm_0": {"scale": 0}}}}}
    mask = optim.weight_decay_mask(params)
    assert mask["backbone"]["conv"]["kernel"] is True
    assert mask["backbone"]["conv"]["bias"] is False
    assert mask["backbone"]["norm"]["scale"] is False
    assert mask["head"]["op_list_2"]["linear"]["kernel"] is True
    assert mask["head"]["op_list_2"]["norm"]["LayerNorm_0"]["scale"] is False


def _optim_config(**kw):
    c = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1,
                                       no_decay_keys=("norm", "bias"), grad_clip_value=2.0))
    c.update(kw)
    return c


def test_optimizer_clips_by_value_and_masks_decay():
    params = {"conv": {"kernel": jnp.ones((3,)), "bias": jnp.ones((3,))}}
    grads = {"conv": {"kernel": jnp.array([10.0, -10.0, 0.5]), "bias": jnp.zeros((3,))}}
    tx = optim.create_optimizer(_optim_config(), lambda _: 1.0, params)
    # clip-by-value is the first transform: the gradient AdamW sees is clipped to [-2, 2].
    clipped, _ = optax.clip(2.0).update(grads, None)
    np.testing.assert_allclose(clipped["conv"]["kernel"], [2.0, -2.0, 0.5])
    updates, _ = tx.update(grads, tx.init(params), params)
    # First Adam step: m/sqrt(v) = sign(g) (bias corrected); + lr * wd * p on decayed params.
    np.testing.assert_allclose(updates["conv"]["kernel"], -(np.sign([2.0, -2.0, 0.5]) + 0.1), rtol=1e-4)
    np.testing.assert_allclose(updates["conv"]["bias"], 0.0, atol=1e-6)  # no grad, no decay
    # The same gradients unclipped would differ only through clipping, which Adam's scale
    # invariance hides on step 1; check step 2 sees clipped second moments.
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    adam_state = state[1][0]
    np.testing.assert_allclose(adam_state.mu["conv"]["kernel"], 0.1 * np.array([2.0, -2.0, 0.5]), rtol=1e-6)


def test_optimizer_without_clipping():
    params = {"kernel": jnp.ones((2,))}
    tx = optim.create_optimizer(_optim_config(grad_clip_value=0.0), lambda _: 1.0, params)
    state = tx.init(params)
    _, state = tx.update({"kernel": jnp.array([10.0, 1.0])}, state, params)
    np.testing.assert_allclose(state[0][0].mu["kernel"], [1.0, 0.1], rtol=1e-6)


@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_matches_torch_sgd(nesterov):
    """optim.name="sgd" (YOLOX's optimizer) against torch.optim.SGD over 4 steps with a varying lr: momentum,
    Nesterov, weight decay as L2 on the masked parameters only (YOLOX's pg0/pg1/pg2 groups); rtol 1e-6."""
    import torch

    rng = np.random.default_rng(0)
    params = {"conv": {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
                       "bias": rng.normal(size=(4,)).astype(np.float32)}}
    grads = [{"conv": {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params["conv"].items()}}
             for _ in range(4)]
    lrs = [0.1, 0.05, 0.02, 0.01]
    tx = optim.create_optimizer(_optim_config(name="sgd", momentum=0.9, nesterov=nesterov, weight_decay=5e-4,
                                              grad_clip_value=0.0), lambda step: jnp.asarray(lrs)[step], params)
    p = {"conv": {k: jnp.asarray(v) for k, v in params["conv"].items()}}
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)

    kernel, bias = (torch.tensor(params["conv"][k], requires_grad=True) for k in ("kernel", "bias"))
    opt = torch.optim.SGD([{"params": [kernel], "weight_decay": 5e-4}, {"params": [bias], "weight_decay": 0.0}],
                          lr=lrs[0], momentum=0.9, nesterov=nesterov)
    for lr, g in zip(lrs, grads):
        for group in opt.param_groups:
            group["lr"] = lr
        kernel.grad, bias.grad = torch.tensor(g["conv"]["kernel"]), torch.tensor(g["conv"]["bias"])
        opt.step()
    np.testing.assert_allclose(p["conv"]["kernel"], kernel.detach().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(p["conv"]["bias"], bias.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_unknown_optimizer_is_one_clear_error():
    with pytest.raises(ValueError, match=r"config.optim.name='lamb' is unknown; use one of \('adamw', 'sgd'\)"):
        optim.create_optimizer(_optim_config(name="lamb"), lambda _: 1.0, {"kernel": jnp.ones(2)})
