"""Run an attention ablation through the normal training entry point and write one comparison table.

    python -m evit_jax.ablation --config=configs/ablate_attention.py[:smoke] --workdir=DIR \
        [--variants='relu_linear,softmax'] [--config.<key>=<value> ...]

For each variant (``[model_name@]attention_spec``, from ``--variants`` or the config's
``get_ablation().variants`` of the config file) a subprocess runs

    python -m evit_jax.main --config=<config> --workdir=DIR/<variant slug> \
        --config.model.name=<model> --config.model.attention=<spec> [--config.<key>=<value> ...]

so every variant sees the same data, seed and recipe (a finished variant is resumed, i.e. only
re-evaluated). The runner then reads DIR/<slug>/metrics.jsonl and writes DIR/ablation.csv and
DIR/ablation.md with: variant, model, attention, params, GMACs at each of ``get_ablation().gmacs_resolutions``
(224 and 1024 by default; analytic count of convs, linears and attention matmuls, evit_jax.models.flops), final
top-1 (raw and EMA weights), train images/s (median of the logged windows after the first, which holds
compilation) and the status. The child's output goes to DIR/<slug>/train.log.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

from evit_jax import cli

TABLE_FIELDS = ("variant", "model", "attention", "params_m", "gmacs_224", "gmacs_1024", "top1", "top1_ema",
                "train_images_per_s", "status")


def load_config_file(config_arg: str, function: str = "get_config"):
    """`configs/x.py[:arg]` -> the ConfigDict its `function(arg)` returns (get_config: as ml_collections'
    config_flags; get_ablation: the sweep's own settings)."""
    path, _, arg = config_arg.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist (give --config=configs/ablate_attention.py)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:  # configs import `configs.common`
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location("_ablation_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, function):
        raise ValueError(f"{path} has no {function}(); an ablation config defines get_config (the run) and "
                         "get_ablation (variants, gmacs_resolutions), see configs/ablate_attention.py.")
    return getattr(module, function)(arg) if arg else getattr(module, function)()


def parse_variant(text: str, default_model: str) -> tuple[str, str]:
    """'efficientvit_v1_b0@relu_linear' -> (model, spec); 'softmax' -> (default_model, 'softmax')."""
    model, sep, spec = text.partition("@")
    return (model.strip(), spec.strip()) if sep else (default_model, text.strip())


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def validate_variants(variants: Sequence[str], default_model: str) -> list[tuple[str, str, str]]:
    """(label, model, canonical spec) per variant; one ValueError for anything unknown, before any work."""
    from evit_jax.models import get_model_spec
    from evit_jax.models.attention_kernels import parse_attention

    out, seen = [], set()
    for v in variants:
        model, spec = parse_variant(v, default_model)
        model = get_model_spec(model).name
        spec = parse_attention(spec).to_string()
        label = spec if model == get_model_spec(default_model).name else f"{model}@{spec}"
        if label in seen:
            raise ValueError(f"variant {v!r} appears twice in the ablation list")
        seen.add(label)
        out.append((label, model, spec))
    if not out:
        raise ValueError("the ablation has no variants; set get_ablation().variants in the config file or pass --variants")
    return out


def model_costs(model: str, spec: str, num_classes: int, resolutions: Sequence[int]) -> dict[str, float]:
    """Parameters (millions) and GMACs per resolution of `model` with attention `spec`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from evit_jax.models.flops import count_macs_fn
    from evit_jax.models import create_model

    net = create_model(model, num_classes=num_classes, attention=spec, conv_impl="lax")
    costs = {}
    for res in resolutions:
        x = jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32)
        variables = jax.eval_shape(lambda x: net.init(jax.random.PRNGKey(0), x, train=False), x)
        if "params_m" not in costs:
            costs["params_m"] = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables["params"])) / 1e6
        costs[f"gmacs_{res}"] = count_macs_fn(lambda v, x: net.apply(v, x, train=False), variables, x) / 1e9
    return costs


def read_metrics(path: str) -> dict[str, float]:
    """Final top-1 (raw, EMA) and median train images/s (logged windows after the first) of a run."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    result = {"top1": math.nan, "top1_ema": math.nan, "train_images_per_s": math.nan}
    speeds = [r["train/images_per_s"] for r in records if "train/images_per_s" in r]
    if speeds:
        result["train_images_per_s"] = statistics.median(speeds[1:] or speeds)
    for r in records:
        if "eval/top1" in r:
            result["top1"] = r["eval/top1"]
        if "eval_ema/top1" in r:
            result["top1_ema"] = r["eval_ema/top1"]
    return result


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def write_tables(rows: Sequence[dict], workdir: str, gmacs_resolutions: Sequence[int]) -> tuple[str, str]:
    fields = [f for f in TABLE_FIELDS if not f.startswith("gmacs")]
    fields[4:4] = [f"gmacs_{r}" for r in gmacs_resolutions]
    csv_path, md_path = os.path.join(workdir, "ablation.csv"), os.path.join(workdir, "ablation.md")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _fmt(r.get(k, math.nan)) for k in fields})
    with open(md_path, "w") as f:
        f.write("| " + " | ".join(fields) + " |\n|" + "---|" * len(fields) + "\n")
        for r in rows:
            f.write("| " + " | ".join(_fmt(r.get(k, math.nan)).replace("|", "\\|") for k in fields) + " |\n")
    return csv_path, md_path


def run_variant(config_arg: str, workdir: str, model: str, spec: str, passthrough: Sequence[str]) -> int:
    """One training run through `python -m evit_jax.main`; returns its exit code."""
    os.makedirs(workdir, exist_ok=True)
    cmd = [sys.executable, "-m", "evit_jax.main", f"--config={config_arg}", f"--workdir={workdir}",
           f"--config.model.name={model}", f"--config.model.attention={spec}", *passthrough]
    with open(os.path.join(workdir, "train.log"), "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)


def _num_classes(config) -> int:
    if config.model.num_classes > 0:
        return int(config.model.num_classes)
    from evit_jax.data import sources

    return int(sources.get_info(config.data.name, os.path.expanduser(config.data.data_dir)).num_classes)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = cli.ArgumentParser(prog="python -m evit_jax.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/ablate_attention.py[:smoke]")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--variants", default=None, help="comma-separated [model@]attention specs (overrides the config)")
    args, passthrough = parser.parse_known_args(argv)
    bad = [a for a in passthrough if not a.startswith("--config.")]
    if bad:
        raise ValueError(f"unexpected arguments {bad}; only --config.<key>=<value> overrides are passed to training")
    if any(a.startswith(("--config.model.name", "--config.model.attention")) for a in passthrough):
        raise ValueError("set model name / attention per variant with --variants, not --config.model.*")

    from evit_jax.models.attention_kernels import split_attention_specs

    config = load_config_file(args.config)
    sweep = load_config_file(args.config, "get_ablation")
    variants_text = args.variants if args.variants is not None else sweep.variants
    if not variants_text:
        raise ValueError(f"{args.config} has no variants; pass --variants='relu_linear,softmax'")
    variants = validate_variants(split_attention_specs(variants_text), config.model.name)
    gmacs_res = tuple(sweep.gmacs_resolutions)
    num_classes = _num_classes(config)  # FileNotFoundError with the prepare command for a missing dataset
    os.makedirs(args.workdir, exist_ok=True)

    rows = []
    for label, model, spec in variants:
        row = {"variant": label, "model": model, "attention": spec}
        row.update(model_costs(model, spec, num_classes, gmacs_res))
        wd = os.path.join(args.workdir, slug(label))
        start = time.perf_counter()
        print(f"[ablation] {label}: training in {wd}", flush=True)
        code = run_variant(args.config, wd, model, spec, passthrough)
        row.update(read_metrics(os.path.join(wd, "metrics.jsonl")))
        row["status"] = "ok" if code == 0 else f"failed (exit {code}, see {wd}/train.log)"
        print(f"[ablation] {label}: {row['status']} in {time.perf_counter() - start:.0f}s, top1={_fmt(row['top1'])}",
              flush=True)
        rows.append(row)
        write_tables(rows, args.workdir, gmacs_res)  # the table so far survives an interrupted sweep
    csv_path, md_path = write_tables(rows, args.workdir, gmacs_res)
    with open(md_path) as f:
        print(f.read())
    print(f"wrote {csv_path} and {md_path}")
    if any(r["status"] != "ok" for r in rows):
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    cli.run(main, "python -m evit_jax.ablation")
