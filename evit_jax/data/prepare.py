"""Prepares a dataset as tfds ArrayRecord files under ``--data_dir`` (nothing is downloaded).

    python -m evit_jax.data.prepare cityscapes --src DIR --data_dir DATA_DIR
    python -m evit_jax.data.prepare ade20k --src DIR --data_dir DATA_DIR
    python -m evit_jax.data.prepare evit_seg_shapes --data_dir DATA_DIR [--config tiny]
    python -m evit_jax.data.prepare evit_shapes --data_dir DATA_DIR [--config tiny]
    python -m evit_jax.data.prepare coco --src DIR --data_dir DATA_DIR
    python -m evit_jax.data.prepare evit_det_shapes --data_dir DATA_DIR [--config tiny]
    python -m evit_jax.data.prepare image_folder --name NAME --src DIR --data_dir DATA_DIR \
        [--val_fraction 0.1] [--seed 0] [--full_check]
    python -m evit_jax.data.prepare coco_json --name NAME --images DIR --train_json A.json \
        --val_json B.json [--val_images DIR] --data_dir DATA_DIR

``--src`` is the folder with the files you downloaded (see docs/segmentation_data.md and
docs/detection.md): Cityscapes ``leftImg8bit/`` + ``gtFine/`` or their two zips; ADE20K the
``ADEChallengeData2016`` folder, its parent or ``ADEChallengeData2016.zip``; COCO
``train2017``, ``val2017`` and ``annotations`` (each extracted or as its zip). The layout is
checked before anything is written. The synthetic datasets need no ``--src``.
Your own datasets, written under a name of your choice (read back as ``--config.data.name=NAME``):
``image_folder`` from a folder of class sub-folders (classification; evit_jax.data.image_folder and
docs/data.md), ``coco_json`` from any COCO-format detection dataset (evit_jax.data.coco and
docs/detection.md); their inputs are checked before anything is written.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from evit_jax import cli
from evit_jax.data import sources


def prepare(name: str, data_dir: str, src: str | None = None, config: str | None = None):
    """Builds dataset ``name`` into ``data_dir``; returns the prepared builder.

    Raises ValueError / FileNotFoundError (one line) before writing anything when the
    name, the config or the source files are wrong.
    """
    import tensorflow_datasets as tfds

    cls = sources.builder_class(name)
    if name in sources.manual_datasets():
        if not src:
            raise ValueError(f"{name} needs --src: the folder holding the downloaded files.")
        src = os.path.abspath(os.path.expanduser(src))
        cls.check_manual_dir(src)  # FileNotFoundError naming the missing folder.
    elif src:
        raise ValueError(f"{name} is generated procedurally and takes no --src.")
    kwargs = {"data_dir": os.path.expanduser(data_dir), "file_format": "array_record"}
    if config is not None:
        known = [c.name for c in getattr(cls, "BUILDER_CONFIGS", [])]
        if config not in known:
            raise ValueError(f"Unknown config {config!r} of {name}; known configs: {known}.")
        kwargs["config"] = config
    builder = cls(**kwargs)
    if builder.is_prepared():
        print(f"{name} is already prepared in {builder.data_dir}; delete that folder to rebuild it.")
        return builder
    download_config = tfds.download.DownloadConfig(manual_dir=src) if src else None
    builder.download_and_prepare(download_config=download_config)
    return cls(**kwargs)  # Re-read so that the split sizes written by the build are visible.


def image_folder_main(argv: list[str]) -> int:
    """``prepare image_folder ...``: a user-named classification dataset from an image folder."""
    from evit_jax.data import image_folder

    parser = cli.ArgumentParser(
        prog="python -m evit_jax.data.prepare image_folder",
        description="Write a folder of class sub-folders (or train/ and val/ of them) as a "
                    "classification dataset named --name.")
    parser.add_argument("--name", required=True, help="dataset name (lowercase, digits, _)")
    parser.add_argument("--src", required=True, help="DIR/<class>/... or DIR/{train,val}/<class>/...")
    parser.add_argument("--data_dir", required=True, help="tfds data directory to write into")
    parser.add_argument("--val_fraction", type=float, default=None,
                        help="share of each class held out for validation when DIR has no val/ (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified validation sample")
    parser.add_argument("--full_check", action="store_true",
                        help="decode every image in the first pass (slower; finds truncated files)")
    args = parser.parse_args(argv)
    return _build_and_report(args.name, lambda: image_folder.prepare_image_folder(
        args.name, args.src, args.data_dir, val_fraction=args.val_fraction, seed=args.seed,
        full_check=args.full_check, report=lambda line: print(line, file=sys.stderr)),
        describe=lambda builder: f"{builder.info.features['label'].num_classes} classes, ")


def coco_json_main(argv: list[str]) -> int:
    """``prepare coco_json ...``: a user-named detection dataset from COCO-format JSON files."""
    from evit_jax.data import coco

    parser = cli.ArgumentParser(
        prog="python -m evit_jax.data.prepare coco_json",
        description="Write any COCO-format detection dataset (an image folder plus instances JSON files) "
                    "as a dataset named --name.")
    parser.add_argument("--name", required=True, help="name of the new dataset (lowercase, digits, _)")
    parser.add_argument("--images", required=True, help="folder with the images (file_name is relative to it)")
    parser.add_argument("--train_json", required=True, help="COCO instances JSON of the training split")
    parser.add_argument("--val_json", required=True, help="COCO instances JSON of the validation split")
    parser.add_argument("--val_images", default=None, help="folder of the validation images (default: --images)")
    parser.add_argument("--data_dir", required=True, help="tfds data directory to write into")
    args = parser.parse_args(argv)
    return _build_and_report(args.name, lambda: coco.prepare_coco_json(
        args.name, args.data_dir, args.images, args.train_json, args.val_json, args.val_images))


# Subcommands that write a dataset under a name of the user's (their own flags).
_USER_DATASET_COMMANDS = {"image_folder": image_folder_main, "coco_json": coco_json_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _USER_DATASET_COMMANDS:
        return _USER_DATASET_COMMANDS[argv[0]](argv[1:])
    parser = cli.ArgumentParser(
        prog="python -m evit_jax.data.prepare",
        description="Prepare a dataset as tfds ArrayRecord files (nothing is downloaded). "
                    f"Your own datasets: {' | '.join(_USER_DATASET_COMMANDS)} --name NAME ... (-h for its flags).")
    parser.add_argument("dataset", choices=sources.manual_datasets() + sources.generated_datasets())
    parser.add_argument("--src", default=None,
                        help="folder with the manually downloaded files (cityscapes, ade20k, coco)")
    parser.add_argument("--data_dir", required=True, help="tfds data directory to write into")
    parser.add_argument("--config", default=None, help="builder config (synthetic datasets: tiny)")
    args = parser.parse_args(argv)
    return _build_and_report(args.dataset, lambda: prepare(args.dataset, args.data_dir, args.src, args.config))


def _build_and_report(name: str, build: Callable[[], Any], describe: Callable[[Any], str] = lambda _: "") -> int:
    """Runs ``build()`` (which checks its input before writing) and prints ``name: <describe>split
    sizes in <dir>``, exit code 0; bad input is one line ``error: ...`` on stderr, exit code 2."""
    try:
        builder = build()
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{split}={info.num_examples}" for split, info in builder.info.splits.items())
    print(f"{name}: {describe(builder)}{sizes} in {builder.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
