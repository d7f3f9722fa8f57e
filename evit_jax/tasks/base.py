"""The task interface: everything the generic train/eval loop needs to know about a task.

The loop (`evit_jax/train/loop.py`) is task-agnostic. It owns the mesh, the optimizer, the
jit-compiled steps, checkpoints and logging; a :class:`Task` owns the data, the model, the
preprocessing, the loss and the metrics. A new task (e.g. segmentation in
`evit_jax/tasks/segmentation.py`) plugs in by subclassing :class:`Task` and registering
itself in `evit_jax/tasks/__init__.py` (``TASKS``); the loop is never touched.

Two kinds of methods
--------------------
*Host side* (plain Python, called once or per batch outside jit):

* :meth:`Task.check_config` - validate the config alone (its keys: exactly the common keys plus the
  task's section of `evit_jax/tasks/config.py`; model name known and of this task; sizes...) and
  raise ONE clear ValueError; no I/O, so the loop runs it before anything else (with the checks of
  the batch size against the devices) - a mistake is reported in a second, before any dataset is
  built or read.
* :meth:`Task.check_data` - the checks that need the dataset (present, has the splits, matches the
  model): ONE clear ValueError/FileNotFoundError (with the command that prepares a missing one).
* :meth:`Task.create_model` - the Flax module.
* :meth:`Task.train_iterator` / :meth:`Task.eval_iterator` - this process's share of the
  data as batches of numpy arrays (``local_batch_size`` examples each). The train iterator
  is infinite, deterministic for a seed and checkpointable (``get_state``/``set_state``,
  i.e. a ``grain.DatasetIterator``); it may change the resolution from batch to batch but
  must pick the same resolution on every process for a given step. The eval iterator is
  one pass over this process's shard, padded to full batches, each batch carrying a
  ``"mask"`` array (1 = real example, 0 = padding).
* :meth:`Task.train_batch_spec` / :meth:`Task.eval_batch_spec` - the GLOBAL shapes and
  dtypes of a batch at a resolution / eval key (``jax.ShapeDtypeStruct`` per key); the loop
  compiles one executable per training resolution ahead of time and one per eval key on
  first use, and casts incoming numpy batches to exactly these keys and dtypes.
* :meth:`Task.batch_resolution` / :meth:`Task.eval_batch_key` - which resolution (train) or
  eval key a numpy batch has (selects the executable). The eval iterator may change shapes
  from batch to batch (segmentation evaluates every image at its own size) but must yield
  the same shapes at the same batch index on every process.
* :meth:`Task.finalize_eval` - turn the summed statistics (and the per-example records, if
  the task has any) of a whole evaluation into metrics.

*Device side* (traced inside ``jax.jit`` on GLOBAL, batch-sharded ``jax.Array`` s; they must
be pure jnp code, with no Python control flow on values):

* :meth:`Task.preprocess_train` - ``(batch, rng) -> (inputs, targets)``: uint8 -> normalised
  float, plus task augmentations that are cheap on device (mixup/cutmix for
  classification). ``rng`` is the step's key, identical on every process. Code that combines
  examples must keep them within one of the :attr:`Task.batch_shards` equal contiguous blocks of
  the batch (one per device, set by the loop from the mesh): indexing across blocks makes XLA
  gather the whole global batch onto every device.
* :meth:`Task.preprocess_eval` - ``batch -> (inputs, targets)``, deterministic.
* :meth:`Task.loss_and_metrics` - ``(outputs, targets) -> (scalar loss, {name: scalar})``,
  averaged over the global batch (train batches are never padded).
* :meth:`Task.train_loss_and_metrics` (optional) - the same at a given optimizer step (a traced
  int32 scalar: the updates done before this one, which is also the index of the batch in the
  train stream, the ``step`` a train transform may take, see `evit_jax/data/pipeline.py`), for a
  loss that changes during the run (detection's L1 term of the last epochs). The step of a
  point of the run comes from `evit_jax.tasks.config.schedule_lengths`, as the loop's schedule.
  Default: :meth:`Task.loss_and_metrics`.
* :meth:`Task.eval_statistics` - ``(outputs, targets, mask) -> {name: array}`` of per-batch
  SUMMABLE statistics (counts, sums, per-class histograms...) that ignore padded examples
  (``mask == 0``). Summing them over batches gives exact global statistics across devices
  and hosts: the loop sums on the device, integers exactly and floats with compensated
  summation (`evit_jax/train/exact_sum.py`), and hands ``finalize_eval`` int64/float64 sums;
  use integer dtypes for counts.
* :meth:`Task.eval_records` (optional) - ``(outputs, targets, batch) -> {name: array}`` of
  PER-EXAMPLE outputs (leading axis = the global batch) for evaluations that are not sums of
  statistics, e.g. object detection, whose COCO evaluation needs every detection. It is traced
  in the same eval step; the loop copies the records of every batch to the host while the next
  batch runs, keeps the real examples only (``mask == 1``), concatenates them over the split in
  the order of the eval batches, on every process, and passes them to ``finalize_eval``. That
  order is the split's order for one-shape eval iterators (``pipeline.make_eval_iterator``);
  bucketed iterators order by bucket, so a task that matches records to examples records an id
  taken from the batch. Default: no records (nothing is fetched per batch).
* :meth:`Task.teacher_weight` / :meth:`Task.teacher_loss` (optional) - a loss term computed from the
  EMA model's outputs (self-distillation; MESA in the ImageNet recipe): at training progress ``p``
  (:meth:`Experiment.training_progress`, a traced scalar), the loop runs the EMA weights in eval mode on
  the step's inputs, without gradient and only while ``teacher_weight(p) > 0``, and adds
  ``teacher_weight(p) * teacher_loss(outputs, teacher_outputs)`` to the loss. Default: no teacher.
* BatchNorm re-estimation before evaluation (optional; official ``reset_bn``):
  :meth:`Task.bn_reestimation_batch_size` > 0 makes the loop recompute the evaluated weights' BN
  statistics from :meth:`Task.bn_reestimation_iterator` (inputs from
  :meth:`Task.preprocess_bn_reestimation`) before every evaluation. Default: off.

Model contract: ``outputs = model.apply(variables, inputs, train=..., ...)`` is whatever the
task's model returns (logits for classification, stride-8 logits for segmentation).
"""

from __future__ import annotations

import abc
import os
from typing import Any, Hashable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from evit_jax.models import create_model, get_model_spec, list_models

Batch = Mapping[str, Any]
Resolution = tuple[int, int]


class Task(abc.ABC):
    """Base class of all tasks. ``config`` is the full (locked) ml_collections run config."""

    #: registry name, e.g. "classification".
    name: str = ""
    #: the number of equal contiguous blocks the global batch is split into, one per device (set by
    #: the loop from the mesh before compiling; the same on every process for a given mesh size).
    batch_shards: int = 1

    def __init__(self, config):
        self.config = config

    # ------------------------------------------------------------------ host side
    def check_config(self) -> None:
        """Raise one clear ValueError if the config alone cannot run (no I/O)."""
        from evit_jax.tasks.config import check_keys

        check_keys(self.config)

    @abc.abstractmethod
    def check_data(self) -> None:
        """Raise one clear error if the dataset cannot serve this config (missing, wrong splits...)."""

    @abc.abstractmethod
    def create_model(self) -> nn.Module:
        """The Flax module (compute dtype from config.model.dtype, float32 params)."""

    @property
    @abc.abstractmethod
    def model_name(self) -> str:
        """Canonical model name (stored in the workdir to refuse mixing checkpoints)."""

    @abc.abstractmethod
    def num_train_examples(self) -> int:
        """Size of the training split (epochs -> steps for the schedule)."""

    @abc.abstractmethod
    def train_resolutions(self) -> list[Resolution]:
        """Every (H, W) the train iterator may produce (one compiled step per entry)."""

    @abc.abstractmethod
    def train_iterator(self, seed: int, local_batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Infinite, checkpointable iterator over this process's training batches."""

    @abc.abstractmethod
    def eval_iterator(self, local_batch_size: int) -> Iterable[dict[str, np.ndarray]]:
        """One padded pass over this process's shard of the eval split (batches carry "mask")."""

    @abc.abstractmethod
    def train_batch_spec(self, global_batch_size: int, resolution: Resolution) -> dict[str, jax.ShapeDtypeStruct]:
        """Global shapes/dtypes of a training batch at ``resolution``."""

    @abc.abstractmethod
    def eval_batch_keys(self) -> list[Hashable]:
        """Every key the eval iterator will produce (the loop compiles them before training,
        so that a shape that cannot compile fails at start-up)."""

    def eval_batch_key(self, batch: Batch) -> Hashable:
        """Which compiled eval step a local numpy eval batch needs (the loop compiles one per
        key, on first use); default: the batch's resolution (:meth:`batch_resolution`)."""
        return self.batch_resolution(batch)

    @abc.abstractmethod
    def eval_batch_spec(self, global_batch_size: int, key: Hashable) -> dict[str, jax.ShapeDtypeStruct]:
        """Global shapes/dtypes of an eval batch of ``key`` (must include "mask")."""

    def batch_resolution(self, batch: Batch) -> Resolution:
        """The (H, W) of a numpy batch; default: the "image" array's spatial shape."""
        image = batch["image"]
        return int(image.shape[1]), int(image.shape[2])

    def is_classifier_param(self, path: str) -> bool:
        """True for parameters of the final classifier (re-initialised on request when the
        number of classes of loaded weights differs). ``path`` is "a/b/kernel"."""
        return False

    def load_init_variables(self, path: str, use_ema: bool = False) -> dict:
        """Variables for ``--config.init_from`` (converted PyTorch weights or an Orbax dir).

        Default: the task's own model, with its number of classes; with ``reinit_classifier``
        a checkpoint with another number of classes (e.g. ImageNet's 1000) is accepted and its
        classifier is replaced by the loop. Tasks that can start from another model's weights
        (segmentation, detection from an ImageNet backbone: :class:`BackboneInitMixin`) override this and
        :meth:`keeps_fresh_init`.
        """
        from evit_jax.convert import load_variables  # tasks may import convert (layering)

        num_classes = getattr(self, "num_classes", None)
        try:
            return load_variables(path, self.model_name, use_ema=use_ema, num_classes=num_classes)
        except ValueError:
            if not self.config.reinit_classifier:
                raise
        # The checkpoint with its own classifier (any width); a body that does not fit is the error.
        own = self._stored_num_classes(path, use_ema)
        try:
            return load_variables(path, self.model_name, use_ema=use_ema, num_classes=own)
        except ValueError as e:
            raise ValueError(str(e)) from None

    def _stored_num_classes(self, path: str, use_ema: bool) -> int | None:
        """The classifier width of a PyTorch checkpoint file of this model (None: a converted directory,
        which records it, or no classifier found: the model's default)."""
        from evit_jax.convert import detect_layout, extract_state_dict, key_table, read_checkpoint

        if os.path.isdir(path):
            return None
        try:
            state_dict = extract_state_dict(read_checkpoint(path), use_ema)
        except ValueError:
            return None
        for entry in key_table(self.model_name, detect_layout(state_dict, self.model_name)):
            classifier = entry.flax_path[0] == "params" and self.is_classifier_param("/".join(entry.flax_path[1:]))
            if classifier and entry.flax_path[-1] == "bias" and entry.torch_key in state_dict:
                return int(np.shape(state_dict[entry.torch_key])[0])
        return None

    def keeps_fresh_init(self, path: str) -> bool:
        """True for variables that ``init_from`` weights may lack and that keep their fresh
        initialisation (``path`` is "params/..." or "batch_stats/..."). Default: none."""
        return False

    @abc.abstractmethod
    def finalize_eval(self, sums: Mapping[str, np.ndarray],
                      records: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Metrics from the statistics summed over the whole eval set (:meth:`eval_statistics`,
        as int64/float64) and the per-example records of its real examples (:meth:`eval_records`,
        concatenated over the split; empty for a task without records)."""

    # ------------------------------------------------------------------ device side
    @abc.abstractmethod
    def preprocess_train(self, batch: Batch, rng: jax.Array) -> tuple[Any, Any]:
        """(inputs, targets) for a training step; runs inside jit."""

    @abc.abstractmethod
    def preprocess_eval(self, batch: Batch) -> tuple[Any, Any]:
        """(inputs, targets) for evaluation; runs inside jit."""

    @abc.abstractmethod
    def loss_and_metrics(self, outputs: Any, targets: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Scalar training loss and scalar train metrics; runs inside jit."""

    def train_loss_and_metrics(self, outputs: Any, targets: Any, step: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The training loss of optimizer step ``step`` (traced int32: updates done so far, the index of
        the batch in the train stream); runs inside jit. Default: :meth:`loss_and_metrics`, whatever
        the step."""
        del step
        return self.loss_and_metrics(outputs, targets)

    @abc.abstractmethod
    def eval_statistics(self, outputs: Any, targets: Any, mask: jax.Array) -> dict[str, jax.Array]:
        """Per-batch summable statistics ignoring padded examples; runs inside jit."""

    def eval_records(self, outputs: Any, targets: Any, batch: Batch) -> dict[str, jax.Array] | None:
        """Per-example eval outputs ``{name: array}`` whose leading axis is the global batch
        (padding included: the loop drops it), for :meth:`finalize_eval`; runs inside jit.
        Default None: the task's evaluation is a sum of :meth:`eval_statistics`."""
        return None

    # ------------------------------------------------------------------ optional hooks
    def teacher_weight(self, progress: jax.Array) -> jax.Array | None:
        """Device side: the weight of the EMA-teacher loss term at training ``progress`` (a traced
        float32 scalar in [0, 1]); the loop runs the teacher only while it is > 0. Default None:
        the task has no teacher term (the loop never runs the EMA model in a train step)."""
        return None

    def teacher_loss(self, outputs: Any, teacher_outputs: Any) -> jax.Array:
        """Device side: the scalar teacher term from the student's ``outputs`` and the EMA model's
        (eval mode, no gradient) ``teacher_outputs`` on the same inputs; needed when
        :meth:`teacher_weight` is not None."""
        raise NotImplementedError(f"{type(self).__name__} declares a teacher weight but no teacher_loss.")

    def bn_reestimation_batch_size(self) -> int:
        """Global batch size of the BatchNorm re-estimation pass before every evaluation; 0 (default):
        no re-estimation. Must divide by the devices and processes (checked with the other batches)."""
        return 0

    def bn_reestimation_iterator(self, local_batch_size: int) -> Iterable[dict[str, np.ndarray]]:
        """This process's batches of the re-estimation pass: finite, the same images and augmentations
        at every call (deterministic for the run's seed), the same number and shapes on every process."""
        raise NotImplementedError(f"{type(self).__name__} re-estimates BatchNorm but has no images for it.")

    def bn_reestimation_batch_spec(self, global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Global shapes/dtypes of a re-estimation batch."""
        raise NotImplementedError

    def preprocess_bn_reestimation(self, batch: Batch) -> Any:
        """Device side: the model inputs of a re-estimation batch (deterministic)."""
        raise NotImplementedError


class DatasetTask(Task):
    """A task reading one dataset of `evit_jax.data.sources` (``config.data.name`` in
    ``config.data.data_dir``) with a model of the zoo (``config.model.name``)."""

    def __init__(self, config):
        super().__init__(config)
        self._info = None
        self.published_facts = False

    def use_published_facts(self) -> None:
        """From now on the dataset's facts (classes, split sizes, keys, eval image sizes) come from
        `sources.published_info` (the real datasets' published figures, the generated datasets'
        builder configs, or ``config.model.num_classes`` for another name), not from the prepared
        data: for planning a run where the data is not (`evit_jax.aot`). Raises one ValueError when
        the dataset's facts are not known that way."""
        from evit_jax.data import sources

        d = self.config.data
        self._info = sources.published_info(d.name, task=self.name, num_classes=self.config.model.num_classes,
                                            splits=(d.train_split, d.eval_split))
        self.published_facts = True

    @property
    def data_dir(self) -> str:
        return os.path.expanduser(self.config.data.data_dir)

    @property
    def info(self):
        """The dataset's `sources.DatasetInfo` (classes, split sizes, ignore index), read once."""
        from evit_jax.data import sources

        if self._info is None:
            self._info = sources.get_info(self.config.data.name, self.data_dir)
        return self._info

    @property
    def num_classes(self) -> int:
        """config.model.num_classes when set (> 0), else the dataset's."""
        n = self.config.model.num_classes
        return int(n) if n and n > 0 else self.info.num_classes

    @property
    def model_name(self) -> str:
        return get_model_spec(self.config.model.name).name

    def check_config(self) -> None:
        super().check_config()
        spec = get_model_spec(self.config.model.name)  # ValueError (with close matches) on an unknown name
        if spec.task != self.name:
            raise ValueError(f"model {spec.name!r} is a {spec.task} model; the {self.name} task needs one of "
                             f"{', '.join(list_models(self.name))}.")

    def check_data(self) -> None:
        """The dataset exists (FileNotFoundError with the command that prepares it), is of this task
        and has the configured splits."""
        info = self.info
        if info.task != self.name:
            raise ValueError(f"dataset {info.name!r} is a {info.task} dataset, not {self.name}.")
        for split in (self.config.data.train_split, self.config.data.eval_split):
            if split.split("[")[0] not in info.split_sizes:
                raise ValueError(f"dataset {info.name!r} has no split {split!r}; splits: {sorted(info.split_sizes)}.")

    def check_num_classes(self) -> None:
        """config.model.num_classes is the dataset's or -1 (tasks whose model must predict exactly the
        dataset's classes call it from check_data)."""
        c, info = self.config, self.info
        if c.model.num_classes > 0 and c.model.num_classes != info.num_classes:
            raise ValueError(f"config.model.num_classes={c.model.num_classes} but dataset {info.name!r} has "
                             f"{info.num_classes} classes; use -1 (the dataset's).")

    def dataset_class_names(self) -> list[str]:
        """The dataset's class names when it names every class of the model, else ``class_<i>``."""
        names = self.info.class_names
        if names is not None and len(names) == self.num_classes:
            return list(names)
        return [f"class_{i}" for i in range(self.num_classes)]

    def create_model(self) -> nn.Module:
        """The zoo model of config.model (compute dtype from config.model.dtype, float32 params)."""
        m = self.config.model
        return create_model(m.name, num_classes=self.num_classes, dtype=jnp.dtype(m.dtype),
                            param_dtype=jnp.float32, attention=m.attention,
                            drop_path_rate=m.drop_path_rate, drop_path_skip=m.drop_path_skip,
                            conv_impl=m.conv_impl)

    def num_train_examples(self) -> int:
        from evit_jax.data import sources

        d = self.config.data
        if not self.published_facts:
            return len(sources.get_source(d.name, d.train_split, self.data_dir))
        if "[" in d.train_split:
            raise ValueError(f"the published facts know whole splits, not {d.train_split!r}; "
                             "give the schedule with --config.total_steps=N.")
        return self.info.split_sizes[d.train_split]


class BackboneInitMixin:
    """``init_from`` for the dense tasks (segmentation, detection): a checkpoint of the task's own
    model loads whole; a CLASSIFICATION (or bare backbone) checkpoint of the same variant loads only
    the backbone, and the rest of the model (neck, head) keeps its fresh initialisation."""

    def load_init_variables(self, path: str, use_ema: bool = False) -> dict:
        """Variables for ``--config.init_from``: the task's own model as :meth:`Task.load_init_variables`
        reads it; else ``{"params": {"backbone": ...}, "batch_stats": {"backbone": ...}}`` from the
        ``efficientvit_<variant>`` classifier or backbone. One ValueError listing every attempt when
        nothing fits."""
        from absl import logging

        from evit_jax.convert import load_variables  # tasks may import convert (layering)

        spec = get_model_spec(self.model_name)
        self._backbone_only = False
        try:
            return super().load_init_variables(path, use_ema)
        except ValueError as e:
            errors = [f"as {spec.name}: {e}"]
        for candidate in (f"efficientvit_{spec.variant}", f"efficientvit_backbone_{spec.variant}"):
            try:
                loaded = load_variables(path, candidate, use_ema=use_ema)
            except ValueError as e:
                errors.append(f"as {candidate}: {e}")
                continue
            params, stats = loaded.get("params", {}), loaded.get("batch_stats", {})
            logging.info("init_from %s: %s checkpoint, loading only its backbone into %s.", path, candidate, spec.name)
            self._backbone_only = True
            return {"params": {"backbone": params.get("backbone", params)},
                    "batch_stats": {"backbone": stats.get("backbone", stats)}}
        hint = ("" if self.config.reinit_classifier else f" (a {spec.task} checkpoint with another number of "
                "classes loads with --config.reinit_classifier=True)")
        raise ValueError(f"init_from={path!r} fits neither {spec.name} nor the efficientvit_{spec.variant} "
                         f"backbone{hint}: " + " | ".join(errors))

    def keeps_fresh_init(self, path: str) -> bool:
        """True, after a backbone-only init, for every variable outside the backbone (``path`` is
        "params/..." or "batch_stats/...")."""
        return getattr(self, "_backbone_only", False) and not path.split("/", 1)[-1].startswith("backbone/")
