"""The training state: everything a resumed run needs besides the data-iterator position."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """One pytree, sharded as a whole by the loop and saved as a whole by the checkpointer.

    step:            number of optimizer updates done (int32 scalar).
    params:          float32 parameters (the model may compute in bfloat16).
    batch_stats:     BatchNorm running statistics (empty dict for norm-free models).
    opt_state:       optax state (AdamW moments mirror params and share their sharding).
    ema_params:      exponential moving average of params.
    ema_batch_stats: exponential moving average of batch_stats.
    rng:             raw uint32 PRNG key data; the key of step t is fold_in(rng, t), so the
                     randomness of a step depends only on the seed and t (exact resumes).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    ema_batch_stats: Any
    rng: jax.Array


def create_train_state(variables: dict, tx, rng_data: jax.Array) -> TrainState:
    """Builds the initial state from model variables (as returned by ``model.init``)."""
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=jax.tree_util.tree_map(jnp.copy, params),
        ema_batch_stats=jax.tree_util.tree_map(jnp.copy, batch_stats),
        rng=rng_data,
    )


def model_variables(state: TrainState, use_ema: bool = False) -> dict:
    """The variables dict to feed ``model.apply`` (raw or EMA weights)."""
    if use_ema:
        return {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
    return {"params": state.params, "batch_stats": state.batch_stats}
