"""Prepares a dataset as tfds ArrayRecord files under ``--data_dir`` (nothing is downloaded).

    python -m evit_jax.data.prepare cityscapes --src DIR --data_dir DATA_DIR
    python -m evit_jax.data.prepare ade20k --src DIR --data_dir DATA_DIR
    python -m evit_jax.data.prepare evit_seg_shapes --data_dir DATA_DIR [--config tiny]
    python -m evit_jax.data.prepare evit_shapes --data_dir DATA_DIR [--config tiny]
    python -m evit_jax.data.prepare coco --src DIR --data_dir DATA_DIR
    python -m evit_jax.data.prepare evit_det_shapes --data_dir DATA_DIR [--config tiny]
    python -m evit_jax.data.prepare coco_json --name NAME --images DIR --train_json A.json \
        --val_json B.json [--val_images DIR] --data_dir DATA_DIR

``--src`` is the folder with the files you downloaded (see docs/segmentation_data.md and
docs/detection.md): Cityscapes ``leftImg8bit/`` + ``gtFine/`` or their two zips; ADE20K the
``ADEChallengeData2016`` folder, its parent or ``ADEChallengeData2016.zip``; COCO
``train2017``, ``val2017`` and ``annotations`` (each extracted or as its zip). The layout is
checked before anything is written. The synthetic datasets need no ``--src``.
``coco_json`` prepares any COCO-format detection dataset under a name of your choice
(read back as ``--config.data.name=NAME``); its JSONs and images are checked first.
"""

from __future__ import annotations

import argparse
import os
import sys

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


_COCO_JSON_FLAGS = ("name", "images", "train_json", "val_json", "val_images")


def _prepare_from_args(args: argparse.Namespace):
    given = [f"--{flag}" for flag in _COCO_JSON_FLAGS if getattr(args, flag) is not None]
    if args.dataset != "coco_json":
        if given:
            raise ValueError(f"{', '.join(given)} only apply to coco_json, not to {args.dataset}.")
        return prepare(args.dataset, args.data_dir, args.src, args.config)
    from evit_jax.data import coco

    missing = [f"--{flag}" for flag in _COCO_JSON_FLAGS[:4] if getattr(args, flag) is None]
    if missing:
        raise ValueError(f"coco_json needs {', '.join(missing)}.")
    if args.src or args.config:
        raise ValueError("coco_json takes --images and the JSON files, not --src / --config.")
    return coco.prepare_coco_json(args.name, args.data_dir, args.images, args.train_json,
                                  args.val_json, args.val_images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evit_jax.data.prepare",
        description="Prepare a dataset as tfds ArrayRecord files (nothing is downloaded).")
    parser.add_argument("dataset", choices=sources.manual_datasets() + sources.generated_datasets() + ["coco_json"])
    parser.add_argument("--src", default=None,
                        help="folder with the manually downloaded files (cityscapes, ade20k, coco)")
    parser.add_argument("--data_dir", required=True, help="tfds data directory to write into")
    parser.add_argument("--config", default=None, help="builder config (synthetic datasets: tiny)")
    coco_json = parser.add_argument_group("coco_json (any COCO-format detection dataset)")
    coco_json.add_argument("--name", default=None, help="name of the new dataset (lowercase, digits, _)")
    coco_json.add_argument("--images", default=None, help="folder with the images (file_name is relative to it)")
    coco_json.add_argument("--train_json", default=None, help="COCO instances JSON of the training split")
    coco_json.add_argument("--val_json", default=None, help="COCO instances JSON of the validation split")
    coco_json.add_argument("--val_images", default=None, help="folder of the validation images (default: --images)")
    args = parser.parse_args(argv)
    try:
        builder = _prepare_from_args(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{split}={info.num_examples}" for split, info in builder.info.splits.items())
    print(f"{args.name if args.dataset == 'coco_json' else args.dataset}: {sizes} in {builder.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
