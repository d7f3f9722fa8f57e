"""Cost versus resolution of the attention variants: forward latency and peak memory per input size.

    python -m evit_jax.tools.cost_sweep --sweep-resolution 224,512,1024,2048 --attention relu_linear,softmax \
        --target block --out-dir /tmp/cost

(`python -m evit_jax.tools.benchmark --sweep-resolution ... --attention ...` calls the same `main`.)

Targets
-------
* `block` (default): ONE EfficientViTBlock at B1's stage-4 settings (width 256, head dim 16, expand 4,
  hard swish, multi-scale aggregation (5,) unless the spec says otherwise) on the stride-32 token grid
  of each resolution: a 1024 px image gives a 32 x 32 = 1024-token map (`--token-stride` changes the
  grid; 16 gives stage-3-like grids four times larger).
* `model`: the whole `--model` (default efficientvit_b1) on a res x res image.

Per (variant, resolution) the forward pass is compiled ahead of time; the peak memory is XLA's own
estimate `compiled.memory_analysis()` (temp + argument + output bytes). A variant whose estimate is over
`--memory-limit-gb` (default: half the available RAM), or whose compilation/run raises an out-of-memory
error (RESOURCE_EXHAUSTED), is recorded as OOM and the sweep goes on. Latency is the median of
`--repeats` timed runs (fewer once a point has taken `--max-seconds` of timed runs) after one warm-up run;
the minimum, not the mean, because the CPU is shared and disturbances only ever add time. The process CPU
time of the same runs (`cpu_ms`, all XLA threads) is recorded too: on a machine shared with other jobs it
is the steadier measure of cost (wall time includes waiting for a core), and its slope is printed beside.

Outputs in `--out-dir`: `cost_sweep.csv`, `cost_sweep.png` (log-log latency and memory against the
number of tokens, with slope-1 and slope-2 reference lines) and, printed, the fitted log-log slope of
latency against the number of tokens (pixels) per variant over resolutions >= `--fit-min-resolution`.
A slope of 1 is linear cost in the number of pixels, 2 quadratic.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from evit_jax import cli
from evit_jax.models import create_model, get_model_spec
from evit_jax.models.attention import EfficientViTBlock
from evit_jax.models.attention_kernels import parse_attention, split_attention_specs
from evit_jax.models.layers import LayerConfig
from evit_jax.models.random_weights import random_variables

B1_STAGE4 = dict(width=256, dim=16, expand_ratio=4, scales=(5,), act="hswish")
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM", "Allocation")


@dataclasses.dataclass
class CostRow:
    variant: str
    target: str
    resolution: int
    tokens: int
    status: str  # "ok" | "OOM"
    latency_ms: float = float("nan")
    cpu_ms: float = float("nan")
    peak_memory_mb: float = float("nan")
    gflops: float = float("nan")
    note: str = ""


def parse_resolutions(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sweep-resolution must be comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 or v % 32 for v in values):
        raise ValueError(f"--sweep-resolution values must be positive multiples of 32, got {text!r}")
    return sorted(set(values))


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def build_target(target: str, attention: str, resolution: int, *, model_name: str, batch: int, dtype: Any,
                 token_stride: int) -> tuple[Any, jax.ShapeDtypeStruct, int]:
    """(module, input spec, number of tokens/pixels used as the x axis) for one sweep point."""
    if target == "block":
        side = resolution // token_stride
        if side < 1:
            raise ValueError(f"resolution {resolution} is smaller than --token-stride {token_stride}")
        s = B1_STAGE4
        module = EfficientViTBlock(LayerConfig(dtype=dtype), dim=s["dim"], expand_ratio=s["expand_ratio"],
                                   scales=s["scales"], act=s["act"], attention=attention)
        return module, jax.ShapeDtypeStruct((batch, side, side, s["width"]), dtype), side * side
    module = create_model(model_name, attention=attention, dtype=dtype)
    return module, jax.ShapeDtypeStruct((batch, resolution, resolution, 3), dtype), resolution * resolution


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or any(m in str(error) for m in OOM_MARKERS)


def _memory_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)


def _flops(compiled) -> float:
    try:
        analysis = compiled.cost_analysis()
        if isinstance(analysis, (list, tuple)):
            analysis = analysis[0]
        return float(analysis.get("flops", float("nan")))
    except Exception:
        return float("nan")


def measure_point(variant: str, target: str, resolution: int, *, model_name: str = "efficientvit_b1", batch: int = 1,
                  dtype: Any = jnp.float32, token_stride: int = 32, repeats: int = 5,
                  memory_limit_bytes: int | None = None, max_seconds: float = 20.0) -> CostRow:
    """Latency and peak memory of one (variant, resolution); OOM is a result, never an exception."""
    module, spec, tokens = build_target(target, variant, resolution, model_name=model_name, batch=batch, dtype=dtype,
                                        token_stride=token_stride)
    row = CostRow(variant, target, resolution, tokens, "ok")
    limit = available_memory_bytes() // 2 if memory_limit_bytes is None else memory_limit_bytes
    try:
        variables = random_variables(module, spec.shape, dtype=spec.dtype)
        forward = jax.jit(lambda v, x: module.apply(v, x, train=False))
        compiled = forward.lower(variables, spec).compile()
        memory = _memory_bytes(compiled)
        row.gflops = _flops(compiled) / 1e9
        if memory is not None:
            row.peak_memory_mb = memory / 2**20
            if memory > limit:
                row.status, row.note = "OOM", f"estimate {memory / 2**30:.1f} GiB > limit {limit / 2**30:.1f} GiB"
                return row
        x = jnp.asarray(np.random.default_rng(1).standard_normal(spec.shape), spec.dtype)
        jax.block_until_ready(compiled(variables, x))
        times, cpu_times = [], []
        while len(times) < max(repeats, 1) and sum(times) < max_seconds:
            start, cpu_start = time.perf_counter(), time.process_time()
            jax.block_until_ready(compiled(variables, x))
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        row.latency_ms = 1e3 * min(times)  # the least-disturbed run: this CPU is shared
        row.cpu_ms = 1e3 * min(cpu_times)
    except Exception as error:  # noqa: BLE001 - only out-of-memory errors are results
        if not _is_oom(error):
            raise
        row.status, row.note = "OOM", str(error).splitlines()[0][:200]
    return row


def fit_slope(rows: Sequence[CostRow], min_resolution: int = 0, key: str = "latency_ms") -> float:
    """Least-squares slope of log(`key`) against log(tokens) over the OK rows (nan if < 2 points)."""
    pts = [(math.log(r.tokens), math.log(getattr(r, key))) for r in rows
           if r.status == "ok" and r.resolution >= min_resolution and getattr(r, key) > 0]
    if len(pts) < 2:
        return float("nan")
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def write_csv(rows: Sequence[CostRow], path: str) -> None:
    fields = [f.name for f in dataclasses.fields(CostRow)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in dataclasses.asdict(r).items()})


def plot(rows: Sequence[CostRow], path: str, title: str, slopes: dict[str, dict[str, float]]) -> None:
    """Log-log latency, CPU time and memory against tokens, with slope-1 and slope-2 reference lines.
    `slopes`: {"latency_ms" | "cpu_ms": {variant: fitted slope}} for the legends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r.variant for r in rows))
    panels = (("latency_ms", "forward latency (ms, wall, best run)"), ("cpu_ms", "forward CPU time (ms, all threads)"),
              ("peak_memory_mb", "peak memory estimate (MiB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(18, 5))
    for ax, (key, label) in zip(axes, panels):
        anchor = None
        for v in variants:
            ok = [r for r in rows if r.variant == v and r.status == "ok" and getattr(r, key) == getattr(r, key)]
            oom = [r for r in rows if r.variant == v and r.status == "OOM"]
            name = f"{v} (slope {slopes[key][v]:.2f})" if v in slopes.get(key, {}) else v
            line, = ax.plot([r.tokens for r in ok], [getattr(r, key) for r in ok], "o-", label=name)
            for r in oom:
                ax.axvline(r.tokens, color=line.get_color(), ls=":", lw=1)
                ax.annotate("OOM", (r.tokens, ax.get_ylim()[1] if ok else 1.0), color=line.get_color(), fontsize=8)
            if ok and anchor is None:
                anchor = (ok[0].tokens, getattr(ok[0], key))
        if anchor is not None:
            xs = np.array(sorted({r.tokens for r in rows}), dtype=float)
            for p, style in ((1, "k--"), (2, "k:")):
                ax.plot(xs, anchor[1] * (xs / anchor[0]) ** p, style, lw=1, label=f"slope {p} ({'linear' if p == 1 else 'quadratic'})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens (H*W of the attention map)" if rows and rows[0].target == "block" else "pixels (H*W)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        res_ticks = sorted({(r.tokens, r.resolution) for r in rows})
        for tokens, res in res_ticks:
            ax.annotate(f"{res}px", (tokens, ax.get_ylim()[0]), fontsize=7, rotation=90, va="bottom")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m evit_jax.tools.cost_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep-resolution", default="224,512,1024,2048", help="comma-separated input sizes (px)")
    p.add_argument("--attention", default="relu_linear,softmax",
                   help="comma-separated attention specs, e.g. 'relu_linear,softmax,focused(power=2)'")
    p.add_argument("--target", choices=("block", "model"), default="block")
    p.add_argument("--model", default="efficientvit_b1", help="model of --target model")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--token-stride", type=int, default=32, help="block target: input px per token side")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=20.0, help="stop repeating a point after this much timing")
    p.add_argument("--memory-limit-gb", type=float, default=None, help="OOM above this estimate (default: half of free RAM)")
    p.add_argument("--fit-min-resolution", type=int, default=512, help="fit slopes over resolutions >= this")
    p.add_argument("--out-dir", default="cost_sweep", help="where cost_sweep.csv and cost_sweep.png go")
    return p


def run_sweep(variants: Sequence[str], resolutions: Sequence[int], *, target: str = "block", log: Callable = print,
              **point_kw) -> list[CostRow]:
    rows = []
    for v in variants:
        for res in resolutions:
            row = measure_point(v, target, res, **point_kw)
            log(f"{v:<32} {res:>5}px tokens={row.tokens:<8} {row.status:<3} latency={row.latency_ms:10.2f} ms "
                f"cpu={row.cpu_ms:10.2f} ms "
                f"mem={row.peak_memory_mb:10.1f} MiB {row.note}")
            rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """CLI entry: validates every argument first, then sweeps, writes CSV + PNG, prints slopes."""
    args = build_parser().parse_args(argv)
    resolutions = parse_resolutions(args.sweep_resolution)
    variants = split_attention_specs(args.attention)
    if not variants:
        raise ValueError("--attention needs at least one attention spec, e.g. relu_linear,softmax")
    for v in variants:
        parse_attention(v)  # one clear ValueError for an unknown kernel or option, before any work
    if args.target == "model":
        get_model_spec(args.model)
    if args.batch < 1 or args.repeats < 1 or args.token_stride < 1:
        raise ValueError("--batch, --repeats and --token-stride must be >= 1")
    if args.target == "block" and resolutions[0] < args.token_stride:
        raise ValueError(f"every resolution must be >= --token-stride {args.token_stride}")
    os.makedirs(args.out_dir, exist_ok=True)
    limit = None if args.memory_limit_gb is None else int(args.memory_limit_gb * 2**30)
    dtype = jnp.dtype(args.dtype)

    print(f"cost sweep on {jax.devices()[0].device_kind} ({jax.default_backend()}), target={args.target}, "
          f"batch={args.batch}, dtype={args.dtype}", flush=True)
    rows = run_sweep(variants, resolutions, target=args.target, model_name=args.model, batch=args.batch, dtype=dtype,
                     token_stride=args.token_stride, repeats=args.repeats, memory_limit_bytes=limit, max_seconds=args.max_seconds,
                     log=lambda s: print(s, flush=True))
    slopes = {v: fit_slope([r for r in rows if r.variant == v], args.fit_min_resolution) for v in variants}
    cpu_slopes = {v: fit_slope([r for r in rows if r.variant == v], args.fit_min_resolution, "cpu_ms") for v in variants}
    csv_path, png_path = os.path.join(args.out_dir, "cost_sweep.csv"), os.path.join(args.out_dir, "cost_sweep.png")
    write_csv(rows, csv_path)
    what = "one B1 stage-4 EfficientViTBlock (width 256, dim 16)" if args.target == "block" else args.model
    plot(rows, png_path, f"{what}, batch {args.batch}, {args.dtype}, {jax.default_backend()}",
         {"latency_ms": slopes, "cpu_ms": cpu_slopes})
    for v, s in slopes.items():
        print(f"slope {v}: {s:.3f} latency, {cpu_slopes[v]:.3f} CPU time "
              f"(log-log against tokens, resolutions >= {args.fit_min_resolution}px)")
    print(f"wrote {csv_path} and {png_path}")
    return slopes


if __name__ == "__main__":
    cli.run(main, "python -m evit_jax.tools.cost_sweep")
