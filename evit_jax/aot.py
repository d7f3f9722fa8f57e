"""Plan a run on a Cloud TPU slice without the slice: compile the trainer's own steps for the slice's
topology on this machine and report memory, cost, an estimated throughput and the collectives.

    python -m evit_jax.aot --config=configs/imagenet.py:l3 --topology=v5e-256 \
        [--config.sharding.strategy=fsdp] [--batch_per_chip=N | --config.global_batch_size=N] \
        [--resolutions=224] [--noeval] [--find_max_batch] [--out=report.json]

It builds the same Experiment as `python -m evit_jax.main` (`evit_jax.train.loop.setup_experiment`:
the same mesh, state shardings and compiled train/eval steps) over the abstract devices of the
topology (`jax.experimental.topologies`, which needs `libtpu`; nothing runs on a TPU). The dataset
is not read: its facts are the published ones (`DatasetTask.use_published_facts`; a dataset without
them needs ``--dataset_facts=data`` or ``--config.model.num_classes``). Step times are a ROOFLINE
ESTIMATE from the compiler's per-chip FLOPs and bytes accessed against the chip's peak and HBM
bandwidth (`evit_jax.tools.chips`), not a measurement. See docs/aot.md.
"""

from __future__ import annotations

import os

# Compile for the slice only: never try to open a local TPU (its runtime would take libtpu's
# single-process lock, and print errors on a machine without one).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config: configs/<file>.py[:<arg>].", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "The slice: accelerator type (v5e-16, v4-32) or topology (v5e:4x4).")
_BATCH_PER_CHIP = flags.DEFINE_integer("batch_per_chip", None, "Training images per chip (sets global_batch_size).")
_EVAL_BATCH_PER_CHIP = flags.DEFINE_integer("eval_batch_per_chip", None, "Eval images per chip (sets eval_batch_size).")
_RESOLUTIONS = flags.DEFINE_list("resolutions", None, "Train resolutions to compile (e.g. 224 or 512x1024); default all.")
_EVAL = flags.DEFINE_bool("eval", True, "Also compile the eval step(s).")
_FIND_MAX = flags.DEFINE_bool("find_max_batch", False, "Search the largest per-chip batch whose train step fits.")
_BATCH_STEP = flags.DEFINE_integer("batch_step", 8, "Granularity of --find_max_batch (per-chip images).")
_FACTS = flags.DEFINE_enum("dataset_facts", "published", ["published", "data"],
                           "published: the datasets' published facts (no data read); data: read the prepared dataset.")
_OUT = flags.DEFINE_string("out", None, "Write the report as JSON here.")
_HLO_DIR = flags.DEFINE_string("hlo_dir", None, "Write each compiled step's optimised HLO text here (for reading).")
flags.mark_flags_as_required(["config", "topology"])

GiB = 2 ** 30


class DoesNotFit(ValueError):
    """A step needs more memory per chip than the chip has."""


_REMEDY = ("lower the batch (--batch_per_chip / --config.global_batch_size; --find_max_batch finds the largest), "
           "shard the parameters (--config.sharding.strategy=fsdp) or compute in bfloat16 "
           "(--config.model.dtype=bfloat16).")


# ---------------------------------------------------------------------------- the slice
@contextlib.contextmanager
def _quiet_stderr():
    """Silences the C++ runtime's stderr (libtpu warns about TPU_ACCELERATOR_TYPE and
    TPU_WORKER_HOSTNAMES on a machine that is not a TPU host: harmless for compiling)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def topology_devices(name: str) -> tuple[Any, list]:
    """(the chips.Slice, its abstract devices) for a slice name; one ValueError for an unknown name
    or a missing libtpu."""
    import jax
    from jax.experimental import topologies

    from evit_jax.tools import chips

    tpu_slice = chips.find_slice(name)
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(f"compiling for a TPU topology needs libtpu, which is not installed: "
                         f"pip install 'jax[tpu]=={jax.__version__}' (or the libtpu pin of requirements-test.txt).")
    with _quiet_stderr():
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=tpu_slice.topology, chip_config_name=tpu_slice.chip_config,
            chips_per_host_bounds=tpu_slice.chips_per_host_bounds, wrap=tpu_slice.wrap)
    return tpu_slice, list(topology.devices)


# ---------------------------------------------------------------------------- one step
def _is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "exceeds the memory" in text


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def step_report(compiled, *, what: str, batch_per_chip: int, macs_per_image: int, passes: int,
                chip, dtype: str, compile_s: float, compile_cpu_s: float | None = None) -> dict:
    """Everything the report says about one compiled step (see `hlo_stats`)."""
    from evit_jax.train import hlo_stats

    mem = hlo_stats.memory(compiled)
    cost = hlo_stats.cost(compiled)
    peak = chip.peak_tflops(dtype)
    roof = hlo_stats.roofline_seconds(cost["flops"], cost["bytes_accessed"], peak, chip.hbm_gb_per_s)
    found = hlo_stats.collectives(compiled.as_text())
    summary = hlo_stats.summarize(found)
    collective_bytes = sum(v["bytes"] for v in summary.values())
    model_flops = 2.0 * passes * macs_per_image * batch_per_chip
    step_s = roof["step_s"]
    # Temporaries grow with the batch, the rest (state, code) does not: the batch at which the chip
    # would be full, extrapolated linearly from this one compile (--find_max_batch compiles to check).
    per_image = mem["temporaries"] / max(batch_per_chip, 1)
    room = chip.hbm_gib * GiB - (mem["total"] - mem["temporaries"])
    max_batch = int(room // per_image) if per_image > 0 else None
    optimal = cost["optimal_seconds"]
    return {
        "step": what, "batch_per_chip": batch_per_chip, "compile_s": compile_s, "compile_cpu_s": compile_cpu_s,
        "max_batch_per_chip_extrapolated": max_batch,
        "memory_bytes": mem, "hbm_bytes": int(chip.hbm_gib * GiB), "fits": mem["total"] <= chip.hbm_gib * GiB,
        "flops": cost["flops"], "bytes_accessed": cost["bytes_accessed"],
        "roofline": roof,
        "compiler_optimal_seconds": optimal if optimal > 0 else None,
        "images_per_s_per_chip": batch_per_chip / step_s if step_s > 0 else None,
        "model_flops": model_flops,
        "mfu": model_flops / (step_s * peak * 1e12) if step_s > 0 else None,
        "collectives": summary, "collective_bytes": collective_bytes,
        "ici_seconds": collective_bytes / (chip.ici_gb_per_s * 1e9) if chip.ici_gb_per_s else None,
        "largest_collectives": [{"kind": c.kind, "shape": c.shapes, "bytes": c.bytes}
                                for c in sorted(found, key=lambda c: -c.bytes)[:5]],
    }


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_step(r: dict) -> str:
    m = r["memory_bytes"]
    roof = r["roofline"]
    lines = [
        f"{r['step']} ({r['batch_per_chip']} per chip): compiled in {r['compile_s']:.1f} s"
        + (f" ({r['compile_cpu_s']:.1f} s of CPU)" if r.get("compile_cpu_s") is not None else ""),
        f"  HBM per chip: arguments {m['arguments'] / GiB:.2f} GiB, temporaries {m['temporaries'] / GiB:.2f}, "
        f"outputs {m['outputs'] / GiB:.2f} ({m['aliased'] / GiB:.2f} aliased to arguments), code "
        f"{m['code'] / GiB:.3f} -> total {m['total'] / GiB:.2f} of {r['hbm_bytes'] / GiB:.1f} GiB: "
        + ("fits" if r["fits"] else "DOES NOT FIT")
        + (f" (full at ~{r['max_batch_per_chip_extrapolated']} per chip, extrapolated)"
           if r["max_batch_per_chip_extrapolated"] is not None else ""),
        f"  per chip per step: {r['flops'] / 1e9:.1f} GFLOP (compiled), {r['bytes_accessed'] / 1e9:.1f} GB accessed; "
        f"roofline estimate {roof['step_s'] * 1e3:.2f} ms ({roof['bound']}-bound: compute {roof['compute_s'] * 1e3:.2f} ms, "
        f"memory {roof['memory_s'] * 1e3:.2f} ms); compiler's estimate "
        + (f"{r['compiler_optimal_seconds'] * 1e3:.2f} ms" if r["compiler_optimal_seconds"] else "n/a (not positive)"),
        f"  estimated (roofline) {r['images_per_s_per_chip']:.0f} images/s per chip, MFU {100 * r['mfu']:.1f}% "
        f"(model FLOPs {r['model_flops'] / 1e9:.1f} G per chip per step)",
        "  collectives: " + (", ".join(f"{k} {v['count']}x {_fmt_bytes(v['bytes'])}"
                                       for k, v in r["collectives"].items() if v["count"]) or "none")
        + (f"; {r['ici_seconds'] * 1e3:.2f} ms at the ICI bandwidth" if r["ici_seconds"] is not None else ""),
    ]
    if r["largest_collectives"]:
        lines.append("  largest: " + ", ".join(f"{c['kind']} {c['shape']} {_fmt_bytes(c['bytes'])}"
                                               for c in r["largest_collectives"][:3]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the run
def for_tpu(config):
    """A copy of ``config`` for compiling on this machine what a TPU host would compile: conv_impl
    "auto" picks by the DEFAULT backend (here the CPU's formulations, `evit_jax.models.ops.use_fast_path`),
    while on the slice it resolves to lax.conv."""
    config = config.copy_and_resolve_references()
    if config.model.conv_impl == "auto":
        config.model.conv_impl = "lax"
    return config


def _with_batches(config, chips: int, batch_per_chip: int | None, eval_per_chip: int | None):
    config = config.copy_and_resolve_references()
    if batch_per_chip is not None:
        config.global_batch_size = int(batch_per_chip) * chips
    if eval_per_chip is not None:
        config.eval_batch_size = int(eval_per_chip) * chips
    return config


def _parse_resolutions(values, available) -> list:
    if not values:
        return list(available)
    chosen = []
    for v in values:
        h, _, w = v.partition("x")
        res = (int(h), int(w or h))
        if res not in available:
            raise ValueError(f"--resolutions: {v} is not a training resolution of this config "
                             f"({', '.join(f'{a}x{b}' for a, b in available)}).")
        chosen.append(res)
    return chosen


def _compile(compile_fn: Callable, what: str, chip, config, chips: int):
    try:
        return compile_fn()
    except Exception as e:  # the TPU compiler's out-of-memory error (an XlaRuntimeError)
        if not _is_out_of_memory(e):
            raise
        per_chip = config.global_batch_size // chips
        raise DoesNotFit(f"{what} does not fit in the {chip.hbm_gib:.0f} GiB of a {chip.name} chip at {per_chip} "
                         f"images per chip ({_first_line(e)[:200]}); " + _REMEDY) from None


def _save_hlo(hlo_dir: str | None, what: str, compiled) -> None:
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        with open(os.path.join(hlo_dir, what.replace(" ", "_").replace("/", "_") + ".hlo.txt"), "w") as f:
            f.write(compiled.as_text())


def plan(config, topology: str, *, resolutions=None, include_eval: bool = True,
         published_facts: bool = True, hlo_dir: str | None = None) -> dict:
    """Compiles the run's steps for ``topology`` and returns the report (a JSON-able dict)."""
    from evit_jax.models.flops import count_macs
    from evit_jax.tools import chips as chip_table
    from evit_jax.train import loop

    tpu_slice, devices = topology_devices(topology)
    chip = chip_table.CHIPS[tpu_slice.chip]
    config = for_tpu(config)
    experiment = loop.setup_experiment(config, devices, published_facts=published_facts)
    n = len(devices)
    hosts = len({d.process_index for d in devices})
    dtype = config.model.dtype
    report = {"config": config.to_dict() if hasattr(config, "to_dict") else None,
              "slice": tpu_slice.name, "topology": tpu_slice.topology, "chip": chip.name, "chips": n, "hosts": hosts,
              "strategy": config.sharding.strategy, "mesh": dict(experiment.mesh.shape),
              "global_batch_size": int(config.global_batch_size), "eval_batch_size": int(config.eval_batch_size),
              "dtype": dtype, "published_facts": published_facts, "steps": []}
    model_name = experiment.task.model_name
    for res in _parse_resolutions(resolutions, experiment.task.train_resolutions()):
        what = f"train step {res[0]}x{res[1]}"
        cpu0 = time.process_time()
        compiled = _compile(lambda: experiment.compile_train_step(res), what, chip, config, n)
        cpu_s = time.process_time() - cpu0
        _save_hlo(hlo_dir, what, compiled)
        report["steps"].append(step_report(
            compiled, what=what, batch_per_chip=config.global_batch_size // n,
            macs_per_image=count_macs(model_name, *res), passes=3, chip=chip, dtype=dtype,
            compile_s=experiment.compile_seconds[what], compile_cpu_s=cpu_s))
        print(format_step(report["steps"][-1]), flush=True)
    if include_eval:
        for key in experiment.task.eval_batch_keys():
            before = set(experiment.compile_seconds)
            cpu0 = time.process_time()
            compiled, spec = _compile(lambda: experiment.eval_executable(key), f"eval step {key}", chip, config, n)
            cpu_s = time.process_time() - cpu0
            what = (set(experiment.compile_seconds) - before).pop()
            _save_hlo(hlo_dir, what, compiled)
            image = spec["image"].shape
            report["steps"].append(step_report(
                compiled, what=what, batch_per_chip=config.eval_batch_size // n,
                macs_per_image=count_macs(model_name, image[1], image[2]), passes=1, chip=chip, dtype=dtype,
                compile_s=experiment.compile_seconds[what], compile_cpu_s=cpu_s))
            print(format_step(report["steps"][-1]), flush=True)
    return report


def find_max_batch(config, topology: str, *, step: int = 8, published_facts: bool = True,
                   probe: Callable[[Any, int], int | None] | None = None) -> dict:
    """The largest per-chip training batch (a multiple of ``step``) whose train step at the largest
    training resolution fits in the chip's memory. Compiles a few sizes: a linear model of memory in
    the batch proposes the next size (at most double the largest that fits), and bisection between
    the largest fitting and smallest failing sizes guarantees the end. ``probe(config, per_chip)`` -> total bytes per chip or None when it
    does not fit (default: compile for ``topology``)."""
    from evit_jax.tools import chips as chip_table
    from evit_jax.train import loop

    tpu_slice, devices = topology_devices(topology)
    chip = chip_table.CHIPS[tpu_slice.chip]
    n = len(devices)
    capacity = chip.hbm_gib * GiB

    def default_probe(cfg, per_chip):
        experiment = loop.setup_experiment(for_tpu(_with_batches(cfg, n, per_chip, None)), devices,
                                           published_facts=published_facts)
        res = max(experiment.task.train_resolutions(), key=lambda r: r[0] * r[1])
        try:
            compiled = experiment.compile_train_step(res)
        except Exception as e:
            if _is_out_of_memory(e):
                return None
            raise
        from evit_jax.train import hlo_stats

        total = hlo_stats.memory(compiled)["total"]
        return total if total <= capacity else None

    probe = probe or default_probe
    tried: dict[int, int | None] = {}
    start = max(step, (config.global_batch_size // n) // step * step)
    per_chip = start
    while True:
        tried[per_chip] = probe(config, per_chip)
        print(f"batch {per_chip} per chip: " + ("does not fit" if tried[per_chip] is None
                                                 else f"{tried[per_chip] / GiB:.2f} GiB"), flush=True)
        fits = sorted(b for b, m in tried.items() if m is not None)
        fails = sorted(b for b, m in tried.items() if m is None)
        lo = fits[-1] if fits else 0
        hi = fails[0] if fails else None
        if hi is not None and hi - lo <= step:
            break
        if hi is None and lo >= 65536:
            break
        guess = None
        if len(fits) >= 2:  # memory ~ a + c * batch through the two largest fitting sizes
            b0, b1 = fits[-2], fits[-1]
            slope = (tried[b1] - tried[b0]) / (b1 - b0)
            if slope > 0:
                guess = int((capacity - tried[b1]) / slope + b1) // step * step
        if guess is not None and guess <= lo:
            guess = lo + step  # the line puts the limit at lo: one probe confirms it
        if hi is None:
            # At most double: where the compiler changes its schedule, memory flattens out and the line
            # points far past the limit (B1 on v5e-16: 14.61 GiB at 432 per chip, 14.64 at 480, and a
            # proposal of 2472; 1016 was the largest that fit).
            nxt = min(guess, 2 * lo) if guess else 2 * lo
        else:
            mid = (lo + hi) // 2 // step * step
            nxt = guess if guess and lo < guess < hi else mid
        # Every size is a multiple of step, so nxt lies strictly between lo and hi: never a size tried.
        per_chip = nxt
    if lo == 0:
        raise DoesNotFit(f"not even {step} images per chip fit in the {chip.hbm_gib:.0f} GiB of a {chip.name} chip; "
                         "shard the parameters (--config.sharding.strategy=fsdp) or compute in bfloat16 "
                         "(--config.model.dtype=bfloat16).")
    return {"slice": tpu_slice.name, "max_batch_per_chip": lo, "tried": {str(k): v for k, v in sorted(tried.items())},
            "step": step, "hbm_bytes": int(capacity)}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    try:
        from evit_jax.tools import chips

        tpu_slice = chips.find_slice(_TOPOLOGY.value)
        chips_n = tpu_slice.num_chips
        config = _with_batches(_CONFIG.value, chips_n, _BATCH_PER_CHIP.value, _EVAL_BATCH_PER_CHIP.value)
        if (_FIND_MAX.value or not _EVAL.value) and config.eval_batch_size % chips_n:
            # No eval step is compiled: its batch only has to pass the experiment's divisibility check.
            config = _with_batches(config, chips_n, None, 1)
        published = _FACTS.value == "published"
        if _FIND_MAX.value:
            report = find_max_batch(config, _TOPOLOGY.value, step=_BATCH_STEP.value, published_facts=published)
            print(f"{tpu_slice.name}: the largest training batch that fits is {report['max_batch_per_chip']} per chip "
                  f"(multiples of {report['step']}; tried {report['tried']})", flush=True)
        else:
            report = plan(config, _TOPOLOGY.value, resolutions=_RESOLUTIONS.value, include_eval=_EVAL.value,
                          published_facts=published, hlo_dir=_HLO_DIR.value)
            too_big = [r for r in report["steps"] if not r["fits"]]
            if too_big:
                r = too_big[0]
                raise DoesNotFit(
                    f"{r['step']} needs {r['memory_bytes']['total'] / GiB:.2f} GiB per chip, more than the "
                    f"{r['hbm_bytes'] / GiB:.0f} GiB of a {report['chip']} chip; " + _REMEDY)
    except (ValueError, FileNotFoundError) as e:
        logging.vlog(1, "Traceback", exc_info=True)
        raise SystemExit(f"error: {e}") from None
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(report, f, indent=1, default=str)


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
