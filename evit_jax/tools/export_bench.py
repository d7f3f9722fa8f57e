"""CPU latency of exported models (onnxruntime, TFLite) beside the JAX forward, batch 1.

    python -m evit_jax.tools.export_bench                       # B0/B1 at 224, seg-B0 (Cityscapes) at 512
    python -m evit_jax.tools.export_bench --models efficientvit_b1:224 --iters 50 --threads 1

Each model gets random weights; it is exported with a fixed batch of 1 (float32, BatchNorm folded) to ONNX
and TFLite in a temporary directory, then the JAX jitted eval forward (unfolded, default convolutions, as
evit_jax.tools.benchmark runs it), the folded JAX model (evit_jax.models.fold, default convolutions), the
onnxruntime session (CPU provider, all graph optimisations) and the TFLite interpreter (XNNPACK) are timed
in alternating phases on the same input (evit_jax.tools.benchmark.time_in_phases), with the same thread
count. Prints the machine and its load: figures from a shared machine are only comparable within one run.
"""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from evit_jax import cli
from evit_jax.export import formats  # noqa: E402
from evit_jax.export.api import export, random_inputs  # noqa: E402
from evit_jax.export.spec import ExportSpec, parse_size, read_metadata  # noqa: E402
from evit_jax.export.serving import load_variables, serving_function  # noqa: E402
from evit_jax.models import get_model_spec  # noqa: E402
from evit_jax.models.fold import folded_model  # noqa: E402
from evit_jax.tools.benchmark import time_in_phases  # noqa: E402

DEFAULT_MODELS = ("efficientvit_b0:224", "efficientvit_b1:224", "efficientvit_seg_b0_cityscapes:512")


def machine() -> str:
    """CPU model, usable cores and load average, for the report."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"{cpu}, {cores} usable cores, load average {load}"


def _runtimes(spec: ExportSpec, variables: dict, workdir: Path, threads: int) -> dict[str, Callable[[], Any]]:
    x = random_inputs(spec, 1)
    reference = jax.jit(serving_function(spec, variables, export=False))
    model, folded_vars = folded_model(spec.model, variables)  # default convolutions: the CPU inference model
    folded = jax.jit(lambda x: model.apply(folded_vars, x, train=False))
    calls: dict[str, Callable[[], Any]] = {
        "jax": lambda: reference(x).block_until_ready(),
        "jax folded": lambda: folded(x).block_until_ready(),
    }
    onnx_path = export(ExportSpec(spec.model, "onnx", spec.height, spec.width, batch=1),
                       workdir / f"{spec.model}.onnx", variables=variables)
    session = formats.onnx_session(onnx_path, threads)
    feed = {session.get_inputs()[0].name: x}
    calls["onnxruntime"] = lambda: session.run(None, feed)
    tflite_path = export(ExportSpec(spec.model, "tflite", spec.height, spec.width, batch=1),
                         workdir / f"{spec.model}.tflite", variables=variables)
    interpreter = formats.tflite_interpreter(tflite_path, threads)
    interpreter.allocate_tensors()
    index = interpreter.get_input_details()[0]["index"]

    def tflite():
        interpreter.set_tensor(index, x)
        interpreter.invoke()

    calls["tflite"] = tflite
    # The artifacts compute the model: a latency of a wrong graph would mean nothing.
    expected = np.asarray(reference(x))
    for name, out in (("onnxruntime", session.run(None, feed)[0]),
                      ("tflite", formats.load_tflite(tflite_path, read_metadata(tflite_path))(x))):
        err = float(np.abs(out - expected).max() / np.abs(expected).max())
        if err > 1e-4:
            raise RuntimeError(f"{name} output of {spec.model} differs from JAX by {err:.2g}")
    return calls


def bench(models: Sequence[str] = DEFAULT_MODELS, iters: int = 20, warmup: int = 3,
          threads: int | None = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Median batch-1 latency (ms) per runtime for each `name:res` in `models`; prints a Markdown table."""
    threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    import onnxruntime
    import tensorflow as tf

    log(f"machine: {machine()}")
    log(f"jax {jax.__version__}, onnxruntime {onnxruntime.__version__}, tensorflow {tf.__version__}; "
        f"{threads} threads for onnxruntime and TFLite; batch 1, float32; median of {iters} calls")
    log("")
    log("| model | input | JAX ms | JAX folded ms | onnxruntime ms | TFLite ms |")
    log("|---|---|---|---|---|---|")
    rows = []
    for item in models:
        name, _, res = item.partition(":")
        height, width = parse_size(res or "224")
        spec = ExportSpec(get_model_spec(name).name, "stablehlo", height, width, batch=1).validate()
        variables = load_variables(spec)
        with tempfile.TemporaryDirectory() as tmp:
            timings = time_in_phases(_runtimes(spec, variables, Path(tmp), threads), iters, warmup)
        ms = {k: 1e3 * t.median for k, t in timings.items()}
        rows.append(dict(model=spec.model, height=height, width=width, **ms))
        log(f"| {spec.model} | {height}x{width} | {ms['jax']:.2f} | {ms['jax folded']:.2f} | "
            f"{ms['onnxruntime']:.2f} | {ms['tflite']:.2f} |")
    log("")
    log(f"machine after the run: {machine()}")
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = cli.ArgumentParser(prog="python -m evit_jax.tools.export_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated NAME:RES (RES: N or HxW)")
    p.add_argument("--iters", type=int, default=20, help="timed calls per runtime (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    p.add_argument("--threads", type=int, default=None, help="threads (default: the usable cores)")
    args = p.parse_args(argv)
    return bench([m for m in args.models.split(",") if m], args.iters, args.warmup, args.threads)


if __name__ == "__main__":
    main()
