"""Your own classification dataset from a folder of images (torchvision ImageFolder layout).

    python -m evit_jax.data.prepare image_folder --name NAME --src DIR --data_dir D \\
        [--val_fraction 0.1] [--seed 0] [--full_check]

``DIR`` holds either one sub-folder per class (``DIR/cat/*.jpg``, ``DIR/dog/*.png``; the
validation split is a deterministic stratified sample of ``--val_fraction`` of each class),
or ``DIR/train/<class>/`` and ``DIR/val/<class>/`` with the same class folders. Files below a
class folder count recursively. The classes are the folder names, sorted (as torchvision
sorts them), stored as a tfds ClassLabel; the dataset is written to ``D/NAME`` with splits
``train`` and ``validation`` and read back by ``sources.get_source(NAME, split, D)`` /
``sources.get_info(NAME, D)`` (metadata ``evit_task`` = "classification", image key
``image``, label key ``label``, plus ``file_name``, the path relative to ``DIR``).

A first pass opens every file's header (``full_check``: decodes every image) before anything
is written: files that are not images, or are corrupt, are reported one line each and
skipped; an empty class, class folders that differ between ``train/`` and ``val/``, a folder
without images, a taken or invalid name, raise one-line errors. Images are stored as they
are (JPEG stays JPEG, PNG stays PNG: no re-encoding) unless the file would not decode to the
same 8-bit RGB everywhere (``seg_builder.stored_as_is``): CMYK or grey JPEGs, palette,
grey, alpha, colour-keyed or 16-bit PNGs, and other formats (BMP, WebP, TIFF, GIF...) are stored as a
lossless PNG of PIL's RGB conversion, the pixels torchvision's ImageFolder loader produces.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, UnidentifiedImageError

from evit_jax.data import seg_builder, sources

TRAIN_FOLDER, VAL_FOLDER = "train", "val"
SPLITS = ("train", "validation")
IMAGE_KEY, LABEL_KEY = "image", "label"
DEFAULT_VAL_FRACTION = 0.1

Item = tuple[str, int]   # (path relative to the source folder, label)


@dataclasses.dataclass(frozen=True)
class FolderPlan:
    """What the first pass found: the classes, each split's images, and the skipped files."""

    root: str
    class_names: tuple[str, ...]
    splits: dict[str, tuple[Item, ...]]
    skipped: tuple[tuple[str, str], ...]   # (relative path, why)


def _class_folders(folder: str) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def _files_below(folder: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames))
    return found


def check_image_file(path: str, full_check: bool = False) -> str | None:
    """None when ``path`` is an image PIL can open (``full_check``: and decode), else why not."""
    try:
        with Image.open(path) as image:
            if full_check:
                image.load()
            elif image.width <= 0 or image.height <= 0:
                return "an image of size 0"
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"corrupt image ({error})"
    return None


def _scan_classes(root: str, prefix: str, full_check: bool,
                  skipped: list[tuple[str, str]]) -> dict[str, list[str]]:
    """class name -> sorted image paths (relative to root) under root/prefix/<class>/."""
    folder = os.path.join(root, prefix)
    classes: dict[str, list[str]] = {}
    for name in _class_folders(folder):
        images = classes.setdefault(name, [])
        for path in _files_below(os.path.join(folder, name)):
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            problem = check_image_file(path, full_check)
            if problem is None:
                images.append(rel)
            else:
                skipped.append((rel, problem))
    return classes


def _check_classes(classes: dict[str, list[str]], where: str, root: str) -> None:
    if not classes:
        loose = [e.name for e in os.scandir(os.path.join(root, where)) if e.is_file()]
        detail = f" ({len(loose)} file(s) directly in it)" if loose else ""
        raise ValueError(f"{os.path.join(root, where).rstrip('/')} has no class sub-folders{detail}; "
                         "put each class's images in a sub-folder named after the class.")
    if not any(classes.values()):
        raise ValueError(f"no images found in {os.path.join(root, where).rstrip('/')}: "
                         "its class folders hold no readable image files.")
    empty = [name for name, images in classes.items() if not images]
    if empty:
        raise ValueError(f"class folder(s) without images in {os.path.join(root, where).rstrip('/')}: "
                         f"{', '.join(empty)}; add images or remove the folder(s).")


def stratified_split(paths_per_class: list[list[str]], val_fraction: float,
                     seed: int) -> tuple[list[Item], list[Item]]:
    """(train, validation) items: from class c's sorted paths, round(val_fraction * n_c) (at
    most n_c - 1) drawn by a Generator seeded with (seed, c) go to validation; both lists are
    in (class, path) order."""
    train, validation = [], []
    for label, paths in enumerate(paths_per_class):
        count = min(len(paths) - 1, math.floor(val_fraction * len(paths) + 0.5))
        chosen = set(np.random.default_rng([seed, label]).permutation(len(paths))[:count].tolist())
        for i, path in enumerate(paths):
            (validation if i in chosen else train).append((path, label))
    return train, validation


def scan_folder(src: str, val_fraction: float | None = None, seed: int = 0,
                full_check: bool = False) -> FolderPlan:
    """The first pass (reads only headers unless ``full_check``): classes, splits and skipped
    files of image folder ``src``; ValueError / FileNotFoundError (one line) when it cannot
    become a dataset. ``val_fraction`` (default 0.1) applies to the one-folder layout only."""
    root = os.path.abspath(os.path.expanduser(src))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist (or is not a folder).")
    has_train, has_val = (os.path.isdir(os.path.join(root, f)) for f in (TRAIN_FOLDER, VAL_FOLDER))
    skipped: list[tuple[str, str]] = []
    if has_train or has_val:
        if not (has_train and has_val):
            present, absent = (TRAIN_FOLDER, VAL_FOLDER) if has_train else (VAL_FOLDER, TRAIN_FOLDER)
            raise ValueError(f"{root} has {present}/ but no {absent}/: give both {TRAIN_FOLDER}/ and {VAL_FOLDER}/ "
                             "(each with the class folders), or put the class folders directly in it.")
        if val_fraction is not None:
            raise ValueError(f"{root} has {TRAIN_FOLDER}/ and {VAL_FOLDER}/: its validation split is {VAL_FOLDER}/, "
                             "so --val_fraction does not apply; drop it.")
        per_split = {split: _scan_classes(root, folder, full_check, skipped)
                     for split, folder in zip(SPLITS, (TRAIN_FOLDER, VAL_FOLDER))}
        for split, folder in zip(SPLITS, (TRAIN_FOLDER, VAL_FOLDER)):
            _check_classes(per_split[split], folder, root)
        only_train = sorted(set(per_split["train"]) - set(per_split["validation"]))
        only_val = sorted(set(per_split["validation"]) - set(per_split["train"]))
        if only_train or only_val:
            raise ValueError(f"the class folders of {TRAIN_FOLDER}/ and {VAL_FOLDER}/ in {root} differ: "
                             f"only in {TRAIN_FOLDER}/: {', '.join(only_train) or '-'}; "
                             f"only in {VAL_FOLDER}/: {', '.join(only_val) or '-'}.")
        names = tuple(sorted(per_split["train"]))
        splits = {split: tuple((path, label) for label, name in enumerate(names)
                               for path in per_split[split][name]) for split in SPLITS}
    else:
        fraction = DEFAULT_VAL_FRACTION if val_fraction is None else float(val_fraction)
        if not 0 < fraction < 1:
            raise ValueError(f"--val_fraction must be in (0, 1), got {fraction}.")
        classes = _scan_classes(root, "", full_check, skipped)
        _check_classes(classes, "", root)
        names = tuple(sorted(classes))
        train, validation = stratified_split([classes[n] for n in names], fraction, seed)
        if not validation:
            raise ValueError(f"--val_fraction {fraction} of {len(train)} images leaves the validation split "
                             "empty; raise it.")
        splits = {"train": tuple(train), "validation": tuple(validation)}
    return FolderPlan(root, names, splits, tuple(skipped))


class ImageFolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes a :class:`FolderPlan` (set as ``PLAN`` on a named subclass, see
    :func:`prepare_image_folder`) as a classification dataset."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Image folder: images stored as given (see evit_jax.data.image_folder)."}
    PLAN: FolderPlan | None = None

    def _info(self) -> tfds.core.DatasetInfo:
        if self.PLAN is None:
            raise ValueError("ImageFolderBuilder needs a PLAN; use image_folder.prepare_image_folder.")
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Image folder {self.PLAN.root}.",
            features=tfds.features.FeaturesDict({
                IMAGE_KEY: tfds.features.Image(shape=(None, None, 3)),
                LABEL_KEY: tfds.features.ClassLabel(names=list(self.PLAN.class_names)),
                "file_name": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(evit_task="classification", image_key=IMAGE_KEY,
                                            label_key=LABEL_KEY),
            disable_shuffling=True,  # Records keep the (class, path) order.
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(items) for split, items in self.PLAN.splits.items()}

    def _generate_examples(self, items: tuple[Item, ...]) -> Iterator:
        for rel, label in items:
            with open(os.path.join(self.PLAN.root, rel), "rb") as f:
                data, _ = seg_builder.rgb_image_bytes(f.read(), rel)
            yield rel, {IMAGE_KEY: data, LABEL_KEY: label, "file_name": rel}


def check_name_free(name: str, data_dir: str) -> None:
    """ValueError (one line) when ``name`` is not a valid user dataset name or is taken in ``data_dir``."""
    sources.check_user_name(name)
    try:
        sources.get_info(name, data_dir, build=False)
    except FileNotFoundError:
        return  # Nothing prepared under that name (a failed earlier attempt leaves no version folder).
    except ValueError:
        pass    # A tfds dataset of someone else's: taken as well.
    path = os.path.join(os.path.expanduser(data_dir), name)
    raise ValueError(f"dataset name {name!r} is taken: {path} holds a prepared dataset; choose another --name "
                     "or delete that folder.")


def prepare_image_folder(name: str, src: str, data_dir: str, *, val_fraction: float | None = None,
                         seed: int = 0, full_check: bool = False,
                         report: Callable[[str], None] = print) -> tfds.core.DatasetBuilder:
    """Writes image folder ``src`` as user-named dataset ``name`` into ``data_dir``; returns the
    prepared builder. Every check (name, layout, classes) runs before anything is written;
    each skipped file is passed to ``report`` as one line, then their count."""
    check_name_free(name, data_dir)
    plan = scan_folder(src, val_fraction, seed, full_check)
    for rel, why in plan.skipped:
        report(f"skipped {rel}: {why}")
    if plan.skipped:
        report(f"{len(plan.skipped)} file(s) skipped")
    cls = sources.named_builder_class(ImageFolderBuilder, name)
    cls.PLAN = plan
    kwargs = {"data_dir": os.path.expanduser(data_dir), "file_format": "array_record"}
    cls(**kwargs).download_and_prepare()
    return cls(**kwargs)  # Re-read so that the split sizes written by the build are visible.
