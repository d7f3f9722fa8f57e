"""Command line converter (an entry point: the only place here that parses arguments).

    python -m evit_jax.convert to-flax  --model NAME SRC.pt|.pth|.safetensors DST_DIR [--use-ema] [--layout auto|official|timm]
    python -m evit_jax.convert to-torch --model NAME SRC_DIR DST.pt|.pth|.safetensors [--layout official|timm]

Any problem (unknown model, wrong checkpoint, existing destination...) is one line on stderr, exit code 2,
and nothing written.
"""

from __future__ import annotations

import argparse
import os
import sys

from evit_jax import cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m evit_jax.convert",
        description="Convert EfficientViT weights between PyTorch checkpoints (official / timm layouts) and "
                    "Orbax directories of Flax variables. See docs/convert.md.")
    commands = parser.add_subparsers(dest="command", required=True)

    to_flax = commands.add_parser("to-flax", help="PyTorch checkpoint -> Orbax directory of Flax variables")
    to_flax.add_argument("--model", required=True, help="model name, e.g. efficientvit_b1 or efficientvit-seg-b1-cityscapes")
    to_flax.add_argument("src", help="official .pt/.pth, timm .pth/.safetensors, or a bare state dict file")
    to_flax.add_argument("dst_dir", help="output directory (must not exist or be empty, unless --overwrite)")
    to_flax.add_argument("--use-ema", action="store_true", help="convert the EMA weights of a training checkpoint")
    to_flax.add_argument("--layout", default="auto", choices=["auto", "official", "timm"])

    to_torch = commands.add_parser("to-torch", help="Orbax directory of Flax variables -> PyTorch checkpoint")
    to_torch.add_argument("--model", required=True, help="model name (must match the converted directory)")
    to_torch.add_argument("src_dir", help="directory written by to-flax (or any checkpoint file to re-layout)")
    to_torch.add_argument("dst", help="output .pt/.pth ({'state_dict': ...} for official, bare for timm) or .safetensors")
    to_torch.add_argument("--layout", default="official", choices=["official", "timm"])

    for sub in (to_flax, to_torch):
        sub.add_argument("--num-classes", type=int, default=None, help="classifier size, when not the model's default")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    return parser


def _run(args: argparse.Namespace) -> str:
    from evit_jax import convert
    from evit_jax.models import get_model_spec

    name = get_model_spec(args.model).name
    if args.command == "to-flax":
        variables = convert.load_variables(args.src, name, args.use_ema, layout=args.layout,
                                           num_classes=args.num_classes)
        out = convert.save_variables(variables, args.dst_dir, name, overwrite=args.overwrite,
                                     num_classes=args.num_classes,
                                     source={"path": os.path.abspath(args.src), "ema": args.use_ema})
        return f"wrote {name} variables to {out}"
    num_classes = args.num_classes if args.num_classes is not None else convert.io.stored_num_classes(args.src_dir, name)
    variables = convert.load_variables(args.src_dir, name, num_classes=num_classes)
    state_dict = convert.flax_to_torch(variables, name, args.layout, num_classes=num_classes)
    out = convert.write_torch_checkpoint(state_dict, args.dst, args.layout, overwrite=args.overwrite)
    return f"wrote {len(state_dict)} {args.layout}-layout tensors of {name} to {out}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        message = _run(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
