"""Random-access data sources for every dataset evit_jax knows, by name.

        source = get_source("evit_shapes", "train", data_dir)   # len(source), source[i] -> dict
        info = get_info("evit_shapes", data_dir)                # num_classes, split sizes, ...

All datasets are tfds builders stored as ArrayRecord files under `data_dir` (a local
path or a `gs://` path; tfds handles both). Nothing is ever downloaded:

- built-in synthetic datasets (`evit_shapes`, `evit_seg_shapes`, `evit_det_shapes`) are generated into
    `data_dir` on first use. Concurrent processes are safe: on a local file system the
    build runs under an exclusive file lock; on remote storage JAX process 0 builds and
    the others wait for the finished dataset.
- real datasets (`imagenet2012`, `cityscapes`, `ade20k`, `coco`) must be prepared by the user;
    a missing one raises FileNotFoundError with the exact command to prepare it.

- your own datasets, prepared under a name of your choice by `python -m evit_jax.data.prepare`
    (an image folder, a COCO-format detection set): read back from `data_dir/NAME` without
    their builder class; what a task needs (task, class names, keys) is stored in the
    dataset's tfds metadata (:data:`METADATA_KEYS`).

A name may select a builder config: `evit_shapes/tiny` (32 px, 300/70 images) is the
small variant used by tests and smoke runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import os
import time
from typing import Any, Callable, Sequence

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

_FILE_FORMAT = "array_record"
# How long a waiting process gives another one to finish building a dataset.
_BUILD_WAIT_S = 3600.0
_BUILD_POLL_S = 2.0


@dataclasses.dataclass(frozen=True)
class _Entry:
    """How to find, build or explain the preparation of one dataset."""

    builder_ref: str            # "module:Class" (imported lazily) or a tfds registered name
    task: str                   # "classification" | "segmentation" | "detection"
    auto_build: bool            # generated on first use
    prepare_command: str = ""   # shown when a real dataset is missing ({data_dir} filled in)

    @property
    def manual(self) -> bool:
        """Prepared by `evit_jax.data.prepare` from files the user downloaded (needs --src)."""
        return not self.auto_build and ":" in self.builder_ref


_REGISTRY: dict[str, _Entry] = {
    "evit_shapes": _Entry("evit_jax.data.synthetic_cls:EvitShapes", "classification", True),
    "evit_seg_shapes": _Entry("evit_jax.data.synthetic_seg:EvitSegShapes", "segmentation", True),
    "evit_det_shapes": _Entry("evit_jax.data.synthetic_det:EvitDetShapes", "detection", True),
    "imagenet2012": _Entry(
        "imagenet2012", "classification", False,
        "tfds build imagenet2012 --manual_dir=<dir with ILSVRC2012_img_{{train,val}}.tar> "
        "--file_format=array_record --data_dir={data_dir}"),
    "cityscapes": _Entry(
        "evit_jax.data.cityscapes:Cityscapes", "segmentation", False,
        "python -m evit_jax.data.prepare cityscapes --src <dir with leftImg8bit/ and gtFine/> "
        "--data_dir={data_dir}"),
    "ade20k": _Entry(
        "evit_jax.data.ade20k:Ade20k", "segmentation", False,
        "python -m evit_jax.data.prepare ade20k --src <ADEChallengeData2016 dir> "
        "--data_dir={data_dir}"),
    "coco": _Entry(
        "evit_jax.data.coco:Coco2017", "detection", False,
        "python -m evit_jax.data.prepare coco --src <dir with train2017.zip, val2017.zip and "
        "annotations_trainval2017.zip, zipped or extracted> --data_dir={data_dir}"),
}


# Metadata a user-named dataset stores (tfds `DatasetInfo.metadata`) so that it reads back
# without its builder class: {"evit_task": task, "image_key": ..., "label_key": ...,
# "class_names": [...] (when the label is not a ClassLabel), "ignore_index": int (seg),
# "category_ids": [...] (detection: the original category id of each contiguous class)}.
# Built-in builders may store class_names / category_ids there too (COCO reads them from its JSON).
METADATA_KEYS = ("evit_task", "image_key", "label_key", "class_names", "ignore_index", "category_ids")
_USER_PREPARE = ("python -m evit_jax.data.prepare image_folder --name {name} --src DIR --data_dir {data_dir} | "
                 "python -m evit_jax.data.prepare coco_json --name {name} --images DIR --train_json A.json "
                 "--val_json B.json --data_dir {data_dir}")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a task needs to know about a dataset without reading it."""

    name: str
    task: str                           # "classification" | "segmentation" | "detection"
    num_classes: int
    split_sizes: dict[str, int]         # num_examples per split
    class_names: tuple[str, ...] | None
    ignore_index: int | None            # label value excluded from losses/metrics (seg only)
    image_key: str
    label_key: str
    category_ids: tuple[int, ...] | None = None   # detection: original category id of class k
    # (h, w) of every image of the eval split when all share it and it is known without reading them
    # (the published facts of Cityscapes); None otherwise.
    eval_image_hw: tuple[int, int] | None = None


# What the real datasets' publications state, for planning a run without the data (`published_info`,
# `evit_jax.aot`): (task, classes, split sizes, eval image (h, w) when fixed, image key, label key).
# ILSVRC2012 (1000 classes, 1,281,167 train / 50,000 validation), Cityscapes gtFine (19 training
# classes, 2,975 / 500, all 1024x2048), ADE20K SceneParsing (150 classes, 20,210 / 2,000, sizes
# vary), COCO 2017 detection (80 classes, 118,287 / 5,000, sizes vary).
_PUBLISHED: dict[str, tuple[str, int, dict[str, int], tuple[int, int] | None, str, str]] = {
    "imagenet2012": ("classification", 1000, {"train": 1281167, "validation": 50000}, None, "image", "label"),
    "cityscapes": ("segmentation", 19, {"train": 2975, "validation": 500}, (1024, 2048), "image", "segmentation_mask"),
    "ade20k": ("segmentation", 150, {"train": 20210, "validation": 2000}, None, "image", "segmentation_mask"),
    "coco": ("detection", 80, {"train": 118287, "validation": 5000}, None, "image", "objects"),
}


def published_info(name: str, *, task: str, num_classes: int = -1,
                   splits: Sequence[str] = ()) -> DatasetInfo:
    """The facts of dataset ``name`` without reading it: the published ones of the real datasets
    (:data:`_PUBLISHED`; class names from the builder when it has them), or, for any other name,
    the caller's ``num_classes`` (> 0) for a ``task`` dataset whose ``splits`` sizes are unknown (0).
    One ValueError when neither applies."""
    base, config = _split_name(name)
    entry = _REGISTRY.get(base)
    if entry is not None and entry.auto_build:
        return _generated_info(name, entry, config)
    if base in _PUBLISHED:
        ds_task, classes, sizes, eval_hw, image_key, label_key = _PUBLISHED[base]
        cls = _builder_class(entry) if entry is not None else None
        names = tuple(getattr(cls, "CLASS_NAMES", ())) or None
        return DatasetInfo(base, ds_task, classes, dict(sizes), names, 255 if ds_task == "segmentation" else None,
                           image_key, label_key, _planning_category_ids(ds_task, classes), eval_hw)
    if num_classes is None or num_classes <= 0:
        raise ValueError(f"dataset {name!r} has no published facts here (known: {', '.join(sorted(_PUBLISHED))}); "
                         "prepare it, or state its classes with --config.model.num_classes=N "
                         "(and the schedule with --config.total_steps=N).")
    label_key = {"segmentation": "segmentation_mask", "detection": "objects"}.get(task, "label")
    return DatasetInfo(name, task, int(num_classes), {s.split("[")[0]: 0 for s in splits}, None,
                       255 if task == "segmentation" else None, "image", label_key,
                       _planning_category_ids(task, int(num_classes)))


def _planning_category_ids(task: str, num_classes: int) -> tuple[int, ...] | None:
    """Detection classes numbered 0..N-1 as the original ids when planning without the data (the
    ids only matter to COCO evaluation, which needs the data)."""
    return tuple(range(num_classes)) if task == "detection" else None


def _generated_info(name: str, entry: _Entry, config: str | None) -> DatasetInfo:
    """The facts of a built-in generated dataset from its builder config (no build): split sizes
    from ``num_<split>``, a fixed ``image_size``."""
    cls = _builder_class(entry)
    configs = {c.name: c for c in cls.BUILDER_CONFIGS}
    key = config or getattr(cls, "DEFAULT_CONFIG_NAME", cls.BUILDER_CONFIGS[0].name)
    if key not in configs:
        raise ValueError(f"Unknown config {config!r} of dataset {name!r}; known configs: {sorted(configs)}.")
    cfg = configs[key]
    sizes = {split: int(getattr(cfg, f"num_{split}")) for split in ("train", "test", "validation")
             if hasattr(cfg, f"num_{split}")}
    names = tuple(getattr(cls, "CLASS_NAMES", None) or importlib.import_module(cls.__module__).CLASS_NAMES)
    seg = entry.task == "segmentation"
    return DatasetInfo(name, entry.task, len(names), sizes, names, 255 if seg else None,
                       getattr(cls, "IMAGE_KEY", "image"), getattr(cls, "LABEL_KEY", "label"),
                       _planning_category_ids(entry.task, len(names)), (int(cfg.image_size), int(cfg.image_size)))


def list_datasets() -> list[str]:
    """The built-in names accepted by `get_source` / `get_info` (a `/config` suffix may follow);
    user-named datasets prepared into a data_dir are accepted too."""
    return sorted(_REGISTRY)


def manual_datasets() -> list[str]:
    """Datasets `evit_jax.data.prepare` builds from downloaded files (``--src``)."""
    return sorted(n for n, e in _REGISTRY.items() if e.manual)


def generated_datasets() -> list[str]:
    """Built-in procedural datasets (generated on first use, or by `prepare`)."""
    return sorted(n for n, e in _REGISTRY.items() if e.auto_build)


def _split_name(name: str) -> tuple[str, str | None]:
    base, _, config = name.partition("/")
    return base, (config or None)


def check_user_name(name: str) -> None:
    """A name for a user-prepared dataset: lowercase snake case, not a built-in name."""
    if not name or not name.replace("_", "a").isalnum() or not name[0].isalpha() or name != name.lower():
        raise ValueError(f"dataset name {name!r} must be lowercase letters, digits and '_', starting with a letter.")
    if name in _REGISTRY:
        raise ValueError(f"dataset name {name!r} is a built-in dataset; choose another --name.")


def builder_class(name: str) -> type:
    """The tfds builder class of built-in dataset ``name`` (not of tfds-registered ones)."""
    entry = _REGISTRY.get(_split_name(name)[0])
    cls = _builder_class(entry) if entry is not None else None
    if cls is None:
        raise ValueError(f"Unknown dataset {name!r}; the datasets with builders here are: "
                         f"{', '.join(n for n in list_datasets() if _builder_class(_REGISTRY[n]))}.")
    return cls


def named_builder_class(base: type, name: str) -> type:
    """A subclass of builder ``base`` whose tfds name is ``name`` (a user-named dataset), not
    added to tfds's registry: the same builder can prepare any number of named datasets."""
    import types

    check_user_name(name)
    return types.new_class(name, (base,), {"skip_registration": True}, lambda ns: ns.update(name=name))


def _builder_class(entry: _Entry) -> type | None:
    if ":" not in entry.builder_ref:
        return None
    module_name, class_name = entry.builder_ref.split(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name)


def prepared_user_dataset(name: str, data_dir: str) -> str | None:
    """data_dir/NAME/<newest version> when a user-named dataset ``name`` is prepared there, else None."""
    return _user_dataset_dir(name, _normalise_dir(data_dir))


def _user_dataset_dir(name: str, data_dir: str) -> str | None:
    """data_dir/NAME/<newest version> of a user-prepared dataset, or None."""
    root = os.path.join(data_dir, name)
    if not tfds.core.Path(root).exists():
        return None
    versions = [v.name for v in tfds.core.Path(root).iterdir()
                if v.is_dir() and v.name.count(".") == 2 and v.name.replace(".", "").isdigit()]
    if not versions:
        return None
    newest = max(versions, key=lambda v: tuple(int(x) for x in v.split(".")))
    return os.path.join(root, newest)


def _is_remote(path: str) -> bool:
    return "://" in os.fspath(path)


def _normalise_dir(data_dir: str | os.PathLike) -> str:
    data_dir = os.fspath(data_dir)
    return data_dir if _is_remote(data_dir) else os.path.expanduser(data_dir)


def _unknown_message(name: str, data_dir: str) -> str:
    return (f"Unknown dataset {name!r}: not a built-in dataset ({', '.join(list_datasets())}) and not prepared "
            f"in data_dir={data_dir!r}; prepare your own with: {_USER_PREPARE.format(name=name, data_dir=data_dir)}")


def _make_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    base, config = _split_name(name)
    entry = _REGISTRY.get(base)
    if entry is None:
        path = _user_dataset_dir(base, data_dir) if config is None else None
        if path is None:
            raise FileNotFoundError(_unknown_message(name, data_dir))
        builder = tfds.builder_from_directory(path)
        if "evit_task" not in (builder.info.metadata or {}):
            raise ValueError(f"{path} holds a tfds dataset that evit_jax.data.prepare did not write "
                             "(its metadata has no 'evit_task'); prepare it again with evit_jax.data.prepare.")
        return builder
    cls = _builder_class(entry)
    if cls is None:
        return tfds.builder(base if config is None else f"{base}/{config}", data_dir=data_dir,
                            file_format=_FILE_FORMAT)
    kwargs: dict[str, Any] = {"data_dir": data_dir, "file_format": _FILE_FORMAT}
    if config is not None:
        known = [c.name for c in getattr(cls, "BUILDER_CONFIGS", [])]
        if config not in known:
            raise ValueError(
                f"Unknown config {config!r} of dataset {base!r}; known configs: {known}.")
        kwargs["config"] = config
    return cls(**kwargs)


def _prepare_command(name: str, data_dir: str) -> str:
    entry = _REGISTRY.get(_split_name(name)[0])
    if entry is None:
        return _USER_PREPARE.format(name=name, data_dir=data_dir)
    return entry.prepare_command.format(data_dir=data_dir)


def _missing_message(name: str, data_dir: str) -> str:
    return (f"Dataset {name!r} is not prepared in data_dir={data_dir!r}; prepare it with: "
            f"{_prepare_command(name, data_dir)}")


def _build_under_local_lock(builder: tfds.core.DatasetBuilder, data_dir: str) -> None:
    import fcntl  # POSIX only; local file systems.

    os.makedirs(data_dir, exist_ok=True)
    lock_path = os.path.join(data_dir, f".{builder.name}.{builder.builder_config_name}.lock")
    with open(lock_path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)   # Blocks while another process builds.
        try:
            if not builder.is_prepared():         # It may have been built while we waited.
                builder.download_and_prepare()
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _build_on_remote(builder: tfds.core.DatasetBuilder, name: str,
                     process_index: Callable[[], int]) -> None:
    # No file locks on object stores: process 0 builds, the others poll for the result.
    if process_index() == 0:
        builder.download_and_prepare()
        return
    deadline = time.monotonic() + _BUILD_WAIT_S
    while not builder.is_prepared():
        if time.monotonic() > deadline:
            raise TimeoutError(f"Gave up after {_BUILD_WAIT_S:.0f}s waiting for process 0 to build "
                               f"{name!r} in {builder.data_dir_root!r}.")
        time.sleep(_BUILD_POLL_S)


def _jax_process_index() -> int:
    import jax  # Lazily: only remote auto-builds need it.
    return jax.process_index()


def prepare(name: str, data_dir: str,
            process_index: Callable[[], int] = _jax_process_index, *,
            build: bool = True) -> tfds.core.DatasetBuilder:
    """Returns the prepared builder of `name`, generating built-in datasets if needed
    (``build=False``: never; a dataset that is not there is missing).

    Raises FileNotFoundError (one line, with the command to run) for a missing real
    dataset, and ValueError for an unknown name or config.
    """
    data_dir = _normalise_dir(data_dir)
    entry = _REGISTRY.get(_split_name(name)[0])
    try:
        builder = _make_builder(name, data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise FileNotFoundError(_missing_message(name, data_dir)) from e
    if builder.is_prepared():
        return builder
    if entry is None or not entry.auto_build or not build:
        raise FileNotFoundError(_missing_message(name, data_dir))
    if _is_remote(data_dir):
        _build_on_remote(builder, name, process_index)
    else:
        _build_under_local_lock(builder, data_dir)
    # Reload so that the split information written by the build is picked up.
    return _make_builder(name, data_dir)


def _check_random_access(builder: tfds.core.DatasetBuilder, name: str, data_dir: str) -> None:
    formats = sorted(f.value for f in builder.info.available_file_formats())
    if _FILE_FORMAT not in formats:
        raise FileNotFoundError(
            f"Dataset {name!r} in data_dir={data_dir!r} is stored as {formats}, "
            f"not ArrayRecord; rebuild it with: {_prepare_command(name, data_dir)}")


def get_source(name: str, split: str, data_dir: str) -> Sequence[dict[str, Any]]:
    """A random-access source of `split` of dataset `name` stored under `data_dir`.

    The source has `len()` and `source[i]` -> dict of decoded numpy features (images
    uint8 HWC). `split` accepts tfds slicing (`"train[:90%]"`).
    """
    return _split_builder(name, split, data_dir).as_data_source(split=split)


def _split_builder(name: str, split: str, data_dir: str) -> tfds.core.DatasetBuilder:
    data_dir = _normalise_dir(data_dir)
    builder = prepare(name, data_dir)
    _check_random_access(builder, name, data_dir)
    base_split = split.split("[")[0]
    if base_split not in builder.info.splits:
        raise ValueError(f"Dataset {name!r} has no split {split!r}; splits: "
                         f"{sorted(builder.info.splits)}.")
    return builder


def image_sizes(name: str, split: str, data_dir: str, image_key: str = "image",
                read_chunk: int = 256) -> np.ndarray:
    """(N, 2) int64 (height, width) of every image of `split`, in source order.

    Read from the encoded images' headers (nothing is decoded), or from the feature's static
    shape when the builder fixes it. Evaluation uses it to batch images of equal shape.
    """
    builder = _split_builder(name, split, data_dir)
    features = builder.info.features
    if image_key not in features:
        raise ValueError(f"Dataset {name!r} has no feature {image_key!r}; features: {list(features)}.")
    height, width = features[image_key].shape[:2]
    skip = {key: tfds.decode.SkipDecoding() for key, feature in features.items()
            if isinstance(feature, tfds.features.Image)}
    raw = builder.as_data_source(split=split, decoders=skip)
    num_examples = len(raw)
    if height is not None and width is not None:
        return np.tile(np.array([[height, width]], np.int64), (num_examples, 1))
    sizes = np.zeros((num_examples, 2), np.int64)
    for start in range(0, num_examples, read_chunk):
        indices = list(range(start, min(start + read_chunk, num_examples)))
        for i, record in zip(indices, raw.__getitems__(indices)):
            with PIL.Image.open(io.BytesIO(record[image_key])) as image:
                sizes[i] = image.height, image.width
    return sizes


def _label_key(features: tfds.features.FeaturesDict, task: str) -> str:
    for key in {"classification": ("label",), "detection": ("objects",)}.get(task, ("segmentation_mask", "label")):
        if key in features:
            return key
    raise ValueError(f"Cannot tell the label feature among {list(features)}.")


def _attributes(name: str, builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
    """task, image_key, label_key, class_names, num_classes, ignore_index, category_ids of a
    dataset: from its builder class (built-in) or its stored metadata (user-named; built-in
    builders that read their classes from the data, like COCO, store them there too)."""
    entry = _REGISTRY.get(_split_name(name)[0])
    features = builder.info.features
    meta = dict(builder.info.metadata or {})
    names = meta.get("class_names")
    if entry is not None:
        cls = _builder_class(entry)
        task = entry.task
        attrs = {"image_key": getattr(cls, "IMAGE_KEY", "image"), "label_key": getattr(cls, "LABEL_KEY", None),
                 "class_names": tuple(getattr(cls, "CLASS_NAMES", ())) or (tuple(names) if names else None),
                 "num_classes": getattr(cls, "NUM_CLASSES", None), "ignore_index": getattr(cls, "IGNORE_INDEX", None),
                 "category_ids": getattr(cls, "CATEGORY_IDS", None) or meta.get("category_ids")}
    else:
        task = meta["evit_task"]
        attrs = {"image_key": meta.get("image_key", "image"), "label_key": meta.get("label_key"),
                 "class_names": tuple(names) if names else None, "num_classes": None,
                 "ignore_index": meta.get("ignore_index"), "category_ids": meta.get("category_ids")}
    attrs["task"] = task
    attrs["label_key"] = attrs["label_key"] or _label_key(features, task)
    label_feature = features[attrs["label_key"]]
    if isinstance(label_feature, tfds.features.ClassLabel):
        attrs["class_names"] = tuple(label_feature.names)
    if attrs["class_names"] is not None:
        attrs["num_classes"] = len(attrs["class_names"])
    if attrs["num_classes"] is None:
        raise ValueError(f"Dataset {name!r} declares neither class names nor NUM_CLASSES.")
    if task == "segmentation" and attrs["ignore_index"] is None:
        attrs["ignore_index"] = 255
    elif task != "segmentation":
        attrs["ignore_index"] = None
    if task == "detection":
        ids = attrs["category_ids"]
        attrs["category_ids"] = tuple(int(i) for i in ids) if ids else tuple(range(attrs["num_classes"]))
        if len(attrs["category_ids"]) != attrs["num_classes"]:
            raise ValueError(f"Dataset {name!r} declares {len(attrs['category_ids'])} category ids for "
                             f"{attrs['num_classes']} classes.")
    else:
        attrs["category_ids"] = None
    return attrs


def get_info(name: str, data_dir: str, *, build: bool = True) -> DatasetInfo:
    """Number of classes, split sizes, class names, ignore index, feature keys and (detection)
    original category ids of `name`.

    Built-in datasets are generated if needed (split sizes are known only once built;
    ``build=False``: never); a missing dataset raises FileNotFoundError like `get_source`.
    """
    builder = prepare(name, _normalise_dir(data_dir), build=build)
    a = _attributes(name, builder)
    return DatasetInfo(
        name=name,
        task=a["task"],
        num_classes=int(a["num_classes"]),
        split_sizes={s: int(v.num_examples) for s, v in builder.info.splits.items()},
        class_names=a["class_names"],
        ignore_index=None if a["ignore_index"] is None else int(a["ignore_index"]),
        image_key=a["image_key"],
        label_key=a["label_key"],
        category_ids=a["category_ids"],
    )
