"""Command line: export a model to a serving format, or check an exported artifact.

    python -m evit_jax.export --model efficientvit_b1 [--checkpoint CKPT] --format stablehlo|onnx|savedmodel|tflite \
        --out PATH [--res 224 | HxW] [--batch N | --dynamic-batch] [--dtype float32|bfloat16|float16] \
        [--layout nhwc|nchw] [--preprocess [--input-size HxW] [--crop-ratio R]] [--opset 18] [--overwrite]
    python -m evit_jax.export --check PATH [IMAGE ...]

Every export is checked right after it is written (reloaded in its runtime and compared with the JAX model
on random inputs; `--no-check` skips it). Any problem (unknown model or format, a checkpoint of another
model, a resolution that is not a multiple of 32, an existing --out...) is one line on stderr, exit code 2,
and nothing written. A failed check exits with 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from evit_jax import cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m evit_jax.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", metavar="PATH", default=None, help="reload an exported artifact and compare it with JAX")
    p.add_argument("images", nargs="*", help="with --check: image files to compare on (besides random inputs)")
    p.add_argument("--model", help="model name (evit_jax.models.list_models())")
    p.add_argument("--checkpoint", default=None, help=".pt/.pth/.safetensors, converted directory or training "
                   "workdir (default: random weights, for trying the pipeline)")
    p.add_argument("--format", help="stablehlo | onnx | savedmodel | tflite")
    p.add_argument("--out", help="artifact path (a directory for savedmodel); its description goes to PATH.json")
    p.add_argument("--res", default="224", help="model input size: N or HxW, multiples of 32 (default 224)")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=None, help="fixed batch size (default: dynamic; 1 for tflite)")
    batch.add_argument("--dynamic-batch", action="store_true", help="symbolic batch dimension (also for tflite)")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16 | float16")
    p.add_argument("--layout", default="nhwc", help="nhwc | nchw (float input and spatial outputs)")
    p.add_argument("--preprocess", action="store_true", help="bake in the eval transform: uint8 NHWC images in")
    p.add_argument("--input-size", default=None, help="with --preprocess: the image size the artifact takes "
                   "(N or HxW; default: --res)")
    p.add_argument("--crop-ratio", type=float, default=None, help="with --preprocess, classification: centre-crop "
                   "ratio (default: 0.95 for B0/B1, 1.0 otherwise)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size of random weights")
    p.add_argument("--numerics", default="official", help="official | timm (use timm for timm checkpoints: "
                   "LiteMLA eps 1e-5, no quadratic path)")
    p.add_argument("--ema", action="store_true", help="take the EMA weights of the checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights (no --checkpoint)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--platforms", default="cpu,cuda,tpu", help="stablehlo/savedmodel lowering platforms")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-check", action="store_true", help="do not reload and compare after exporting")
    return p


def _spec(args: argparse.Namespace):
    from evit_jax.export.spec import DEFAULT_OPSET, ExportError, ExportSpec, parse_size

    missing = [f"--{name}" for name in ("model", "format", "out") if not getattr(args, name)]
    if missing:
        raise ExportError(f"{', '.join(missing)} required (or --check PATH)")
    if args.images:
        raise ExportError("image files are only taken by --check")
    if args.opset is not None and args.format != "onnx":
        raise ExportError("--opset is for --format onnx")
    height, width = parse_size(args.res)
    input_h, input_w = parse_size(args.input_size, "--input-size") if args.input_size else (None, None)
    batch = args.batch if args.batch is not None else (1 if args.format == "tflite" and not args.dynamic_batch else None)
    return ExportSpec(model=args.model, format=args.format, height=height, width=width, batch=batch,
                      dtype=args.dtype, layout=args.layout, preprocess=args.preprocess, input_height=input_h,
                      input_width=input_w, crop_ratio=args.crop_ratio, checkpoint=args.checkpoint,
                      use_ema=args.ema, num_classes=args.num_classes, numerics=args.numerics, seed=args.seed,
                      opset=args.opset or DEFAULT_OPSET,
                      platforms=tuple(p.strip() for p in args.platforms.split(",") if p.strip())).validate()


def _print_check(path: str, images: Sequence[str]) -> bool:
    from evit_jax.export import check, read_metadata

    spec = read_metadata(path)
    print(f"checking {path}: {spec.format} of {spec.model} ({spec.dtype}, input "
          f"{'dynamic' if spec.batch is None else spec.batch} x ...) against the JAX model")
    results = check(path, images)
    for r in results:
        measure = "differing pixels" if spec.output_name == "labels" else "max relative difference"
        print(f"  {r.input}: {measure} {r.max_rel_diff:.3g} (tolerance {r.tolerance:g}) {'OK' if r.ok else 'FAIL'}")
    ok = all(r.ok for r in results)
    print("OK" if ok else "FAILED")
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from evit_jax.export.spec import ExportError

    try:
        if args.check:
            return 0 if _print_check(args.check, args.images) else 1
        from evit_jax.export import export

        spec = _spec(args)
        out = export(spec, args.out, overwrite=args.overwrite)
        print(f"wrote {spec.format} of {spec.model} to {out} (description: {out}.json)")
        if args.no_check:
            return 0
        return 0 if _print_check(str(out), ()) else 1
    except (ExportError, ValueError, FileNotFoundError, ImportError) as err:
        print(f"evit_jax.export: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
