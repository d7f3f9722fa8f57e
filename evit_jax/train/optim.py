"""Optimizer, learning-rate schedule, weight-decay mask and EMA (the official ImageNet recipe;
SGD with momentum for YOLOX's detection recipe, see :func:`create_optimizer`).

Recipe (mit-han-lab/efficientvit `apps/trainer`, `apps/utils/{lr,ema}.py`):
* AdamW(b1=0.9, b2=0.999, eps=1e-8), weight decay 0.1, none on parameters whose name
  contains "norm" or "bias".
* Gradients clipped BY VALUE to [-2, 2] before the update (``clip_grad_value_``).
* lr: linear warmup ``lr * (k+1) / warmup`` for optimizer steps k < warmup, then one cosine
  from lr to 0 over the remaining steps, stepped per iteration.
* EMA of params and BN statistics with decay ``0.9998 * (1 - exp(-t / 2000))`` where t is
  the number of optimizer updates done so far (1 after the first one).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax


def warmup_cosine_schedule(peak_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """lr for optimizer step k (0-based): linear warmup to peak_lr, then cosine to 0 at total_steps."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}.")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must lie in [0, total_steps={total_steps}].")
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak_lr * (step + 1.0) / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        cos = 0.5 * peak_lr * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(step < warmup_steps, warm, cos)

    return schedule


def weight_decay_mask(params: Any, no_decay_keys: Sequence[str] = ("norm", "bias")) -> Any:
    """True for parameters that get weight decay: none whose path mentions any no_decay_key.

    Mirrors the official rule ``any(key in name for key in no_wd_keys)`` on the
    PyTorch-named parameter path (Flax paths mirror it: ``.../norm/scale``, ``.../bias``).
    """
    def decays(path, _):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        return not any(key in name for key in no_decay_keys)

    return jax.tree_util.tree_map_with_path(decays, params)


def peak_learning_rate(base_lr: float, global_batch: int, reference_batch: int) -> float:
    """The official rule init_lr = base_lr * world_size with 128 images per GPU, written as
    base_lr * global_batch / reference_batch (reference_batch=128)."""
    return base_lr * global_batch / reference_batch


OPTIMIZERS = ("adamw", "sgd")


def create_optimizer(optim_config: Any, schedule: optax.Schedule, params: Any) -> optax.GradientTransformation:
    """clip-by-value -> the optimizer ``optim_config.name`` with the weight-decay mask:

    * "adamw": AdamW (decoupled weight decay, scaled by the lr), the official EfficientViT recipe;
    * "sgd": PyTorch's ``torch.optim.SGD(momentum, nesterov, weight_decay)`` (YOLOX's optimizer): the
      decay is L2 added to the gradient before the momentum, buffer = momentum * buffer + gradient,
      update = lr * (gradient + momentum * buffer) with nesterov, else lr * buffer.
    """
    name = getattr(optim_config, "name", "adamw")
    if name not in OPTIMIZERS:
        raise ValueError(f"config.optim.name={name!r} is unknown; use one of {OPTIMIZERS}.")
    mask = weight_decay_mask(params, tuple(optim_config.no_decay_keys))
    parts = []
    if optim_config.grad_clip_value and optim_config.grad_clip_value > 0:
        parts.append(optax.clip(optim_config.grad_clip_value))
    if name == "sgd":
        if optim_config.weight_decay:
            parts.append(optax.add_decayed_weights(optim_config.weight_decay, mask))
        parts.append(optax.sgd(learning_rate=schedule, momentum=optim_config.momentum or None,
                               nesterov=bool(optim_config.nesterov)))
    else:
        parts.append(
            optax.adamw(
                learning_rate=schedule,
                b1=optim_config.b1,
                b2=optim_config.b2,
                eps=optim_config.eps,
                weight_decay=optim_config.weight_decay,
                mask=mask,
            )
        )
    return optax.chain(*parts)


def ema_decay(num_updates: jax.Array, decay: float, warmup_steps: float) -> jax.Array:
    """0.9998 * (1 - exp(-t / 2000)) in the official recipe; t = optimizer updates done."""
    t = jnp.asarray(num_updates, jnp.float32)
    return decay * -jnp.expm1(-t / warmup_steps)  # 1 - exp(-x) without float32 cancellation


def ema_update(ema_tree: Any, new_tree: Any, decay: jax.Array) -> Any:
    """ema <- ema - (1 - decay) * (ema - new), on every floating leaf (as the official update)."""
    def one(e, n):
        if not jnp.issubdtype(e.dtype, jnp.floating):
            return n
        return (e - (1.0 - decay) * (e - n.astype(e.dtype))).astype(e.dtype)

    return jax.tree_util.tree_map(one, ema_tree, new_tree)
