"""grain input pipelines: sharded per process, deterministic, checkpointable.

Both pipelines see the data as one *global stream* of examples; global batch `s` is the
stream positions [s*G, (s+1)*G) for global batch size G, and process `p` of `P` takes the
contiguous block [s*G + p*L, s*G + (p+1)*L) of it (local batch L = G/P). Hence

- the global batch, assembled from the local batches in process order, is in stream order
  on any number of processes (no reordering on the device);

- processes read disjoint shards that together cover the stream;
- the set of examples in a global batch, and each example's augmentation (its numpy
  Generator is seeded by (seed, stream position)), do not depend on the process count;
- the batch's resolution is drawn from (seed, step), so every process uses the same size
  at the same step;
- a transform that declares ``takes_step = True`` is also given the step (the global batch
  index, which is the training step that consumes the batch), e.g. :class:`SwitchAtStep`
  to change the augmentation for the last part of a run; other transforms are called
  without it.

Per-example transforms run inside the batched `MapDataset`, so grain worker processes
(`worker_count > 0`) each produce whole batches and the output is identical for every
worker count. Iterators are `grain.DatasetIterator`s: `get_state()` / `set_state()`
resume exactly (save them with `grain.checkpoint.CheckpointSave` beside the model).

Typical use in a training loop::

    it = make_train_iterator(source, ClassificationTrainTransform(), global_batch_size=256,
                             image_sizes=[128, 160, 192, 224], seed=0,
                             process_index=jax.process_index(),
                             process_count=jax.process_count())
    batch = evit_jax.train.mesh.global_batch_from_local(next(it), mesh)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import grain
import numpy as np

# Tags separating the random streams derived from one seed.
_AUGMENT_STREAM = 1
_RESOLUTION_STREAM = 2

Batch = dict[str, np.ndarray]


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """global_batch_size / process_count; ValueError if it does not divide."""
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}.")
    if process_count <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                         f"process_count={process_count}; use a multiple of {process_count}.")
    return global_batch_size // process_count


def _check_process(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is outside [0, {process_count}).")


ImageSizes = int | Sequence[int | Sequence[int]]


def _normalise_sizes(image_sizes: ImageSizes) -> tuple[tuple[int, int], ...]:
    if isinstance(image_sizes, (int, np.integer)):
        image_sizes = [image_sizes]
    sizes = tuple((int(s), int(s)) if isinstance(s, (int, np.integer)) else (int(s[0]), int(s[1]))
                  for s in image_sizes)
    if not sizes or any(h <= 0 or w <= 0 for h, w in sizes):
        raise ValueError(
            f"image_sizes must be a non-empty list of positive sizes, got {image_sizes!r}.")
    return sizes


def batch_resolution(image_sizes: ImageSizes, seed: int,
                     step: int) -> tuple[int, int]:
    """The (height, width) of training batch `step`: a function of (seed, step) only."""
    sizes = _normalise_sizes(image_sizes)
    if len(sizes) == 1:
        return sizes[0]
    rng = np.random.default_rng([seed, _RESOLUTION_STREAM, step])
    return sizes[int(rng.integers(len(sizes)))]


def _stack(examples: Sequence[Batch]) -> Batch:
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


@dataclasses.dataclass(frozen=True)
class SwitchAtStep:
    """A train transform that is ``before`` for the batches of steps < ``step`` and ``after`` from
    ``step`` on (e.g. YOLOX's last epochs without mosaic). Picklable when both are."""

    before: Callable[[dict[str, Any], tuple[int, int], np.random.Generator], Batch]
    after: Callable[[dict[str, Any], tuple[int, int], np.random.Generator], Batch]
    step: int

    takes_step = True

    def __call__(self, example: dict[str, Any], size: tuple[int, int], rng: np.random.Generator,
                 step: int) -> Batch:
        return (self.before if step < self.step else self.after)(example, size, rng)


@dataclasses.dataclass(frozen=True)
class _TrainExample(grain.transforms.MapWithIndex):
    """Applies the train transform to the example at stream position `index` with its batch's size
    (and its step, to a transform that ``takes_step``)."""

    transform_fn: Callable[..., Batch]
    image_sizes: tuple[tuple[int, int], ...]
    seed: int
    global_batch: int

    def map_with_index(self, index: int, example: dict[str, Any]) -> Batch:
        rng = np.random.default_rng([self.seed, _AUGMENT_STREAM, index])
        step = index // self.global_batch
        size = batch_resolution(self.image_sizes, self.seed, step)
        if getattr(self.transform_fn, "takes_step", False):
            return self.transform_fn(example, size, rng, step)
        return self.transform_fn(example, size, rng)


def _finish(dataset: grain.MapDataset, worker_count: int, read_threads: int,
            prefetch_batches: int) -> grain.DatasetIterator:
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}.")
    iter_ds = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches))
    if worker_count > 0:
        _allow_grain_workers()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=worker_count, per_worker_buffer_size=prefetch_batches))
    return iter(iter_ds)


def _allow_grain_workers() -> None:
    # grain's worker processes read absl flags; in a program that is not an absl app
    # (pytest, a plain script) nothing has parsed them, and the workers would fail.
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_train_iterator(source: Sequence[dict[str, Any]],
                        transform_fn: Callable[[dict[str, Any], tuple[int, int],
                                                np.random.Generator], Batch],
                        *,
                        global_batch_size: int,
                        image_sizes: ImageSizes,
                        seed: int,
                        process_index: int,
                        process_count: int,
                        worker_count: int = 0,
                        read_threads: int = 2,
                        prefetch_batches: int = 2) -> grain.DatasetIterator:
    """An infinite, per-epoch shuffled iterator of this process's local training batches.

    Args:
      source: random-access source (`len`, `__getitem__`), e.g. `sources.get_source(...)`.
      transform_fn: `transform_fn(example, (height, width), rng) -> dict` of numpy arrays
        (`transform_fn(example, (height, width), rng, step)` when it has ``takes_step = True``);
        must be picklable when `worker_count > 0` (e.g. `ClassificationTrainTransform`).
      global_batch_size: batch size summed over processes; must divide by process_count.
      image_sizes: an int, or the sizes (int or (h, w)) drawn per batch from (seed, step).
      seed: seeds the per-epoch shuffle, the augmentations and the resolutions.
      process_index, process_count: this process and the number of processes (pass
        `jax.process_index()`, `jax.process_count()`; explicit so tests can simulate them).
      worker_count: grain worker processes running the transforms (0: in this process).
      read_threads, prefetch_batches: threads per process/worker and batches buffered.

    Yields dicts of stacked arrays, e.g. {"image": uint8 (L, h, w, 3), "label": int32 (L,)},
    L = global_batch_size // process_count. Batches run across epoch boundaries.
    """
    local_batch = local_batch_size(global_batch_size, process_count)
    _check_process(process_index, process_count)
    if len(source) == 0:
        raise ValueError("The training source is empty.")
    sizes = _normalise_sizes(image_sizes)
    dataset = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    # Lazy: only the examples of this process's blocks are ever read and transformed.
    dataset = dataset.map_with_index(_TrainExample(transform_fn, sizes, seed, global_batch_size))
    dataset = dataset.batch(local_batch, drop_remainder=True, batch_fn=_stack)
    dataset = dataset[process_index::process_count]   # block p of every global batch
    return _finish(dataset, worker_count, read_threads, prefetch_batches)


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    """Number of batches every process yields for a split of `num_examples`."""
    return math.ceil(num_examples / global_batch_size)


@dataclasses.dataclass(frozen=True)
class _IgnoringKey:
    """A single-bucket transform: ``fn(example, key)`` -> ``transform_fn(example)`` (picklable)."""

    transform_fn: Callable[[dict[str, Any]], Batch]

    def __call__(self, example: dict[str, Any], key: Any) -> Batch:
        del key
        return self.transform_fn(example)


def make_eval_iterator(source: Sequence[dict[str, Any]],
                       transform_fn: Callable[[dict[str, Any]], Batch],
                       *,
                       global_batch_size: int,
                       process_index: int,
                       process_count: int,
                       worker_count: int = 0,
                       read_threads: int = 2,
                       prefetch_batches: int = 2) -> grain.DatasetIterator:
    """One pass over `source`, whose examples all have the same shapes: every example
    exactly once across all processes.

    Every process yields `num_eval_batches(len(source), global_batch_size)` batches of
    global_batch_size // process_count examples; the tail of the last one repeats example 0
    as padding. Each batch carries "mask" int32 (L,), 1 for real examples and 0 for padding,
    so sums of masked statistics over all processes are exact. (The one-bucket case of
    :func:`make_bucketed_eval_iterator`.)
    """
    return make_bucketed_eval_iterator(
        source, _IgnoringKey(transform_fn), [0] * len(source), global_batch_size=global_batch_size,
        process_index=process_index, process_count=process_count, worker_count=worker_count,
        read_threads=read_threads, prefetch_batches=prefetch_batches)


def eval_batch_plan(keys: Sequence[Any], global_batch_size: int) -> list[tuple[Any, np.ndarray, np.ndarray]]:
    """Groups a split's examples into global eval batches whose examples share a key.

    ``keys[i]`` is example i's bucket (e.g. its model input shape; keys must be sortable).
    Returns, in sorted key order, one ``(key, indices, real)`` per global batch: ``indices``
    (G,) are example indices in ascending order within the bucket, and the tail of each
    bucket's last batch repeats the bucket's first example with ``real`` False (padding of
    the right shape, masked out of the metrics). Every example appears exactly once as real.
    """
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}.")
    if len(keys) == 0:
        raise ValueError("The evaluation source is empty.")
    buckets: dict[Any, list[int]] = {}
    for index, key in enumerate(keys):
        buckets.setdefault(key, []).append(index)
    plan = []
    for key in sorted(buckets):
        members = np.asarray(buckets[key], np.int64)
        for start in range(0, len(members), global_batch_size):
            chunk = members[start:start + global_batch_size]
            pad = global_batch_size - len(chunk)
            plan.append((key, np.concatenate([chunk, np.full(pad, members[0])]),
                         np.arange(global_batch_size) < len(chunk)))
    return plan


@dataclasses.dataclass(frozen=True)
class _PlannedShard:
    """This process's part of every planned global batch: positions [p*L, (p+1)*L) of each,
    so that the processes' local batches concatenate (in process order) to the global batch."""

    source: Sequence[dict[str, Any]]
    items: tuple[tuple[int, bool, Any], ...]   # (example index, real, bucket key) per local position

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> tuple[dict[str, Any], bool, Any]:
        index, real, key = self.items[k]
        return self.source[index], real, key


@dataclasses.dataclass(frozen=True)
class _BucketedEvalExample(grain.transforms.Map):
    transform_fn: Callable[[dict[str, Any], Any], Batch]

    def map(self, item: tuple[dict[str, Any], bool, Any]) -> Batch:
        example, real, key = item
        out = dict(self.transform_fn(example, key))
        out["mask"] = np.int32(real)
        return out


def make_bucketed_eval_iterator(source: Sequence[dict[str, Any]],
                                transform_fn: Callable[[dict[str, Any], Any], Batch],
                                keys: Sequence[Any],
                                *,
                                global_batch_size: int,
                                process_index: int,
                                process_count: int,
                                worker_count: int = 0,
                                read_threads: int = 2,
                                prefetch_batches: int = 2) -> grain.DatasetIterator:
    """One pass over `source` in batches of examples that share a key (:func:`eval_batch_plan`).

    For splits whose examples need different shapes (ADE20K's eval inputs follow each image's
    aspect ratio): every global batch holds one bucket, so its shapes are the same on every
    process and the model sees each image exactly as the official batch-1 evaluation does.
    ``transform_fn(example, key)`` returns the example's arrays for its bucket's shapes; the
    batch carries "mask" (1 real, 0 padding). Every process yields the same number of
    batches, and the same key at the same batch index.
    """
    local_batch = local_batch_size(global_batch_size, process_count)
    _check_process(process_index, process_count)
    if len(keys) != len(source):
        raise ValueError(f"{len(keys)} bucket keys for a source of {len(source)} examples.")
    lo, hi = process_index * local_batch, (process_index + 1) * local_batch
    items = tuple((int(i), bool(r), key) for key, indices, real in eval_batch_plan(keys, global_batch_size)
                  for i, r in zip(indices[lo:hi], real[lo:hi]))
    dataset = grain.MapDataset.source(_PlannedShard(source, items)).map(_BucketedEvalExample(transform_fn))
    dataset = dataset.batch(local_batch, drop_remainder=True, batch_fn=_stack)
    return _finish(dataset, worker_count, read_threads, prefetch_batches)
