"""Input-pipeline throughput: the classification train pipeline's images/s on a prepared dataset.

    python -m evit_jax.tools.pipeline_bench --dataset evit_shapes --data_dir DATA --image_sizes 64,224 --workers 0,1,2

The first batch (start-up, worker spawn) is excluded; in-process runs also print CPU time per image,
which is less sensitive to a busy machine.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Sequence

from evit_jax.data import pipeline, sources, transforms


def benchmark_pipeline(name: str = "evit_shapes", *, data_dir: str, image_size: int = 64,
                       batch_size: int = 128, worker_count: int = 0, num_batches: int = 20,
                       read_threads: int = 2, seed: int = 0,
                       print_fn: Callable[[str], None] = print) -> float:
    """Measures training-pipeline throughput (images/s) on `name`'s train split.

    Uses the standard classification train transform at `image_size`; the first batch
    (start-up, worker spawn) is excluded. Prints and returns the rate.
    """
    source = sources.get_source(name, "train", data_dir)
    iterator = pipeline.make_train_iterator(
        source, transforms.ClassificationTrainTransform(), global_batch_size=batch_size,
        image_sizes=[image_size], seed=seed, process_index=0, process_count=1,
        worker_count=worker_count, read_threads=read_threads)
    try:
        next(iterator)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(num_batches):
            next(iterator)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        if hasattr(iterator, "close"):
            iterator.close()
    rate = num_batches * batch_size / elapsed
    per_worker = rate / max(worker_count, 1)
    # In-process runs also report CPU time per image: less sensitive to a busy machine.
    cpu_note = (f", {1000 * cpu / (num_batches * batch_size):.2f} CPU-ms/image"
                if worker_count == 0 else "")
    print_fn(f"{name} train @{image_size}px batch {batch_size}: workers={worker_count} "
             f"threads={read_threads}: {rate:.0f} images/s ({per_worker:.0f} per worker{cpu_note})")
    return rate


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m evit_jax.tools.pipeline_bench",
                                     description="Input-pipeline throughput (images/s).")
    parser.add_argument("--dataset", default="evit_shapes")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--image_sizes", default="64,224", help="comma-separated sizes")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    parser.add_argument("--read_threads", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_batches", type=int, default=20)
    args = parser.parse_args(argv)
    for size in (int(s) for s in args.image_sizes.split(",")):
        for workers in (int(w) for w in args.workers.split(",")):
            benchmark_pipeline(args.dataset, data_dir=args.data_dir, image_size=size,
                               batch_size=args.batch_size, worker_count=workers,
                               num_batches=args.num_batches, read_threads=args.read_threads)


if __name__ == "__main__":
    main()
