"""Forward-pass benchmark of the EfficientViT models: params, MACs, compile time, images/s, MFU, vs timm.

    python -m evit_jax.tools.benchmark --model efficientvit_b1 --batch 16 --res 224 --compare-timm
    python -m evit_jax.tools.benchmark --model efficientvit_seg_b0_cityscapes --batch 1 --res 1024x2048
    python -m evit_jax.tools.benchmark --all          # README table: params and GMACs of every model vs the papers

MACs are the exact analytic count of evit_jax.models.flops (convs, linears and attention matmuls, the papers'
convention); XLA's own estimate (`compiled.cost_analysis()` flops / 2, which also counts elementwise ops)
is printed beside it. Images/s is the median over `--iters` timed calls of the jitted eval-mode forward
(`block_until_ready` each call) after warm-up; the batch is split over all local devices. MFU = 2 x MACs x
images/s / peak. With `--compare-timm` the same-named timm model runs in the same process, eager,
`torch.inference_mode()`, channels_last, same batch/resolution/dtype/thread count, timed in phases that
alternate with the JAX phases (A B A B) so that both see the same machine load. The last line gives that
load for each framework's timed calls: the share of all CPUs' time stolen by the hypervisor and the share
used by other processes (/proc/stat; Linux only).

`--sweep-resolution ...` hands the command line to evit_jax.tools.cost_sweep (attention cost vs resolution).
"""

from __future__ import annotations

import argparse
import dataclasses
import operator
import os
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from evit_jax import cli, host_memory
from evit_jax.models import flops
from evit_jax.models import create_model, get_model_spec, list_models
from evit_jax.models.fold import folded_model
from evit_jax.tools import chips

# Published figures (the READMEs of mit-han-lab/efficientvit applications/efficientvit_{cls,seg}; detection: the
# paper's first version): model -> (params M, GMACs, res).
PAPER_FIGURES: dict[str, tuple[float | None, float | None, tuple[int, int]]] = {
    "efficientvit_b0": (3.41, 0.10, (224, 224)),
    "efficientvit_b1": (9.10, 0.52, (224, 224)),
    "efficientvit_b2": (24.33, 1.6, (224, 224)),
    "efficientvit_b3": (48.65, 3.95, (224, 224)),
    "efficientvit_l1": (52.65, 5.26, (224, 224)),
    "efficientvit_l2": (63.71, 6.95, (224, 224)),
    "efficientvit_l3": (246.04, 27.6, (224, 224)),
    "efficientvit_seg_b0_cityscapes": (0.71, 4.4, (1024, 2048)),
    "efficientvit_seg_b1_cityscapes": (4.80, 25.0, (1024, 2048)),
    "efficientvit_seg_b2_cityscapes": (15.32, 74.0, (1024, 2048)),
    "efficientvit_seg_b3_cityscapes": (39.60, 179.0, (1024, 2048)),
    "efficientvit_seg_l1_cityscapes": (40.24, 282.0, (1024, 2048)),
    "efficientvit_seg_l2_cityscapes": (52.61, 396.0, (1024, 2048)),
    "efficientvit_seg_b1_ade20k": (4.79, 3.1, (512, 512)),
    "efficientvit_seg_b2_ade20k": (15.29, 9.1, (512, 512)),
    "efficientvit_seg_b3_ade20k": (39.55, 22.0, (512, 512)),
    "efficientvit_seg_l1_ade20k": (40.41, 36.0, (512, 512)),
    "efficientvit_seg_l2_ade20k": (51.46, 45.0, (512, 512)),
    # Detection at 640x640: arXiv 2205.14756 v1 gives 42.6 COCO AP at 4.4 GMACs for its YOLOX detector, whose
    # counterpart here is efficientvit_v1_det_b1 (docs/detection.md); the other detectors have no published figure.
    **{f"efficientvit_{d}det_{v}": (None, None, (640, 640)) for d in ("", "v1_") for v in ("b0", "b1", "b2", "b3")},
    "efficientvit_v1_det_b1": (None, 4.4, (640, 640)),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MAC_METHOD = "analytic count of convs, linears and attention matmuls (evit_jax.models.flops)"


def parse_resolution(text: str | int) -> tuple[int, int]:
    """`224` -> (224, 224); `1024x2048` -> (1024, 2048) (height x width)."""
    parts = str(text).lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--res must be N or HxW (e.g. 224 or 1024x2048), got {text!r}") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) <= 0:
        raise ValueError(f"--res must be N or HxW (e.g. 224 or 1024x2048), got {text!r}")
    return sizes[0], sizes[1]


def peak_tflops(device: jax.Device, dtype: str, override: float | None = None) -> tuple[float | None, str]:
    """(peak TFLOP/s, where the number comes from) for MFU; None when the device kind is unknown."""
    if override is not None:
        return override, "--peak-tflops"
    chip = chips.chip_for(device.device_kind, device.platform)
    if chip is None:
        return None, f"unknown device kind {device.device_kind!r}: pass --peak-tflops for MFU"
    if chip is chips.CPU:
        return chip.f32_tflops, "CPU: 380 GFLOP/s float32 matmul measured on the 2-core dev machine"
    return chip.peak_tflops(dtype), f"{device.device_kind} {dtype} dense peak (datasheet)"


@dataclasses.dataclass(frozen=True)
class HostCpuTimes:
    """Cumulative CPU seconds of the whole machine (all CPUs, from /proc/stat) and of this process."""

    busy: float  # user, nice, system, irq, softirq (guest time is counted inside user)
    idle: float  # idle and iowait
    steal: float  # time the hypervisor gave this VM's CPUs to someone else
    own: float  # this process, every thread (resource.getrusage)

    def __add__(self, other: HostCpuTimes) -> HostCpuTimes:
        return HostCpuTimes(*map(operator.add, dataclasses.astuple(self), dataclasses.astuple(other)))

    def __sub__(self, other: HostCpuTimes) -> HostCpuTimes:
        return HostCpuTimes(*map(operator.sub, dataclasses.astuple(self), dataclasses.astuple(other)))


def parse_proc_stat(text: str, ticks_per_second: float) -> tuple[float, float, float]:
    """(busy, idle, steal) seconds from /proc/stat's aggregate `cpu` line."""
    fields = [int(v) for v in text.split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields + [0] * (8 - len(fields))
    return ((user + nice + system + irq + softirq) / ticks_per_second, (idle + iowait) / ticks_per_second,
            steal / ticks_per_second)


def read_host_cpu_times() -> HostCpuTimes | None:
    """The machine's and this process's CPU time now; None where there is no /proc/stat (not Linux)."""
    try:
        import resource  # noqa: PLC0415 - Unix only

        with open("/proc/stat") as f:
            busy, idle, steal = parse_proc_stat(f.read(), os.sysconf("SC_CLK_TCK"))
    except (ImportError, OSError, ValueError, AttributeError):
        return None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return HostCpuTimes(busy, idle, steal, usage.ru_utime + usage.ru_stime)


# /proc/stat counts in clock ticks (10 ms): below this much CPU time (all CPUs together) a share would be
# off by several percent, so none is given.
MIN_HOST_CPU_SECONDS = 0.5


@dataclasses.dataclass
class Timing:
    """Per-call seconds of a benchmarked callable, and the host's CPU time over those calls.

    `host` (None off Linux) sums the timed calls' intervals: from it, `steal_share` is the share of the
    machine's CPU time that the hypervisor took (a contended cloud host), `other_share` the share used by
    other processes. Figures measured with either far from zero are not comparable with a quiet run.
    """

    seconds: list[float]
    host: HostCpuTimes | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    def _share(self, part: Callable[[HostCpuTimes], float]) -> float | None:
        if self.host is None:
            return None
        total = self.host.busy + self.host.idle + self.host.steal
        return min(1.0, max(0.0, part(self.host) / total)) if total >= MIN_HOST_CPU_SECONDS else None

    @property
    def steal_share(self) -> float | None:
        return self._share(lambda host: host.steal)

    @property
    def other_share(self) -> float | None:
        return self._share(lambda host: host.busy - host.own)

    def host_load(self) -> str:
        """'steal 3.1%, other processes 0.4%' (shares of all CPUs' time), or why it is unknown."""
        if self.host is None:
            return "host load unknown (no /proc/stat)"
        if self.steal_share is None:
            return f"host load not measured (timed calls under {MIN_HOST_CPU_SECONDS:g} s of all CPUs' time)"
        return f"steal {100 * self.steal_share:.1f}%, other processes {100 * self.other_share:.1f}%"


def time_in_phases(calls: dict[str, Callable[[], Any]], iters: int, warmup: int = 2, rounds: int = 2,
                   pause_s: float = 0.5) -> dict[str, Timing]:
    """Time each callable `iters` times in `rounds` alternating phases (A..A B..B A..A B..B).

    Phases, not call-by-call interleaving: XLA's and PyTorch's worker threads spin for a while after each
    call, and on a small CPU one framework's spinning threads would steal the cores of the other's next
    call. The pause lets them park; alternating phases still exposes both to the same load trend.
    With several callables every phase starts with one untimed call: both frameworks allocate from the
    same malloc heap, and the first call after the other framework's phase finds it laid out for the
    other's buffers (L1's train step, 2.8 s in steady state, took 9.1 s and 730,000 page faults on its
    first call after timm's; docs/performance.md). A training run never alternates, so steady state is
    what is compared.
    """
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    host: dict[str, HostCpuTimes | None] = {name: HostCpuTimes(0.0, 0.0, 0.0, 0.0) for name in calls}
    per_round = [iters // rounds + (1 if r < iters % rounds else 0) for r in range(rounds)]
    alternating = len(calls) > 1
    for n in per_round:
        for name, fn in calls.items():
            if alternating:
                time.sleep(pause_s)
                fn()
            before = read_host_cpu_times()
            for _ in range(n):
                start = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - start)
            after = read_host_cpu_times()
            both = before is not None and after is not None and host[name] is not None
            host[name] = host[name] + (after - before) if both else None
    return {name: Timing(s, host[name]) for name, s in seconds.items()}


def host_load_figures(timings: dict[str, Timing]) -> dict[str, Any]:
    """The result-dict entries of the host load: NAME_steal_share, NAME_other_share, and host_load, the
    printed line ('jax calls: steal 0.4%, other processes 0.0%; timm calls: ... (of all CPUs' time ...)')."""
    line = "; ".join(f"{name} calls: {timing.host_load()}" for name, timing in timings.items())
    out: dict[str, Any] = {"host_load": f"{line} (of all CPUs' time, /proc/stat)"}
    for name, timing in timings.items():
        out[f"{name}_steal_share"], out[f"{name}_other_share"] = timing.steal_share, timing.other_share
    return out


def count_params(params: Any) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


def _timm_forward(name: str, batch: int, height: int, width: int, dtype: str, threads: int,
                  compile_model: bool = False) -> Callable[[], Any]:
    """A zero-argument timm forward (inference_mode, channels_last; eager, or `torch.compile`d with
    `compile_model`: compiled by the warm-up calls); raises ValueError if unavailable."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import timm  # noqa: PLC0415 - optional, only for --compare-timm
    import torch  # noqa: PLC0415

    if not timm.is_model(name):
        raise ValueError(f"timm has no model {name!r}")
    from evit_jax.tools.train_bench import synchronize, torch_device  # noqa: PLC0415

    torch.set_num_threads(threads)
    device = torch_device()  # the GPU when JAX runs on one: same hardware for both
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = timm.create_model(name, pretrained=False).eval().to(device, torch_dtype,
                                                                memory_format=torch.channels_last)
    x = torch.randn(batch, 3, height, width, dtype=torch_dtype, device=device).contiguous(
        memory_format=torch.channels_last)
    if compile_model:
        model = torch.compile(model)

    def forward():
        with torch.inference_mode():
            out = model(x)
        synchronize(device)
        return out

    return forward


def timm_name_for(name: str) -> tuple[str | None, str]:
    """The timm model of one of ours, or (None, reason)."""
    spec = get_model_spec(name)
    if spec.task == "segmentation":
        return None, "timm has no EfficientViT segmentation models: timm comparison skipped"
    if spec.task == "backbone":
        return None, "timm has no EfficientViT backbone-only models: timm comparison skipped"
    if spec.task == "detection":
        return None, "timm has no EfficientViT detection models: timm comparison skipped"
    if getattr(spec, "design", "v2") not in ("v2", None):
        return None, f"timm has no {spec.name}: timm comparison skipped"
    if spec.variant not in ("b0", "b1", "b2", "b3", "l1", "l2", "l3"):
        return None, f"timm has no efficientvit_{spec.variant}: timm comparison skipped"
    return f"efficientvit_{spec.variant}", ""


def _local_sharding(batch: int):
    devices = jax.local_devices()
    if batch % len(devices):
        raise ValueError(f"--batch {batch} is not divisible by the {len(devices)} local devices; use a multiple")
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    return (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")),
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def benchmark(
    model: str,
    batch: int = 16,
    res: tuple[int, int] | int | str = 224,
    *,
    dtype: str = "float32",
    iters: int = 10,
    warmup: int = 2,
    compare_timm: bool = False,
    peak: float | None = None,
    conv_impl: str = "auto",
    fold_bn: bool = False,
    timm_compile: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Benchmark one model's jitted eval forward; returns the figures it prints.

    fold_bn: time the model with every BatchNorm folded into its conv (evit_jax.models.fold); the MACs and
    the timm reference are unchanged.
    """
    spec = get_model_spec(model)  # unknown name -> ValueError before any work
    height, width = parse_resolution(res)
    if height % 32 or width % 32:
        raise ValueError(f"resolution {height}x{width}: height and width must be multiples of 32")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if batch < 1 or iters < 1:
        raise ValueError("--batch and --iters must be >= 1")
    data_sharding, replicated = _local_sharding(batch)
    timm_name, timm_skip = timm_name_for(spec.name) if compare_timm else (None, "")

    net = create_model(spec.name, dtype=DTYPES[dtype], conv_impl=conv_impl)
    x = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (batch, height, width, 3), jnp.float32), data_sharding)
    init = jax.jit(lambda x: net.init(jax.random.PRNGKey(1), x, train=False), out_shardings=replicated)
    variables = init(x[:1])
    params = count_params(variables["params"])
    if fold_bn:
        net, variables = folded_model(spec.name, variables, dtype=DTYPES[dtype], conv_impl=conv_impl)
    macs = flops.count_macs(spec.name, height, width)

    forward = jax.jit(lambda v, x: net.apply(v, x, train=False))
    start = time.perf_counter()
    compiled = forward.lower(variables, x).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_gmacs = float(cost.get("flops", float("nan"))) / 2 / batch / 1e9 if cost else float("nan")

    out = compiled(variables, x)
    finite = bool(jnp.all(jnp.isfinite(out)))
    calls = {"jax": lambda: compiled(variables, x).block_until_ready()}
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if timm_name:
        calls["timm"] = _timm_forward(timm_name, batch, height, width, dtype, threads, timm_compile)
    timings = time_in_phases(calls, iters, warmup)

    device = jax.local_devices()[0]
    peak_value, peak_source = peak_tflops(device, dtype, peak)
    result: dict[str, Any] = dict(
        model=spec.name, batch=batch, height=height, width=width, dtype=dtype, fold_bn=fold_bn,
        device=device.device_kind,
        num_devices=len(jax.local_devices()), params=params, gmacs=macs / 1e9, xla_gmacs=xla_gmacs,
        compile_s=compile_s, jax_images_per_s=batch / timings["jax"].median,
        jax_images_per_s_best=batch / timings["jax"].best, output_finite=finite, peak_tflops=peak_value,
        peak_source=peak_source, iters=iters, **host_load_figures(timings),
    )
    result["mfu"] = (2 * macs * result["jax_images_per_s"] / (peak_value * 1e12)) if peak_value else None
    if timm_name:
        from evit_jax.tools.train_bench import torch_device  # noqa: PLC0415

        result.update(timm_model=timm_name, timm_threads=threads, timm_device=torch_device(),
                      timm_compile=timm_compile,
                      timm_images_per_s=batch / timings["timm"].median,
                      timm_images_per_s_best=batch / timings["timm"].best)
        result["jax_over_timm"] = result["jax_images_per_s"] / result["timm_images_per_s"]
    _report(result, timm_skip, log)
    return result


def _report(r: dict[str, Any], timm_skip: str, log: Callable[[str], None]) -> None:
    log(f"model            {r['model']}  batch {r['batch']}  {r['height']}x{r['width']}  {r['dtype']}  "
        f"on {r['num_devices']} x {r['device']}{'  (BatchNorm folded into the convs)' if r['fold_bn'] else ''}")
    log(f"params           {r['params'] / 1e6:.2f} M")
    log(f"GMACs/image      {r['gmacs']:.3f}  ({MAC_METHOD}); XLA cost_analysis flops/2: {r['xla_gmacs']:.3f}")
    log(f"compile          {r['compile_s']:.1f} s")
    log(f"JAX images/s     {r['jax_images_per_s']:.1f} (median of {r['iters']}; best {r['jax_images_per_s_best']:.1f})"
        f"  output finite: {r['output_finite']}")
    if r["mfu"] is not None:
        log(f"MFU              {100 * r['mfu']:.2f}% of {r['peak_tflops']:g} TFLOP/s ({r['peak_source']})")
    else:
        log(f"MFU              n/a ({r['peak_source']})")
    if "timm_images_per_s" in r:
        mode = "torch.compile" if r["timm_compile"] else "eager"
        log(f"timm images/s    {r['timm_images_per_s']:.1f} (timm {r['timm_model']}, {mode}, inference_mode, "
            f"channels_last, {r['timm_device']}, {r['timm_threads']} threads; best {r['timm_images_per_s_best']:.1f})")
        log(f"JAX / timm       {r['jax_over_timm']:.2f}x")
    elif timm_skip:
        log(timm_skip)
    log(f"host load        {r['host_load']}")


def model_table(names: Sequence[str] | None = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Params and GMACs of every model (at its paper resolution; 224 px otherwise) beside the published figures,
    printed as a Markdown table."""
    rows = []
    log(f"GMACs: {MAC_METHOD}. Paper figures: official READMEs (detection: arXiv 2205.14756 v1).")
    log("")
    log("| model | input | params (M) | paper params (M) | GMACs | paper GMACs |")
    log("|---|---|---|---|---|---|")
    for name in names or list_models():
        spec = get_model_spec(name)
        paper_params, paper_macs, (h, w) = PAPER_FIGURES.get(spec.name, (None, None, (224, 224)))
        net = create_model(spec.name, conv_impl="lax")
        shapes = jax.eval_shape(lambda x: net.init(jax.random.PRNGKey(0), x, train=False),
                                jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32))
        row = dict(model=spec.name, height=h, width=w, params_m=count_params(shapes["params"]) / 1e6,
                   gmacs=flops.count_macs(spec.name, h, w) / 1e9, paper_params_m=paper_params, paper_gmacs=paper_macs)
        rows.append(row)
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        log(f"| {spec.name} | {h}x{w} | {row['params_m']:.2f} | {fmt(paper_params, '.2f')} | "
            f"{_gmacs_str(row['gmacs'])} | {fmt(paper_macs, '.2f' if paper_macs and paper_macs < 1 else 'g')} |")
    return rows


def _gmacs_str(g: float) -> str:
    return f"{g:.3f}" if g < 10 else f"{g:.1f}"


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m evit_jax.tools.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="efficientvit_b1", help="model name (see evit_jax.models.list_models())")
    p.add_argument("--batch", type=int, default=16, help="global batch, split over the local devices")
    p.add_argument("--res", default="224", help="input size: N or HxW (multiples of 32)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (params stay float32)")
    p.add_argument("--iters", type=int, default=10, help="timed calls (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    p.add_argument("--compare-timm", action="store_true", help="also time the timm model in the same run")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: by device kind)")
    p.add_argument("--conv-impl", choices=("auto", "lax", "fast"), default="auto", help="see evit_jax.models.ops")
    p.add_argument("--timm-compile", action="store_true", help="with --compare-timm: torch.compile timm's model")
    p.add_argument("--fold-bn", action="store_true",
                   help="fold every BatchNorm into its conv before timing (evit_jax.models.fold)")
    p.add_argument("--all", action="store_true", help="print params and GMACs of every model as a Markdown table")
    p.add_argument("--no-retain-memory", action="store_true",
                   help="keep JAX's asynchronous CPU dispatch and glibc's malloc defaults, which "
                        "page-fault large blocks in on every call (see evit_jax.host_memory)")
    return p


def main(argv: Sequence[str] | None = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a.startswith("--sweep-resolution") for a in argv):
        from evit_jax.tools import cost_sweep  # noqa: PLC0415 - a separate tool sharing this entry point

        return cost_sweep.main(argv)
    args = build_parser().parse_args(argv)
    if args.all:
        return model_table()
    if not args.no_retain_memory:
        host_memory.retain_freed_memory()
    return benchmark(args.model, args.batch, args.res, dtype=args.dtype, iters=args.iters, warmup=args.warmup,
                     compare_timm=args.compare_timm, peak=args.peak_tflops, conv_impl=args.conv_impl,
                     fold_bn=args.fold_bn, timm_compile=args.timm_compile)


if __name__ == "__main__":
    main()
