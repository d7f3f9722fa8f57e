"""Input-pipeline throughput: the classification train pipeline's images/s on a prepared dataset.

    python -m evit_jax.tools.pipeline_bench --dataset evit_shapes --data_dir DATA --image_sizes 64,224 --workers 0,1,2

The official ImageNet recipe on ImageNet-like JPEGs, against timm's DataLoader on the same files:

    python -m evit_jax.tools.pipeline_bench --jpeg_folder /tmp/jpegs --data_dir DATA --workers 2 \\
        --recipe randaug=2,5 --recipe erasing=0.2 --compare-timm [--breakdown]

``--jpeg_folder`` generates the folder on first use (``--num_images`` procedural 500x375 /
375x500 JPEGs at quality 90, about 100 KB each like ImageNet's) and prepares it with
``prepare image_folder`` as dataset ``bench_jpegs``. Runs alternate (ours, timm, ours, ...)
``--repeats`` times. Each prints wall images/s and the CPU time per image summed over the main
process and its workers (after the warm-up batch), the figure that a busy machine distorts
least: images/s per core = 1000 / CPU-ms per image. ``--breakdown`` times each stage of both
transforms on one core.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Iterator, Sequence

import numpy as np

from evit_jax import cli
from evit_jax.data import pipeline, sources, transforms

JPEG_DATASET = "bench_jpegs"
# The official L1/L2 data recipe, and the timm transform that matches it.
DEFAULT_RANDAUG, DEFAULT_ERASING = (2, 5), 0.2
# Accelerators to feed, images/s (for the cores-per-accelerator estimate).
ACCELERATOR_RATES = {
    "TPU v5e chip, B1 train (compiler estimate)": 1070.0,
    "H200, B1 forward bf16 batch 256 (docs/performance.md; training is slower)": 22927.0,
}


# ---------------------------------------------------------------- CPU accounting
def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live descendants (grain / DataLoader workers)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def _time_batches(batches: Iterator, batch_size: int, num_batches: int) -> tuple[float, float]:
    """(images/s, CPU-ms per image) over ``num_batches`` after one warm-up batch."""
    next(batches)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    for _ in range(num_batches):
        next(batches)
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    images = num_batches * batch_size
    return images / elapsed, 1000.0 * cpu / images


# ---------------------------------------------------------------- evit_jax pipeline
def recipe_transform(randaugment: tuple[int, float] | None = None,
                     erasing_prob: float = 0.0) -> transforms.ClassificationTrainTransform:
    """The classification train transform (RandomResizedCrop, random interpolation, flip) with
    the optional RandAugment (n, m) and random-erasing probability."""
    return transforms.ClassificationTrainTransform(randaugment=randaugment, erasing_prob=erasing_prob)


def benchmark_pipeline(name: str = "evit_shapes", *, data_dir: str, image_size: int = 64,
                       batch_size: int = 128, worker_count: int = 0, num_batches: int = 20,
                       read_threads: int = 2, seed: int = 0,
                       transform: transforms.ClassificationTrainTransform | None = None,
                       print_fn: Callable[[str], None] = print) -> tuple[float, float]:
    """Measures training-pipeline throughput on `name`'s train split.

    Uses `transform` (default: the standard classification train transform) at `image_size`;
    the first batch (start-up, worker spawn) is excluded. Prints and returns
    (images/s, CPU-ms per image over this process and its workers).
    """
    source = sources.get_source(name, "train", data_dir)
    iterator = pipeline.make_train_iterator(
        source, transform or transforms.ClassificationTrainTransform(), global_batch_size=batch_size,
        image_sizes=[image_size], seed=seed, process_index=0, process_count=1,
        worker_count=worker_count, read_threads=read_threads)
    try:
        rate, cpu_ms = _time_batches(iterator, batch_size, num_batches)
    finally:
        if hasattr(iterator, "close"):
            iterator.close()
    per_worker = rate / max(worker_count, 1)
    print_fn(f"{name} train @{image_size}px batch {batch_size}: workers={worker_count} "
             f"threads={read_threads}: {rate:.0f} images/s ({per_worker:.0f} per worker, "
             f"{cpu_ms:.2f} CPU-ms/image)")
    return rate, cpu_ms


# ---------------------------------------------------------------- timm DataLoader
def timm_train_transform(image_size: int, randaugment: tuple[int, float] | None, erasing_prob: float):
    """timm's ImageNet train transform with the same recipe (RandomResizedCrop with timm's
    random bilinear/bicubic, flip, RandAugment mstd1.0 inc1, ToTensor, Normalize, RandomErasing)."""
    from timm.data import create_transform

    auto_augment = None if randaugment is None else f"rand-n{randaugment[0]}-m{randaugment[1]:g}-mstd1.0-inc1"
    return create_transform(image_size, is_training=True, auto_augment=auto_augment,
                            re_prob=erasing_prob, interpolation="random")


def benchmark_timm_loader(folder: str, *, image_size: int = 224, batch_size: int = 128,
                          worker_count: int = 0, num_batches: int = 20,
                          randaugment: tuple[int, float] | None = DEFAULT_RANDAUG,
                          erasing_prob: float = DEFAULT_ERASING, seed: int = 0,
                          print_fn: Callable[[str], None] = print) -> tuple[float, float]:
    """timm transform + torchvision ImageFolder + torch DataLoader (``worker_count`` workers,
    shuffled, batches of float32 tensors) on ``folder``; returns (images/s, CPU-ms per image)."""
    import torch
    from torchvision.datasets import ImageFolder

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # DataLoader workers use 1 thread each; so does the in-process run.
    dataset = ImageFolder(folder, timm_train_transform(image_size, randaugment, erasing_prob))
    # One pass of a sampler long enough for the run (it spans epochs with fresh permutations), so
    # that no worker restarts at an epoch boundary inside the timed window, with the workers'
    # prefetch (2 batches each) still full at the end, as it is at the start.
    in_flight = 2 * max(worker_count, 1)
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=(num_batches + 1 + in_flight) * batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                                         num_workers=worker_count)
    batches = iter(loader)
    try:
        rate, cpu_ms = _time_batches(batches, batch_size, num_batches)
    finally:
        del batches  # Shuts the workers down before the next run.
        torch.set_num_threads(threads)
    print_fn(f"timm DataLoader {folder} @{image_size}px batch {batch_size}: workers={worker_count}: "
             f"{rate:.0f} images/s ({cpu_ms:.2f} CPU-ms/image)")
    return rate, cpu_ms


# ---------------------------------------------------------------- per-stage breakdown
def _stage_times(stages: Sequence[tuple[str, Callable]], inputs: Sequence) -> dict[str, float]:
    """CPU ms per input of each stage; stage k gets stage k-1's output (the first gets the input)."""
    totals = dict.fromkeys((name for name, _ in stages), 0.0)
    for value in inputs:
        for name, fn in stages:
            start = time.process_time()
            value = fn(value)
            totals[name] += time.process_time() - start
    return {name: 1000.0 * t / len(inputs) for name, t in totals.items()}


def _best_of(measure: Callable[[], dict[str, float]], rounds: int) -> dict[str, float]:
    """Per-stage minimum over ``rounds`` runs (the least disturbed by other load)."""
    runs = [measure() for _ in range(rounds)]
    return {name: min(run[name] for run in runs) for name in runs[0]}


def breakdown(folder: str, data_dir: str, *, image_size: int = 224, num_images: int = 100, rounds: int = 3,
              randaugment: tuple[int, float] | None = DEFAULT_RANDAUG, erasing_prob: float = DEFAULT_ERASING,
              print_fn: Callable[[str], None] = print) -> None:
    """CPU time of every stage of both transforms on ``num_images`` images, in this process, one
    thread (the minimum over ``rounds`` alternating rounds)."""
    import torch
    from torchvision.datasets.folder import pil_loader

    from evit_jax.data import random_erasing
    from evit_jax.data.randaugment import RandAugment

    torch.set_num_threads(1)
    source = sources.get_source(JPEG_DATASET, "train", data_dir)
    indices = range(min(num_images, len(source)))
    ours = recipe_transform(randaugment, erasing_prob)
    size = (image_size, image_size)
    rng = np.random.default_rng(0)
    augment = RandAugment(*randaugment) if randaugment else None
    ours_stages = [
        ("read + decode (tfds source)", lambda i: source[i]["image"]),
        ("RandomResizedCrop", lambda image: transforms.random_resized_crop_pil(image, size, rng)),
        ("flip", lambda image: transforms.random_horizontal_flip(image, rng)),
        ("RandAugment", (lambda image: augment(image, rng)) if augment else (lambda image: image)),
        ("to uint8 array + erasing box", lambda image: (np.asarray(image), random_erasing.random_erasing_box(
            image_size, image_size, rng, erasing_prob) if erasing_prob else None)),
    ]
    inputs = list(indices)
    timm_transform = timm_train_transform(image_size, randaugment, erasing_prob)
    train_root = os.path.join(folder, "train")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(train_root) for f in fs)[:len(inputs)]
    timm_stages = [("read + decode (PIL, pil_loader)", pil_loader)] + [
        (type(t).__name__, t) for t in timm_transform.transforms]
    # Alternating rounds, the first one a warm-up (file cache, lazy imports), minimum of the rest.
    _stage_times(ours_stages, inputs[:8]), _stage_times(timm_stages, files[:8])
    ours_ms, timm_ms = {}, {}
    for _ in range(rounds):
        for result, stages, items in ((ours_ms, ours_stages, inputs), (timm_ms, timm_stages, files)):
            for name, ms in _stage_times(stages, items).items():
                result[name] = min(result.get(name, np.inf), ms)

    def whole() -> dict[str, float]:
        start = time.process_time()
        for i in inputs:
            ours({"image": source[i]["image"], "label": 0}, size, np.random.default_rng(i))
        return {"whole": 1000 * (time.process_time() - start) / len(inputs)}

    whole_ms = _best_of(whole, rounds)["whole"]
    examples = [ours({"image": source[i]["image"], "label": 0}, size, np.random.default_rng(i)) for i in inputs[:64]]
    tensors = [timm_transform(pil_loader(f)) for f in files[:64]]

    batched = max(len(examples) // 32 * 32, 1)

    def collation() -> dict[str, float]:
        start = time.process_time()
        for k in range(0, batched - 31, 32):
            pipeline._stack(examples[k:k + 32])
        middle = time.process_time()
        for k in range(0, batched - 31, 32):
            torch.utils.data.default_collate([(t, 0) for t in tensors[k:k + 32]])
        return {"stack": 1000 * (middle - start) / batched, "collate": 1000 * (time.process_time() - middle) / batched}

    batching = _best_of(collation, rounds)
    stack_ms, collate_ms = batching["stack"], batching["collate"]

    print_fn(f"per-stage CPU-ms/image, one thread, {len(inputs)} images @{image_size}px, best of {rounds}:")
    for name, ms in ours_ms.items():
        print_fn(f"  evit_jax {name:34s} {ms:6.2f}")
    print_fn(f"  evit_jax {'whole transform incl. decode':34s} {whole_ms:6.2f}")
    print_fn(f"  evit_jax {'batch stacking (uint8)':34s} {stack_ms:6.2f}")
    for name, ms in timm_ms.items():
        print_fn(f"  timm     {name:34s} {ms:6.2f}")
    print_fn(f"  timm     {'default_collate (float32)':34s} {collate_ms:6.2f}")


# ---------------------------------------------------------------- the JPEG folder
def natural_image(rng: np.random.Generator, height: int = 375, width: int = 500) -> np.ndarray:
    """A procedural photo-like uint8 image: 1/f^a colour texture (a natural-image spectrum),
    a few flat-coloured shapes with soft edges, sensor-like noise."""
    from PIL import Image, ImageDraw, ImageFilter

    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    frequency = np.sqrt(fx ** 2 + fy ** 2)
    frequency[0, 0] = 1.0
    amplitude = frequency ** -rng.uniform(0.6, 0.9)
    amplitude[0, 0] = 0.0
    fields = np.stack([np.fft.irfft2(amplitude * np.exp(2j * np.pi * rng.random(amplitude.shape)),
                                     s=(height, width)) for _ in range(3)], -1)
    fields /= fields.std()
    # Mostly luminance, some chroma: the channels are correlated as in photographs.
    mixing = np.array([[1.0, 0.8, 0.7], [0.25, -0.1, -0.2], [0.1, 0.15, -0.3]]) * rng.uniform(0.7, 1.3, (3, 1))
    pixels = 128 + 45 * (fields @ mixing) + rng.uniform(-40, 40, 3)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 7))):
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(15, 120)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x - r, y - r * rng.uniform(0.4, 1.5), x + r, y + r], fill=colour)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, 5))
            draw.polygon([(x + r * np.cos(a), y + r * np.sin(a)) for a in angles], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.7)))
    noisy = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(5, 10), (height, width, 1))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _write_jpeg(job: tuple[str, int, int, int]) -> int:
    from PIL import Image

    path, seed, quality, landscape = job
    rng = np.random.default_rng([seed])
    height, width = (375, 500) if landscape else (500, 375)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(natural_image(rng, height, width)).save(path, "JPEG", quality=quality)
    return os.path.getsize(path)


def make_jpeg_folder(folder: str, num_images: int = 2000, num_classes: int = 10, val_per_class: int = 2,
                     quality: int = 90, processes: int | None = None) -> None:
    """Writes ``folder/{train,val}/class_KK/NNNNN.jpg`` (3/4 landscape 500x375, 1/4 portrait),
    ``num_images`` in train; deterministic. Does nothing when ``folder/train`` exists. Uses
    ``processes`` processes (default: 1 for fewer than 200 images, else up to 4)."""
    if os.path.isdir(os.path.join(folder, "train")):
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    for split, count in (("train", num_images), ("val", val_per_class * num_classes)):
        for i in range(count):
            seed = i if split == "train" else 10 ** 7 + i
            jobs.append((os.path.join(folder, split, f"class_{i % num_classes:02d}", f"{i:05d}.jpg"),
                         seed, quality, i % 4 != 3))
    processes = processes or (1 if len(jobs) < 200 else min(4, os.cpu_count() or 1))
    if processes == 1:
        sizes = [_write_jpeg(job) for job in jobs]
    else:  # Spawned, not forked: the calling process may run JAX threads.
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            sizes = list(pool.map(_write_jpeg, jobs, chunksize=16))
    print(f"wrote {len(jobs)} JPEGs to {folder} (mean {np.mean(sizes) / 1024:.0f} KB)")


def prepare_jpeg_dataset(folder: str, data_dir: str, num_images: int) -> None:
    """The JPEG folder (generated if missing) as dataset ``bench_jpegs`` in ``data_dir``."""
    from evit_jax.data import image_folder

    make_jpeg_folder(folder, num_images)
    try:
        sources.get_info(JPEG_DATASET, data_dir, build=False)
    except FileNotFoundError:
        image_folder.prepare_image_folder(JPEG_DATASET, folder, data_dir)


# ---------------------------------------------------------------- command line
def _recipe(items: Sequence[str]) -> tuple[tuple[int, float] | None, float]:
    randaugment, erasing = None, 0.0
    for item in items:
        key, _, value = item.partition("=")
        if key == "randaug":
            n, m = value.split(",")
            randaugment = (int(n), float(m))
        elif key == "erasing":
            erasing = float(value)
        else:
            raise SystemExit(f"--recipe takes randaug=N,M or erasing=P, got {item!r}")
    return randaugment, erasing


def _compare(folder: str, data_dir: str, args, randaugment, erasing) -> None:
    transform = recipe_transform(randaugment, erasing)
    for workers in (int(w) for w in args.workers.split(",")):
        results = {"evit_jax": [], "timm": []}
        for _ in range(args.repeats):   # alternating, so that a change of load hits both
            results["evit_jax"].append(benchmark_pipeline(
                JPEG_DATASET, data_dir=data_dir, image_size=args.image_size, batch_size=args.batch_size,
                worker_count=workers, num_batches=args.num_batches, read_threads=args.read_threads,
                transform=transform))
            if args.compare_timm:
                results["timm"].append(benchmark_timm_loader(
                    os.path.join(folder, "train"), image_size=args.image_size, batch_size=args.batch_size,
                    worker_count=workers, num_batches=args.num_batches, randaugment=randaugment,
                    erasing_prob=erasing))
        for impl, runs in results.items():
            if not runs:
                continue
            rate = statistics.median(r for r, _ in runs)
            cpu_ms = statistics.median(c for _, c in runs)
            if cpu_ms <= 0:   # CPU clocks tick in 10 ms: a tiny run may see none
                print(f"median {impl:8s} workers={workers}: {rate:.0f} images/s wall, too short to time the CPU")
                continue
            per_core = 1000.0 / cpu_ms
            cores = ", ".join(f"{what}: {need / per_core:.1f} cores" for what, need in ACCELERATOR_RATES.items())
            print(f"median {impl:8s} workers={workers}: {rate:.0f} images/s wall, {cpu_ms:.2f} CPU-ms/image "
                  f"= {per_core:.0f} images/s per core -> {cores}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog="python -m evit_jax.tools.pipeline_bench",
                                     description="Input-pipeline throughput (images/s).")
    parser.add_argument("--dataset", default="evit_shapes")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--image_sizes", default="64,224", help="comma-separated sizes")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    parser.add_argument("--read_threads", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_batches", type=int, default=20)
    parser.add_argument("--jpeg_folder", default=None,
                        help="ImageNet-like JPEG folder (generated if missing) to run the recipe on")
    parser.add_argument("--num_images", type=int, default=2000, help="train images of a generated --jpeg_folder")
    parser.add_argument("--recipe", action="append", default=[],
                        help="randaug=N,M and/or erasing=P (repeatable; default with --jpeg_folder: "
                             "randaug=2,5 erasing=0.2, the official L1/L2 recipe)")
    parser.add_argument("--image_size", type=int, default=224, help="train resolution with --jpeg_folder")
    parser.add_argument("--compare-timm", dest="compare_timm", action="store_true",
                        help="alternate with timm's transform + torchvision ImageFolder + torch DataLoader")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per worker count")
    parser.add_argument("--breakdown", action="store_true", help="time each transform stage on one core")
    args = parser.parse_args(argv)
    if args.jpeg_folder is None:
        for size in (int(s) for s in args.image_sizes.split(",")):
            for workers in (int(w) for w in args.workers.split(",")):
                benchmark_pipeline(args.dataset, data_dir=args.data_dir, image_size=size,
                                   batch_size=args.batch_size, worker_count=workers,
                                   num_batches=args.num_batches, read_threads=args.read_threads)
        return
    randaugment, erasing = _recipe(args.recipe) if args.recipe else (DEFAULT_RANDAUG, DEFAULT_ERASING)
    folder = os.path.abspath(os.path.expanduser(args.jpeg_folder))
    prepare_jpeg_dataset(folder, args.data_dir, args.num_images)
    print(f"recipe: RandomResizedCrop (random interpolation) + flip, RandAugment {randaugment}, "
          f"erasing {erasing}; {args.image_size}px, batch {args.batch_size}, {args.num_batches} batches per run, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    if args.breakdown:
        breakdown(folder, args.data_dir, image_size=args.image_size, randaugment=randaugment, erasing_prob=erasing)
    _compare(folder, args.data_dir, args, randaugment, erasing)


if __name__ == "__main__":
    main()
