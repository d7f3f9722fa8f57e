"""Train-step throughput: the training loop's own step (evit_jax) against timm's PyTorch step.

    python -m evit_jax.tools.train_bench --model efficientvit_b1 --batch 16 --res 224 --compare-timm
    python -m evit_jax.tools.train_bench --model efficientvit_b1 --profile   # where the step's time goes

The evit_jax step IS the loop's: `evit_jax.train.loop.setup_experiment` on the ImageNet recipe of the
model (configs/imagenet.py; B1's for models without one) with random uint8 images instead of a dataset,
compiled by `Experiment.compile_train_steps` (state donated) - normalisation, label smoothing,
mixup/cutmix, stochastic depth, forward, backward, clip-by-value, AdamW with the weight-decay mask, EMA
of params and BN statistics. timm's step: forward, BCE on the same smoothed targets, backward,
clip-by-value, AdamW, EMA of parameters and buffers (channels_last; no mixing or stochastic depth).
With --compare-timm both run in this process, timed in alternating phases (JAX, timm, JAX, timm) as in
`evit_jax.tools.benchmark`, with the same thread count. With a GPU, timm runs on it too.
Prints images/s; nothing is asserted (not a test).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Any, Callable

import jax
import numpy as np

from evit_jax import cli
from evit_jax.host_memory import retain_freed_memory
from evit_jax.models import get_model_spec
from evit_jax.tasks.classification import smooth_labels


def torch_device() -> str:
    """Where the PyTorch reference runs: the GPU when JAX runs on one and torch sees it, else the CPU,
    so that a --compare-timm ratio always compares the two frameworks on the same hardware."""
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def bench_config(model_name: str, batch: int, res: int, *, conv_impl: str = "auto", dtype: str = "float32"):
    """The ImageNet run config of `model_name` (its recipe in configs/imagenet.py, else B1's) on random
    data at one resolution."""
    from configs import imagenet

    spec = get_model_spec(model_name)  # unknown name -> ValueError before any work
    variant = spec.variant if spec.name == f"efficientvit_{spec.variant}" else "b1"
    config = imagenet.get_config(variant)
    config.model.name = spec.name
    config.model.num_classes = spec.num_classes or 1000
    config.model.dtype = dtype
    config.model.conv_impl = conv_impl
    config.data.image_sizes = (res,)
    config.global_batch_size = batch
    config.total_steps, config.warmup_steps = 1000, 10
    return config


def build_train_step(model_name: str, batch: int, res: int, *, conv_impl: str = "auto",
                     dtype: str = "float32") -> tuple[Callable[[], Any], dict]:
    """(run, info): `run()` does one step of the training loop's compiled train step on a fixed random
    batch (the state is donated and carried from call to call); info has the compile time and the
    compiled executable."""
    from evit_jax.train import loop

    config = bench_config(model_name, batch, res, conv_impl=conv_impl, dtype=dtype)
    # ImageNet's published facts stand in for the data: nothing is read, the batch is random.
    experiment = loop.setup_experiment(config, devices=jax.local_devices()[:1], published_facts=True)
    state = experiment.init_state()
    t0 = time.perf_counter()
    executable = experiment.compile_train_steps()[(res, res)]
    compile_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    spec = experiment.task.train_batch_spec(batch, (res, res))
    # Any other input of the recipe (the random-erasing boxes) as zeros: the same compiled work.
    local = {key: np.zeros(s.shape, s.dtype) for key, s in spec.items()}
    local.update(image=rng.integers(0, 256, size=(batch, res, res, 3), dtype=np.uint8),
                 label=rng.integers(0, experiment.task.num_classes, size=(batch,), dtype=np.int32))
    global_batch = experiment.global_batch(local, spec)
    box = [state]

    def run():
        box[0], metrics = executable(box[0], global_batch)
        jax.block_until_ready((box[0], metrics))
        return metrics

    return run, {"compile_s": compile_s, "executable": executable}


def build_timm_train_step(model_name: str, batch: int, res: int, *, threads: int | None = None,
                          dtype: str = "float32", compile_model: bool = False) -> tuple[Callable[[], Any], dict]:
    """(run, info) for timm's model with a plain PyTorch train step (see the module docstring), on the GPU
    when JAX runs on one (:func:`torch_device`), else the CPU; bfloat16 = autocast; `compile_model`:
    the model wrapped in `torch.compile` (compiled by the warm-up steps)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import timm
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)
    device = torch_device()
    model = timm.create_model(model_name, pretrained=False).train().to(device, memory_format=torch.channels_last)
    ema = [t.detach().clone() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    live = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, res, res, generator=g).to(device, memory_format=torch.channels_last)
    labels = np.asarray(torch.randint(0, 1000, (batch,), generator=g))
    targets = torch.from_numpy(np.array(smooth_labels(labels, 1000, 0.1))).to(device)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    forward = torch.compile(model) if compile_model else model

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = forward(x)
        loss = loss_fn(logits.float(), targets)
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 2.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, live, 1.0 - 0.9998)
        synchronize(device)
        return loss

    framework = f"timm {timm.__version__} / torch {torch.__version__}{' (torch.compile)' if compile_model else ''}"
    return run, {"framework": framework, "threads": torch.get_num_threads(), "device": device}


def benchmark_train_steps(model_name: str = "efficientvit_b1", batch: int = 16, res: int = 224, *,
                          steps: int = 6, warmup: int = 2, conv_impl: str = "auto", dtype: str = "float32",
                          compare_timm: bool = False, timm_compile: bool = False, rounds: int = 2,
                          profile: bool = False, peak: float | None = None) -> dict:
    """images/s of the loop's train step (and timm's), timed in alternating phases; compile time; MFU
    (3 x the forward's analytic MACs x 2 FLOPs per image against the device's peak, see
    `evit_jax.tools.benchmark.peak_tflops`); with `profile`, the step's op time by (phase, layer kind,
    op kind) (:func:`profile_executable`)."""
    from evit_jax.models import flops
    from evit_jax.tools.benchmark import host_load_figures, peak_tflops, time_in_phases

    run, info = build_train_step(model_name, batch, res, conv_impl=conv_impl, dtype=dtype)
    calls = {"jax": run}
    result = {"model": model_name, "batch": batch, "res": res, "dtype": dtype, "backend": jax.default_backend(),
              "compile_s": info["compile_s"], "steps": steps}
    if compare_timm:
        timm_name = model_name.replace("-", "_")
        calls["timm"], timm_info = build_timm_train_step(timm_name, batch, res, dtype=dtype,
                                                         threads=_cpu_threads(), compile_model=timm_compile)
        result.update(timm_framework=timm_info["framework"], timm_threads=timm_info["threads"],
                      timm_device=timm_info["device"])
    timings = time_in_phases(calls, steps, warmup, rounds=rounds)
    for name, timing in timings.items():
        result[f"{name}_images_per_s"] = batch / timing.median
        result[f"{name}_step_ms"] = 1000 * timing.median
        result[f"{name}_best_step_ms"] = 1000 * timing.best
    result.update(host_load_figures(timings))
    if compare_timm:
        result["jax_over_timm"] = result["jax_images_per_s"] / result["timm_images_per_s"]
    peak_value, result["peak_source"] = peak_tflops(jax.local_devices()[0], dtype, peak)
    train_flops = 3 * 2 * flops.count_macs(model_name, res, res)  # forward + backward (~2x forward)
    result["mfu"] = train_flops * result["jax_images_per_s"] / (peak_value * 1e12) if peak_value else None
    if profile:
        result["profile"] = profile_executable(info["executable"], run)
    return result


def _cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ------------------------------------------------------------------------------------ profile
# Layer kinds, by the Flax module names in an op's name (the first match wins).
_LAYER_KINDS = (("aggreg", "LiteMLA aggregation (dw 5x5 + grouped 1x1)"), ("qkv", "LiteMLA qkv 1x1"),
                ("proj", "LiteMLA proj 1x1"), ("context_module", "LiteMLA attention"),
                ("depth_conv", "depthwise conv"), ("inverted_conv", "1x1 expand conv"),
                ("point_conv", "1x1 project conv"), ("spatial_conv", "dense conv (FusedMBConv)"),
                ("conv1", "dense conv (ResBlock)"), ("conv2", "dense conv (ResBlock)"),
                ("input_stem", "stem"), ("head", "head"))
_OP_KINDS = (("dot_general", "matmul"), ("conv_general_dilated", "lax.conv"), ("/norm/", "BatchNorm"),
             ("hard_silu", "hardswish"), ("reduce_sum", "reduction"))


def _classify(op_name: str) -> tuple[str, str, str]:
    """(phase, layer kind, op kind) of an XLA op from its JAX op_name metadata."""
    if "transpose(jvp(" in op_name:
        phase = "backward"
    elif "jvp(" in op_name:
        phase = "forward"
    else:
        phase = "optimizer/EMA/other"
    layer = next((kind for key, kind in _LAYER_KINDS if key in op_name), "other")
    op = next((kind for key, kind in _OP_KINDS if key in op_name), "elementwise/copy")
    return phase, layer, op


def profile_executable(executable, run: Callable[[], Any], calls: int = 2) -> dict[tuple[str, str, str], float]:
    """ms per call of every (phase, layer kind, op kind) of a compiled executable, from a jax.profiler
    trace (its Perfetto JSON) of `calls` calls of `run` (which runs the executable and waits for it),
    joined with the op_name metadata of the executable's HLO."""
    op_names = {m.group(1): m.group(2) for m in re.finditer(
        r'^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*?metadata=\{op_name="([^"]*)"', executable.as_text(), re.MULTILINE)}
    run()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(calls):
                run()
        (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals: dict[tuple[str, str, str], float] = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in op_names:
            totals[_classify(op_names[event["name"]])] += event["dur"] / 1e3 / calls
    return dict(totals)


def format_profile(totals: dict[tuple[str, str, str], float], top: int = 25) -> list[str]:
    """Markdown tables: op time by phase and layer kind, then the largest (phase, layer, op) entries."""
    total = sum(totals.values()) or 1.0
    by_layer: dict[tuple[str, str], float] = collections.Counter()
    for (phase, layer, _), ms in totals.items():
        by_layer[(phase, layer)] += ms
    lines = [f"op time per step (sum over ops; both threads): {total:.0f} ms", "",
             "| phase | layer | ms | share |", "|---|---|---|---|"]
    lines += [f"| {p} | {layer} | {ms:.0f} | {100 * ms / total:.1f}% |"
              for (p, layer), ms in sorted(by_layer.items(), key=lambda kv: -kv[1])]
    lines += ["", "| phase | layer | op | ms | share |", "|---|---|---|---|---|"]
    lines += [f"| {p} | {layer} | {op} | {ms:.0f} | {100 * ms / total:.1f}% |"
              for (p, layer, op), ms in sorted(totals.items(), key=lambda kv: -kv[1])[:top]]
    return lines


def _format(name: str, r: dict) -> str:
    extra = f", compile {r['compile_s']:.1f}s" if name == "jax" else f" on {r['timm_device']}"
    label = "evit_jax (the loop's step)" if name == "jax" else r["timm_framework"]
    return (f"{label:<34} {r['model']} batch {r['batch']} @{r['res']}px {r['dtype']}: "
            f"{r[f'{name}_images_per_s']:.1f} images/s (median {r[f'{name}_step_ms']:.0f} ms/step, "
            f"best {r[f'{name}_best_step_ms']:.0f}{extra})")


def main(argv=None) -> dict:
    parser = cli.ArgumentParser(prog="python -m evit_jax.tools.train_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientvit_b1")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per framework (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--conv-impl", choices=("auto", "lax", "fast"), default="auto")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype (params and optimizer state stay float32)")
    parser.add_argument("--compare-timm", action="store_true")
    parser.add_argument("--timm-compile", action="store_true", help="with --compare-timm: torch.compile timm's model")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: by device kind)")
    parser.add_argument("--profile", action="store_true",
                        help="also print where the evit_jax step's time goes (jax.profiler trace)")
    parser.add_argument("--no-retain-memory", action="store_true",
                        help="keep JAX's asynchronous CPU dispatch and glibc's malloc defaults, which "
                             "page-fault large blocks in on every step (see evit_jax.host_memory)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.res < 32 or args.res % 32 or args.steps < 1:
        raise ValueError("--batch and --steps must be >= 1 and --res a multiple of 32")
    retained = False if args.no_retain_memory else retain_freed_memory()
    print(f"machine: {os.cpu_count()} CPU cores ({_cpu_threads()} usable), {jax.default_backend()} backend "
          f"({jax.devices()[0].device_kind}), jax {jax.__version__}; freed memory retained: {retained}",
          flush=True)
    result = benchmark_train_steps(args.model, args.batch, args.res, steps=args.steps, warmup=args.warmup,
                                   conv_impl=args.conv_impl, dtype=args.dtype, compare_timm=args.compare_timm,
                                   timm_compile=args.timm_compile, profile=args.profile, peak=args.peak_tflops)
    print(_format("jax", result), flush=True)
    mfu = "n/a" if result["mfu"] is None else f"{100 * result['mfu']:.2f}%"
    print(f"MFU (6 x forward MACs per image): {mfu} ({result['peak_source']})", flush=True)
    if args.compare_timm:
        print(_format("timm", result), flush=True)
        print(f"evit_jax / timm: {result['jax_over_timm']:.2f}x", flush=True)
    print(f"host load during the timed steps: {result['host_load']}", flush=True)
    if args.profile:
        print("\n".join(format_profile(result["profile"])), flush=True)
    return result


if __name__ == "__main__":
    main()
