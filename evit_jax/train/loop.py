"""The ONE train/eval loop. Task-agnostic: everything task-specific comes from a
:class:`evit_jax.tasks.base.Task`.

Order of business in :func:`train_and_evaluate`:
1. validate everything that can be wrong (task/model/dataset, batch vs devices, workdir vs
   model, init_from path) - one clear error before any work or any write;
2. build the mesh, the abstract state and its shardings (parameters and optimizer state
   sharded by the rule table in ``mesh.py``);
3. resume from the latest checkpoint in WORKDIR (onto the current mesh) or initialise
   (optionally from converted weights);
4. compile one train step per training resolution (ahead of time, logging compile time and
   memory) and the eval step;
5. loop: next local batch -> global array -> compiled step; log, checkpoint, evaluate, stop
   cleanly on SIGTERM; final checkpoint, final evaluation, summary line.

A workdir whose latest checkpoint is the last step does not train: after 1-2 it reports the
final evaluation logged in metrics.jsonl or, if the run stopped before logging it, restores the
checkpoint and runs only that evaluation; the train step is never compiled.
"""

from __future__ import annotations

import contextlib
import concurrent.futures
import dataclasses
import functools
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from evit_jax.models import layers
from evit_jax.tasks import get_task
from evit_jax.tasks.base import Task
from evit_jax.tasks.config import schedule_lengths
from evit_jax.train import checkpoint as ckpt_lib
from evit_jax.train import exact_sum
from evit_jax.train import mesh as mesh_lib
from evit_jax.train import metrics_log
from evit_jax.train import optim
from evit_jax.train.state import TrainState, create_train_state, model_variables


# ---------------------------------------------------------------------------- setup
def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


@dataclasses.dataclass
class Experiment:
    """Everything derived from a config, before any data is read or state is created."""

    config: Any
    task: Task
    model: Any
    mesh: jax.sharding.Mesh
    tx: optax.GradientTransformation
    schedule: Callable
    peak_lr: float
    total_steps: int
    warmup_steps: int
    state_shardings: Any
    abstract_state: Any  # ShapeDtypeStructs carrying the target shardings
    # Eval executables by Task.eval_batch_key, compiled on first use and kept for later evaluations.
    eval_executables: dict = dataclasses.field(default_factory=dict)
    # Seconds each compilation took, by its description ("train step 224x224", "eval step 224x224").
    compile_seconds: dict = dataclasses.field(default_factory=dict)

    @property
    def strategy(self) -> str:
        return self.config.sharding.strategy

    def local_batch_size(self, global_batch: int) -> int:
        return global_batch // mesh_lib.process_count(self.mesh)

    # -- state ---------------------------------------------------------------
    def _init_fn(self, key_data):
        key = jax.random.wrap_key_data(key_data)
        init_key, train_key = jax.random.split(key)
        h, w = self.task.train_resolutions()[0]
        variables = self.model.init({"params": init_key, "dropout": init_key},
                                    jnp.zeros((1, h, w, 3), jnp.float32), train=False)
        return create_train_state(dict(variables), self.tx, jax.random.key_data(train_key))

    def init_state(self) -> TrainState:
        """Fresh state, created directly with its target shardings (never fully on one device)."""
        key_data = jax.random.key_data(jax.random.key(int(self.config.seed)))
        lowered = jax.jit(self._init_fn, out_shardings=self.state_shardings).lower(key_data)
        return lowered.compile(compiler_options=_run_once_compiler_options())(key_data)

    def state_from_variables(self, state: TrainState, loaded: dict) -> TrainState:
        """Replaces params/batch_stats (and their EMA) of ``state`` by loaded variables.

        Every leaf must match in path and shape; with ``reinit_classifier`` the task's final
        classifier may differ (kept freshly initialised), which is how a model is fine-tuned
        to another number of classes.
        """
        reinit = bool(self.config.reinit_classifier)
        fresh = {"params": state.params, "batch_stats": state.batch_stats}
        loaded = {"params": loaded.get("params", {}), "batch_stats": loaded.get("batch_stats", {})}
        fresh_flat = {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(fresh)[0]}
        loaded_flat = {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
        missing = sorted(set(fresh_flat) - set(loaded_flat))
        kept_fresh = [p for p in missing if self.task.keeps_fresh_init(p)]
        missing = [p for p in missing if p not in kept_fresh]
        unexpected = sorted(set(loaded_flat) - set(fresh_flat))
        mismatched = []
        for path in sorted(set(fresh_flat) & set(loaded_flat)):
            if tuple(fresh_flat[path].shape) != tuple(np.shape(loaded_flat[path])):
                stripped = path.split("/", 1)[1]
                if reinit and self.task.is_classifier_param(stripped):
                    kept_fresh.append(path)
                else:
                    mismatched.append(f"{path} {tuple(np.shape(loaded_flat[path]))} vs model {tuple(fresh_flat[path].shape)}")
        if missing or unexpected or mismatched:
            hint = ("" if reinit else " (to fine-tune to another number of classes set --config.reinit_classifier=True)")
            raise ValueError(
                f"init_from={self.config.init_from!r} does not fit {self.task.model_name} with "
                f"{getattr(self.task, 'num_classes', '?')} classes: "
                f"shape mismatches {mismatched[:5]}, missing {missing[:5]}, unexpected {unexpected[:5]}{hint}.")
        if kept_fresh:
            logging.warning("Kept the fresh initialisation of %d variables not taken from init_from: %s",
                            len(kept_fresh), kept_fresh[:8])

        def pick(path, f):
            p = _path_str(path)
            return f if p in kept_fresh else jax.device_put(np.asarray(loaded_flat[p], f.dtype), f.sharding)

        new = jax.tree_util.tree_map_with_path(pick, fresh)
        params, batch_stats = new["params"], new["batch_stats"]
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
        copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)
        return state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state,
                             ema_params=copy(params), ema_batch_stats=copy(batch_stats))

    # -- steps ---------------------------------------------------------------
    def training_progress(self, step: jax.Array) -> jax.Array:
        """The official trainer's progress (`RunConfig.progress`) at the forward pass of the step
        that follows ``step`` completed updates: 0 during warmup, then the share of the decay
        steps done, ``max(0, step - warmup) / (total - warmup)`` (1 after the last update)."""
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        done = jnp.maximum(jnp.asarray(step, jnp.float32) - self.warmup_steps, 0.0)
        return jnp.minimum(done / decay_steps, 1.0)

    def _whole(self, variables: Any) -> Any:
        """``variables`` as every forward pass must see them under ``strategy=fsdp`` (ZeRO-3): each
        parameter gathered whole for the computation (in the backward the compiler all-reduces the
        whole gradient and keeps each device's shard; docs/aot.md); unchanged otherwise. Left to
        choose, XLA moves activations instead: for a kernel sharded on its input dimension, and for
        every depthwise kernel of a forward that reads sharded weights (L1-L3's EMA teacher re-laid
        each expanded MBConv activation from batch- to channel-sharded with all-to-alls)."""
        if self.strategy != "fsdp":
            return variables
        return jax.lax.with_sharding_constraint(variables, mesh_lib.replicated_sharding(self.mesh))

    def _teacher_term(self, state: TrainState, inputs: Any, outputs: Any, weight: jax.Array) -> jax.Array:
        """task.teacher_loss against the EMA model (eval mode, no gradient) on the same inputs;
        the EMA forward runs only while ``weight`` > 0 (0 otherwise)."""
        def with_teacher():
            teacher = self.model.apply(self._whole(model_variables(state, use_ema=True)), inputs, train=False)
            return jnp.asarray(self.task.teacher_loss(outputs, jax.lax.stop_gradient(teacher)), jnp.float32)

        return jax.lax.cond(weight > 0, with_teacher, lambda: jnp.zeros((), jnp.float32))

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One optimizer update on a global batch (traced under jit).

        With ``model.drop_path_scheduled`` the model's drop-path rates are scaled by the training
        progress (passed as `layers.schedule_variables`); a task with a teacher term
        (:meth:`Task.teacher_weight`) gets the EMA model's outputs on the same inputs."""
        cfg = self.config
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        aug_rng, dropout_rng = jax.random.split(rng)
        inputs, targets = self.task.preprocess_train(batch, aug_rng)
        progress = self.training_progress(state.step)
        schedule = layers.schedule_variables(progress) if cfg.model.drop_path_scheduled else {}
        teacher_weight = self.task.teacher_weight(progress)

        def loss_fn(params):
            params = self._whole(params)
            outputs, mutated = self.model.apply(
                {"params": params, "batch_stats": state.batch_stats, **schedule}, inputs, train=True,
                mutable=["batch_stats"], rngs={"dropout": dropout_rng})
            loss, metrics = self.task.train_loss_and_metrics(outputs, targets, state.step)
            if teacher_weight is not None:
                teacher_loss = self._teacher_term(state, inputs, outputs, teacher_weight)
                loss = loss + teacher_weight * teacher_loss
                metrics = dict(metrics, loss=loss, teacher_loss=teacher_loss)
            if schedule or teacher_weight is not None:
                metrics = dict(metrics, progress=progress)
            return loss, (metrics, mutated.get("batch_stats", {}))

        (_, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        decay = optim.ema_decay(step, cfg.ema.decay, cfg.ema.warmup_steps)
        new_state = state.replace(
            step=step, params=params, batch_stats=batch_stats, opt_state=opt_state,
            ema_params=optim.ema_update(state.ema_params, params, decay),
            ema_batch_stats=optim.ema_update(state.ema_batch_stats, batch_stats, decay))
        metrics = dict(metrics)
        metrics["lr"] = self.schedule(state.step)
        metrics["grad_norm"] = optax.global_norm(grads)
        return new_state, metrics

    def eval_step(self, variables: dict, batch: dict) -> tuple[dict, dict, jax.Array | None]:
        """(summable statistics, per-example records, mask) of one global eval batch (traced
        under jit; outputs replicated). Without records (the default) the mask is None."""
        inputs, targets = self.task.preprocess_eval(batch)
        outputs = self.model.apply(self._whole(variables), inputs, train=False)
        stats = self.task.eval_statistics(outputs, targets, batch["mask"])
        records = dict(self.task.eval_records(outputs, targets, batch) or {})
        size = batch["mask"].shape[0]
        wrong = {k: tuple(v.shape) for k, v in records.items() if v.ndim == 0 or v.shape[0] != size}
        if wrong:
            raise ValueError(f"{type(self.task).__name__}.eval_records must return arrays whose leading "
                             f"axis is the global eval batch ({size}); got shapes {wrong}.")
        return stats, records, (batch["mask"] if records else None)

    @functools.cached_property
    def _sum_jits(self) -> tuple[Callable, Callable]:
        replicated = mesh_lib.replicated_sharding(self.mesh)
        return (jax.jit(exact_sum.start, out_shardings=replicated),
                jax.jit(exact_sum.add, out_shardings=replicated))

    def accumulate(self, sums: Any | None, stats: dict) -> Any:
        """Device-side exact running sum of replicated eval statistics (``sums`` None: start)."""
        start, add = self._sum_jits
        return start(stats) if sums is None else add(sums, stats)

    def _batch_abstract(self, spec: dict) -> dict:
        sharding = mesh_lib.batch_sharding(self.mesh)
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in spec.items()}

    @functools.cached_property
    def _train_jit(self):
        replicated = mesh_lib.replicated_sharding(self.mesh)
        return jax.jit(self.train_step, in_shardings=(self.state_shardings, mesh_lib.batch_sharding(self.mesh)),
                       out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))

    def _lower_train_step(self, res) -> tuple[str, Any, float]:
        spec = self._batch_abstract(self.task.train_batch_spec(self.config.global_batch_size, res))
        t0 = time.perf_counter()
        lowered = self._train_jit.lower(self.abstract_state, spec)
        return f"train step {res[0]}x{res[1]}", lowered, time.perf_counter() - t0

    def compile_train_step(self, res) -> Any:
        """The AOT-compiled train step for batches of resolution ``res`` (state donated)."""
        return self._compile_logged(*self._lower_train_step(res))

    def compile_train_steps(self) -> dict:
        """One AOT-compiled executable per training resolution (state donated). The steps are traced
        one after the other and compiled concurrently (XLA compiles outside the GIL): on a host with
        cores to spare a multi-resolution recipe starts in about its slowest compile, not the sum."""
        lowered = [self._lower_train_step(res) for res in self.task.train_resolutions()]
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(lowered)) as pool:
            compiled = list(pool.map(lambda args: self._compile_logged(*args), lowered))
        return dict(zip(self.task.train_resolutions(), compiled))

    @functools.cached_property
    def _eval_jit(self):
        variables_sh = {"params": self.state_shardings.params, "batch_stats": self.state_shardings.batch_stats}
        return jax.jit(self.eval_step, in_shardings=(variables_sh, mesh_lib.batch_sharding(self.mesh)),
                       out_shardings=mesh_lib.replicated_sharding(self.mesh))

    def eval_executable(self, key) -> tuple[Any, dict]:
        """(compiled eval step, global batch spec) for batches of ``key`` (:meth:`Task.eval_batch_key`):
        compiled on first use, then reused. Every process asks for the same keys in the same
        order (the tasks' eval iterators yield the same shapes at the same batch index)."""
        if key not in self.eval_executables:
            abstract_vars = {"params": self.abstract_state.params, "batch_stats": self.abstract_state.batch_stats}
            spec = self.task.eval_batch_spec(self.config.eval_batch_size, key)
            t0 = time.perf_counter()
            lowered = self._eval_jit.lower(abstract_vars, self._batch_abstract(spec))
            compiled = self._compile_logged(f"eval step {_describe_key(key)}", lowered, time.perf_counter() - t0)
            self.eval_executables[key] = (compiled, spec)
        return self.eval_executables[key]

    def compile_eval_steps(self) -> None:
        """Compiles the eval step of every key the task will produce (start-up, fail fast)."""
        for key in self.task.eval_batch_keys():
            self.eval_executable(key)

    # -- BatchNorm re-estimation (official reset_bn) ----------------------------
    def _bn_moments(self, variables: dict, batch: dict) -> dict:
        """Every BatchNorm's batch mean and biased variance over one global batch, each BatchNorm
        normalising with its batch's statistics and the rest of the model in eval mode, as the
        official reset_bn forward (traced under jit; the means are over the global batch, i.e.
        synchronised across devices and hosts)."""
        inputs = self.task.preprocess_bn_reestimation(batch)
        _, moments = self.model.apply(self._whole(variables), inputs, train=False,
                                      mutable=[layers.BN_MOMENTS_COLLECTION])
        return moments.get(layers.BN_MOMENTS_COLLECTION, {})

    @functools.cached_property
    def bn_reestimation_executable(self) -> tuple[Any, dict]:
        """(compiled moments step, global batch spec) of the re-estimation pass (compiled once)."""
        spec = self.task.bn_reestimation_batch_spec(self.task.bn_reestimation_batch_size())
        variables_sh = {"params": self.state_shardings.params, "batch_stats": self.state_shardings.batch_stats}
        jitted = jax.jit(self._bn_moments, in_shardings=(variables_sh, mesh_lib.batch_sharding(self.mesh)),
                         out_shardings=mesh_lib.replicated_sharding(self.mesh))
        abstract_vars = {"params": self.abstract_state.params, "batch_stats": self.abstract_state.batch_stats}
        t0 = time.perf_counter()
        lowered = jitted.lower(abstract_vars, self._batch_abstract(spec))
        return self._compile_logged("BN re-estimation step", lowered, time.perf_counter() - t0), spec

    def reestimate_bn(self, state: TrainState, *, use_ema: bool) -> TrainState:
        """``state`` with the BatchNorm statistics of its EMA (``use_ema``) or raw weights replaced by
        re-estimated ones, when the task asks for it (:meth:`Task.bn_reestimation_batch_size`); else
        ``state`` itself. As the official reset_bn: every BatchNorm's running mean / variance become
        the means over the pass's batches of its batch mean / biased batch variance; the other
        statistics (num_batches_tracked) are kept. Deterministic for the run's seed (same images),
        and the same on any device/process layout up to float32 reduction order."""
        global_batch = self.task.bn_reestimation_batch_size()
        if not global_batch:
            return state
        t0 = time.perf_counter()
        compiled, spec = self.bn_reestimation_executable
        variables = model_variables(state, use_ema=use_ema)
        sums, batches = None, 0
        for local in self.task.bn_reestimation_iterator(self.local_batch_size(global_batch)):
            sums = self.accumulate(sums, compiled(variables, self.global_batch(local, spec)))
            batches += 1
        if batches == 0:
            raise ValueError("the BatchNorm re-estimation pass yielded no batches.")
        moments = {_path_str(p): v / batches for p, v in
                   jax.tree_util.tree_flatten_with_path(exact_sum.to_host(jax.device_get(sums)))[0]}
        name = "ema_batch_stats" if use_ema else "batch_stats"
        stats, shardings = getattr(state, name), getattr(self.state_shardings, name)
        unknown = set(moments) - {_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(stats)[0]}
        if unknown:
            raise ValueError(f"BatchNorm moments without running statistics: {sorted(unknown)[:5]}.")
        if not moments:
            logging.warning("BN re-estimation: the model has no evit_jax BatchNorm; statistics unchanged.")

        def pick(path, old, sharding):
            new = moments.get(_path_str(path))
            return old if new is None else jax.device_put(np.asarray(new, old.dtype), sharding)

        new_stats = jax.tree_util.tree_map_with_path(pick, stats, shardings)
        logging.info("Re-estimated the BatchNorm statistics of the %s weights on %d batches of %d images (%.1fs)",
                     "EMA" if use_ema else "raw", batches, global_batch, time.perf_counter() - t0)
        return state.replace(**{name: new_stats})

    def global_batch(self, local: dict, spec: dict) -> dict:
        """Local numpy batch -> global batch-sharded arrays, cast to the compiled keys/dtypes."""
        local_spec = {k: np.dtype(v.dtype) for k, v in spec.items()}
        missing = set(local_spec) - set(local)
        if missing:
            raise ValueError(f"the data pipeline's batch lacks {sorted(missing)} (has {sorted(local)}).")
        return mesh_lib.global_batch_from_local(
            {k: np.asarray(local[k], dtype) for k, dtype in local_spec.items()}, self.mesh)

    def _compile_logged(self, what: str, lowered, lower_seconds: float):
        """Compiles a lowered step; records (compile_seconds) and logs the time, tracing included."""
        t0 = time.perf_counter()
        compiled = lowered.compile()
        seconds = self.compile_seconds[what] = lower_seconds + time.perf_counter() - t0
        mem = compiled.memory_analysis()
        if mem is not None:
            logging.info("Compiled %s in %.1fs; per-device memory: arguments %.1f MiB, outputs %.1f MiB, "
                         "temporaries %.1f MiB, code %.1f MiB", what, seconds,
                         mem.argument_size_in_bytes / 2**20, mem.output_size_in_bytes / 2**20,
                         mem.temp_size_in_bytes / 2**20, mem.generated_code_size_in_bytes / 2**20)
        else:
            logging.info("Compiled %s in %.1fs", what, seconds)
        return compiled


def _run_once_compiler_options() -> dict:
    # Code that runs once (initialisers) need not be optimised: on XLA:CPU this cuts the
    # compile time of an init from ~10 s to ~1 s.
    return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}


def _describe_key(key) -> str:
    """(512, 704) -> "512x704"; ((512, 704), (512, 683)) -> "512x704 / 512x683"."""
    if isinstance(key, tuple) and key and all(isinstance(k, tuple) for k in key):
        return " / ".join(_describe_key(k) for k in key)
    if isinstance(key, tuple):
        return "x".join(str(k) for k in key)
    return str(key)


def partner_blocks(config, mesh) -> int:
    """The equal blocks of the global batch within which device-side code pairs examples (mixup /
    cutmix partners), so that no pair crosses a device: one per device, or ``mix.partner_blocks``
    when set (a multiple of the device count that divides the global batch; the same draws on any
    layout). One ValueError otherwise."""
    devices = int(mesh.devices.size)
    blocks = int(config.mix.partner_blocks) if "mix" in config else 0
    if not blocks:
        return devices
    if blocks < 0 or blocks % devices or config.global_batch_size % blocks:
        raise ValueError(f"mix.partner_blocks={blocks} must be a multiple of the {devices} devices that divides "
                         f"global_batch_size={config.global_batch_size}; set it so, or 0 (one block per device).")
    return blocks


def _check_config(config) -> None:
    if config.mode not in ("train", "eval"):
        raise ValueError(f"config.mode={config.mode!r} is unknown; use 'train' or 'eval'.")
    if config.log_every_steps <= 0:
        raise ValueError(f"config.log_every_steps={config.log_every_steps} must be positive.")
    if config.model.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.model.dtype={config.model.dtype!r}; use 'float32' or 'bfloat16'.")
    if config.optim.name not in optim.OPTIMIZERS:
        raise ValueError(f"config.optim.name={config.optim.name!r} is unknown; use one of {optim.OPTIMIZERS}.")
    from evit_jax.convert import hub  # train may import convert (layering)

    if config.init_from and hub.is_hub_spec(config.init_from):
        hub.find_weights(config.init_from)  # a name with published weights (one-line ValueError otherwise)
    elif config.init_from and not os.path.exists(os.path.expanduser(config.init_from)):
        raise FileNotFoundError(f"init_from={config.init_from!r} does not exist; give a converted "
                                "checkpoint (.pt/.pth/.safetensors), an Orbax variables directory or hub:NAME.")


def setup_experiment(config, devices=None, *, published_facts: bool = False) -> Experiment:
    """Validates the config and derives mesh, optimizer, schedule and abstract sharded state.

    ``devices`` defaults to all devices of all processes (the abstract devices of a TPU topology
    plan a run for that slice: `evit_jax.aot`). ``published_facts``: the dataset's facts come from
    `DatasetTask.use_published_facts` instead of the prepared data. Raises one clear error
    (ValueError/FileNotFoundError) for anything that cannot run.
    """
    # Cheap checks first: the config alone, then against the devices, and only then the dataset
    # (which may have to be built or read from remote storage).
    _check_config(config)
    task = get_task(config)
    task.check_config()
    if published_facts:
        if not hasattr(task, "use_published_facts"):
            raise ValueError(f"the {task.name} task cannot plan a run without its data.")
        task.use_published_facts()
    mesh = mesh_lib.create_mesh(config.sharding.strategy, config.sharding.fsdp_size, devices)
    task.batch_shards = partner_blocks(config, mesh)
    mesh_lib.check_batch_divisible(config.global_batch_size, mesh, "batch size (global_batch_size)")
    mesh_lib.check_batch_divisible(config.eval_batch_size, mesh, "eval batch size (eval_batch_size)")
    if task.bn_reestimation_batch_size():
        mesh_lib.check_batch_divisible(task.bn_reestimation_batch_size(), mesh,
                                       "BatchNorm re-estimation batch (reset_bn.global_batch_size)")
    task.check_data()
    total, warmup = schedule_lengths(config, task.num_train_examples())
    peak_lr = optim.peak_learning_rate(config.optim.base_lr, config.global_batch_size, config.optim.lr_reference_batch)
    schedule = optim.warmup_cosine_schedule(peak_lr, warmup, total)
    model = task.create_model()
    experiment = Experiment(config, task, model, mesh, None, schedule, peak_lr, total, warmup, None, None)
    key_data = jax.random.key_data(jax.random.key(0))
    # The weight-decay mask needs the parameter tree; build it from the abstract init.
    abstract_vars = jax.eval_shape(
        lambda k: model.init({"params": jax.random.wrap_key_data(k), "dropout": jax.random.wrap_key_data(k)},
                             jnp.zeros((1, *task.train_resolutions()[0], 3), jnp.float32), train=False), key_data)
    experiment.tx = optim.create_optimizer(config.optim, schedule, abstract_vars["params"])
    abstract_state = jax.eval_shape(experiment._init_fn, key_data)
    experiment.state_shardings = mesh_lib.tree_shardings(abstract_state, mesh, config.sharding.strategy)
    experiment.abstract_state = _abstract(abstract_state, experiment.state_shardings)
    return experiment


def _load_variables(config, task: Task) -> dict:
    """Converted weights for ``init_from``, as the task reads them (Task.load_init_variables)."""
    from evit_jax.convert import resolve_checkpoint  # hub:NAME -> downloaded and converted once

    return task.load_init_variables(resolve_checkpoint(config.init_from), use_ema=bool(config.init_use_ema))


# ---------------------------------------------------------------------------- evaluation
def _weight_set_names(include_ema: bool) -> tuple[str, ...]:
    """Prefixes of the evaluated weight sets' metrics: "eval" (raw) and "eval_ema"."""
    return ("eval", "eval_ema") if include_ema else ("eval",)


class _RecordCollector:
    """The per-example eval records of one weight set, in eval-batch order, real examples only.

    Each batch's (replicated) records start copying to the host when the batch is dispatched
    and are read one batch later, so the copy overlaps the next batch. The local copy of a
    replicated array holds the whole global batch, so every process collects all records.
    """

    def __init__(self):
        self._in_flight = None
        self._parts: list[dict[str, np.ndarray]] = []

    def add(self, records: dict, mask: jax.Array | None) -> None:
        if not records:
            return
        local = ({k: v.addressable_data(0) for k, v in records.items()}, mask.addressable_data(0))
        for array in jax.tree_util.tree_leaves(local):
            array.copy_to_host_async()
        self._collect()
        self._in_flight = local

    def _collect(self) -> None:
        if self._in_flight is not None:
            records, mask = jax.device_get(self._in_flight)
            real = np.asarray(mask).astype(bool)
            self._parts.append({k: np.asarray(v)[real] for k, v in records.items()})
            self._in_flight = None

    def result(self) -> dict[str, np.ndarray]:
        self._collect()
        if not self._parts:
            return {}
        return {k: np.concatenate([part[k] for part in self._parts]) for k in self._parts[0]}


def evaluate(experiment: Experiment, state: TrainState, *, include_ema: bool) -> dict[str, float]:
    """One pass over the eval split; returns {"eval/top1": ..., "eval_ema/top1": ...}.

    Per-batch statistics are computed on the global (sharded) batch inside jit, so they are
    already summed over devices and hosts; they are summed over batches on the device, exactly
    (`exact_sum`), and fetched once at the end: without per-example records
    (:meth:`Task.eval_records`) the loop never waits for the host. Each batch runs the
    executable of its shapes (``Experiment.eval_executable``).
    """
    task, config = experiment.task, experiment.config
    weights = {name: model_variables(state, use_ema=name == "eval_ema") for name in _weight_set_names(include_ema)}
    sums = {name: None for name in weights}
    records = {name: _RecordCollector() for name in weights}
    t0 = time.perf_counter()
    for local in task.eval_iterator(experiment.local_batch_size(config.eval_batch_size)):
        eval_exec, spec = experiment.eval_executable(task.eval_batch_key(local))
        batch = experiment.global_batch(local, spec)
        for name, variables in weights.items():
            stats, batch_records, mask = eval_exec(variables, batch)
            sums[name] = experiment.accumulate(sums[name], stats)
            records[name].add(batch_records, mask)
    if any(s is None for s in sums.values()):
        raise ValueError("the evaluation split yielded no batches.")
    host_sums = jax.device_get(sums)  # the one fetch of the statistics
    results = {}
    for name in weights:
        for k, v in task.finalize_eval(exact_sum.to_host(host_sums[name]), records[name].result()).items():
            results[f"{name}/{k}"] = v
    logging.info("Evaluation (%.1fs): %s", time.perf_counter() - t0, _summary(results))
    for table in _breakdown_tables(results):
        logging.info("%s", table)
    return results


def _summary(metrics: dict[str, float]) -> str:
    """The top-level metrics ("<weight set>/<name>") as one line, ``eval/top1=... eval_ema/top1=...``;
    the breakdowns ("eval/top1/<class>") are left to :func:`_breakdown_tables`."""
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.count("/") <= 1)


def _breakdown_tables(metrics: dict[str, float]) -> list[str]:
    """One text table per broken-down metric ("<weight set>/<metric>/<part>", e.g. the per-class
    "eval/top1/cat"): a row per part, a column per weight set."""
    groups: dict[str, dict[str, dict[str, float]]] = {}
    for key, value in metrics.items():
        if key.count("/") >= 2:
            weights, metric, part = key.split("/", 2)
            groups.setdefault(metric, {}).setdefault(part, {})[weights] = value
    tables = []
    for metric, rows in groups.items():
        columns = sorted({w for row in rows.values() for w in row})
        width = max(len(metric), *(len(part) for part in rows))
        lines = [f"{metric:<{width}}  " + "  ".join(f"{c:>9}" for c in columns)]
        lines += [f"{part:<{width}}  " + "  ".join(f"{row[c]:9.2f}" if c in row else f"{'-':>9}" for c in columns)
                  for part, row in rows.items()]
        tables.append("\n".join(lines))
    return tables


def _restore_for_eval(experiment: Experiment, workdir: str, step: int) -> TrainState:
    """The state of checkpoint ``step`` (without the data iterator) on the current mesh."""
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=experiment.config.checkpoint.keep, async_save=False)
    try:
        return checkpointer.restore(step, experiment.abstract_state, None)
    finally:
        checkpointer.close()


def _write_metrics(workdir: str, config, step: int, metrics: dict[str, float]) -> None:
    writer = metrics_log.MetricWriter(workdir, 0, enable_tensorboard=config.tensorboard, progress_bar=False)
    writer.write(step, metrics)
    writer.close()


def _print_final(step: int, total: int, elapsed: float, preempted: bool, metrics: dict[str, float]) -> str:
    """The run's summary line on stdout (``FINAL step=... wall_s=... eval/top1=...``)."""
    summary = _summary(metrics)
    print(f"FINAL step={step} total_steps={total} wall_s={elapsed:.1f} preempted={preempted} {summary}", flush=True)
    return summary


# ---------------------------------------------------------------------------- train
def _guard(config):
    return jax.transfer_guard("disallow") if config.transfer_guard else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@contextlib.contextmanager
def _not_train_time(throughput: metrics_log.Throughput, state: TrainState):
    """Evaluation and checkpoint saving are not train time: the steps dispatched so far finish
    first (they are), then the block's time is left out of images/s and the ETA."""
    jax.block_until_ready(state)
    with throughput.paused():
        yield


def _logged_final_evaluation(workdir: str, step: int, include_ema: bool) -> dict[str, float] | None:
    """The final evaluation logged at ``step`` in WORKDIR/metrics.jsonl, or None when a weight
    set's metrics are missing there (the run stopped between its last save and that log).
    Process 0's reading decides on every process, so that all of them agree to evaluate."""
    names = _weight_set_names(include_ema)
    logged = metrics_log.read_logged(workdir, step)
    final = {k: v for k, v in logged.items() if k.split("/", 1)[0] in names}
    complete = all(any(k.startswith(name + "/") for k in final) for name in names)
    if jax.process_count() > 1:
        complete = bool(multihost_utils.broadcast_one_to_all(np.int32(complete)))
    return final if complete else None


def _finish_completed_run(experiment: Experiment, workdir: str, t_start: float) -> dict[str, float]:
    """A workdir whose latest checkpoint is the run's last step: no training (the train step
    is not even compiled). Reports the final evaluation already logged in metrics.jsonl or,
    when the run stopped before logging it, runs only that evaluation and logs it."""
    config, total = experiment.config, experiment.total_steps
    final = _logged_final_evaluation(workdir, total, bool(config.eval_ema))
    if final is None:
        logging.info("The checkpoint of the last step (%d) has no final evaluation in %s: evaluating it.",
                     total, workdir)
        experiment.compile_eval_steps()
        state = _restore_for_eval(experiment, workdir, total)
        with _guard(config):
            state = experiment.reestimate_bn(state, use_ema=bool(config.eval_ema))  # as saved: idempotent
            final = evaluate(experiment, state, include_ema=bool(config.eval_ema))
        _write_metrics(workdir, config, total, final)
    else:
        logging.info("The run in %s is complete (checkpoint of the last step, %d): its final evaluation.",
                     workdir, total)
    elapsed = time.perf_counter() - t_start
    summary = _print_final(total, total, elapsed, False, final)
    logging.info("Done: step %d/%d in %.1fs (%s). %s", total, total, elapsed, experiment.task.model_name, summary)
    return final


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Trains (resuming from WORKDIR if it holds a checkpoint) and returns the final metrics.

    Starting a finished run again is safe: a workdir whose latest checkpoint is the last step
    only reports (or, if it is missing, computes) the final evaluation."""
    t_start = time.perf_counter()
    experiment = setup_experiment(config)
    task = experiment.task
    total = experiment.total_steps
    ckpt_lib.check_workdir(workdir, task.model_name, task.name)
    resume_step = ckpt_lib.latest_complete_step(workdir)
    if resume_step is not None and resume_step > total:
        raise ValueError(f"workdir {workdir!r} holds the checkpoint of step {resume_step}, past this run's "
                         f"{total} steps; evaluate it with --config.mode=eval, train longer with "
                         f"--config.total_steps>={resume_step}, or use another --workdir.")
    if resume_step == total:
        return _finish_completed_run(experiment, workdir, t_start)
    if resume_step is None and config.init_from:
        loaded = _load_variables(config, task)
    else:
        loaded = None
    # ---- everything above validated; now write and work.
    ckpt_lib.write_run_info(workdir, task.model_name, task.name, config.to_json())
    mesh = experiment.mesh
    logging.info("Mesh %s over %d devices in %d processes; strategy=%s; global batch %d; "
                 "%d steps (%d warmup), peak lr %.3g", dict(mesh.shape), mesh.devices.size,
                 jax.process_count(), experiment.strategy, config.global_batch_size,
                 total, experiment.warmup_steps, experiment.peak_lr)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    local_batch = experiment.local_batch_size(config.global_batch_size)
    train_iter = task.train_iterator(int(config.seed), local_batch)

    if resume_step is not None:
        logging.info("Resuming from the checkpoint of step %d in %s", resume_step, checkpointer.directory)
        state = checkpointer.restore(resume_step, experiment.abstract_state, train_iter)
    else:
        state = experiment.init_state()
        if loaded is not None:
            state = experiment.state_from_variables(state, loaded)
            logging.info("Initialised from %s", config.init_from)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    logging.info("%s: %.2fM parameters", task.model_name, n_params / 1e6)

    train_execs = experiment.compile_train_steps()
    experiment.compile_eval_steps()
    if task.bn_reestimation_batch_size():
        _ = experiment.bn_reestimation_executable  # compiled at start-up too (fail fast)
    specs = {res: task.train_batch_spec(config.global_batch_size, res) for res in train_execs}

    start_step = int(jax.device_get(state.step))
    writer = metrics_log.MetricWriter(workdir, total, enable_tensorboard=config.tensorboard)
    writer.set_start(start_step)
    throughput = metrics_log.Throughput(start_step, total)
    preemption = ckpt_lib.PreemptionHandler()
    pending: list[dict] = []
    final_metrics: dict[str, float] = {}
    step = start_step
    preempted = False
    try:
        with _guard(config):
            while step < total:
                if preemption.should_stop(step):
                    preempted = True
                    break
                local = next(train_iter)
                res = task.batch_resolution(local)
                if res not in train_execs:
                    raise ValueError(f"the pipeline produced a {res} batch; compiled resolutions: {list(train_execs)}.")
                batch = experiment.global_batch(local, specs[res])
                state, metrics = train_execs[res](state, batch)
                step += 1
                pending.append(metrics)
                if step % config.log_every_steps == 0 or step == total:
                    logged = metrics_log.summarize_window(jax.device_get(pending))
                    pending = []
                    img_s, eta = throughput.report(step, config.global_batch_size)
                    logged["train/images_per_s"] = img_s
                    writer.write(step, logged)
                    metrics_log.log_line(step, total, logged, img_s, eta)
                    writer.progress(step, {"loss": logged["train/loss"], "lr": logged["train/lr"]})
                eval_due = config.eval_every_steps > 0 and step % config.eval_every_steps == 0 and step < total
                if eval_due:  # before a save of the same step: the checkpoint holds what training continues with
                    with _not_train_time(throughput, state):
                        state = experiment.reestimate_bn(state, use_ema=bool(config.eval_ema))
                if config.checkpoint.every_steps > 0 and step % config.checkpoint.every_steps == 0 and step < total:
                    with _not_train_time(throughput, state):
                        checkpointer.save(step, state, train_iter)
                if eval_due:
                    with _not_train_time(throughput, state):
                        results = evaluate(experiment, state, include_ema=config.eval_ema)
                    writer.write(step, results)
        if preempted:
            logging.warning("Preempted at step %d: saving a checkpoint and exiting.", step)
            checkpointer.save(step, state, train_iter, force=True)  # a no-op if step is saved already
            checkpointer.wait()
        else:
            state = experiment.reestimate_bn(state, use_ema=bool(config.eval_ema))
            checkpointer.save(step, state, train_iter, force=True)
            final_metrics = evaluate(experiment, state, include_ema=config.eval_ema)
            writer.write(step, final_metrics)
    finally:
        checkpointer.close()
        writer.close()
        preemption.restore_handler()
    elapsed = time.perf_counter() - t_start
    summary = _print_final(step, total, elapsed, preempted, final_metrics)
    logging.info("Done%s: step %d/%d in %.1fs (%s). %s", " (preempted)" if preempted else "",
                 step, total, elapsed, task.model_name, summary)
    return final_metrics


# ---------------------------------------------------------------------------- eval mode
def evaluate_only(config, workdir: str) -> dict[str, float]:
    """--config.mode=eval: evaluates the latest checkpoint in WORKDIR (raw and EMA weights) or,
    without one, the converted weights given by init_from."""
    experiment = setup_experiment(config)
    task = experiment.task
    ckpt_lib.check_workdir(workdir, task.model_name, task.name)
    step = ckpt_lib.latest_complete_step(workdir)
    if step is None and not config.init_from:
        raise FileNotFoundError(f"nothing to evaluate: workdir {workdir!r} has no checkpoint and "
                                "--config.init_from is empty.")
    loaded = _load_variables(config, task) if step is None else None
    experiment.compile_eval_steps()
    if step is not None:
        state = _restore_for_eval(experiment, workdir, step)
        include_ema = bool(config.eval_ema)
        logging.info("Evaluating the checkpoint of step %d", step)
    else:
        state = experiment.state_from_variables(experiment.init_state(), loaded)
        include_ema = False
        step = 0
        logging.info("Evaluating %s", config.init_from)
    with _guard(config):
        if loaded is None:  # a training checkpoint: evaluated as training evaluates (published weights as they are)
            state = experiment.reestimate_bn(state, use_ema=include_ema)
        results = evaluate(experiment, state, include_ema=include_ema)
    _write_metrics(workdir, config, step, results)
    print("FINAL " + _summary(results), flush=True)
    return results


def run(config, workdir: str) -> dict[str, float]:
    """Dispatches on config.mode."""
    if config.mode == "eval":
        return evaluate_only(config, workdir)
    _check_config(config)
    return train_and_evaluate(config, workdir)
