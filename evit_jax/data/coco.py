"""Detection datasets: the record layout every detection builder writes, COCO-format JSON
validation, and the builders of COCO 2017 and of any COCO-format dataset.

Record layout (``evit_coco``, ``evit_det_shapes`` and user-named COCO-JSON datasets):

    image      tfds Image (H, W, 3) uint8: the original JPEG/PNG bytes (non-RGB files as a
               lossless RGB PNG)
    image_id   int64: the image's id in its JSON (synthetic sets: the index)
    file_name  Text
    objects    {"bbox": float64 (M, 4) x1, y1, x2, y2 in original pixels: the JSON's
                    [x, y, x + w, y + h] as given (not clipped),
                "label": int64 (M,) contiguous class 0..C-1 (categories sorted by id),
                "is_crowd": bool (M,),
                "area": float64 (M,): the JSON's ``area`` (the segment's area, which COCOeval
                    uses for its small / medium / large ranges; w * h when absent)}

Boxes are plain variable-length Tensors rather than tfds's ``BBoxFeature`` in a ``Sequence``:
without TensorFlow a ``Sequence`` reads back as Python lists of per-object values, and
``BBoxFeature`` stores (ymin, xmin, ymax, xmax) normalised to [0, 1], losing the JSON's
pixels; the Tensors read back as numpy arrays of shape (M, 4) / (M,), also when M = 0.
Crowd boxes and degenerate boxes are stored as they are (evaluation needs them); the
training transform drops crowds and boxes that end up <= 1 px wide or high
(``evit_jax.data.det_transforms``).

The class <-> category-id mapping (ids sorted ascending, class k = k-th id, as YOLOX's
``class_ids``) and the class names are stored in the dataset's tfds metadata
(``category_ids``, ``class_names``); ``sources.get_info`` returns them.

COCO-format input is validated in one cheap pass over the JSON BEFORE anything is written
(:func:`parse_coco_json`, :func:`check_images`); every problem is one line naming the file
and the offending entry.

    python -m evit_jax.data.prepare coco --src DIR --data_dir DATA_DIR
    python -m evit_jax.data.prepare coco_json --name NAME --images DIR --train_json A.json \\
        --val_json B.json [--val_images DIR] --data_dir DATA_DIR
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zipfile
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from evit_jax.data import seg_builder, sources

IMAGE_KEY = "image"
LABEL_KEY = "objects"
# A box may leave its image by this many pixels (annotation tools round); more is an error.
BOX_TOLERANCE = 1.0
SPLITS = ("train", "validation")


def detection_features(image_shape: tuple = (None, None, 3),
                       image_encoding: str | None = None) -> tfds.features.FeaturesDict:
    """The features of every detection builder (see the module docstring)."""
    return tfds.features.FeaturesDict({
        IMAGE_KEY: tfds.features.Image(shape=image_shape, encoding_format=image_encoding),
        "image_id": tfds.features.Scalar(np.int64),
        "file_name": tfds.features.Text(),
        LABEL_KEY: tfds.features.FeaturesDict({
            "bbox": tfds.features.Tensor(shape=(None, 4), dtype=np.float64),
            "label": tfds.features.Tensor(shape=(None,), dtype=np.int64),
            "is_crowd": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
            "area": tfds.features.Tensor(shape=(None,), dtype=np.float64),
        }),
    })


def detection_metadata(class_names: Sequence[str], category_ids: Sequence[int]) -> dict[str, Any]:
    """What a detection dataset stores in its tfds metadata (``sources.METADATA_KEYS``)."""
    return {"evit_task": "detection", "image_key": IMAGE_KEY, "label_key": LABEL_KEY,
            "class_names": list(class_names), "category_ids": [int(i) for i in category_ids]}


@dataclasses.dataclass(frozen=True)
class Categories:
    """Original category ids (sorted) and names: class k is category ``ids[k]``."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    def class_of(self) -> dict[int, int]:
        """category id -> contiguous class."""
        return {category: k for k, category in enumerate(self.ids)}


@dataclasses.dataclass
class CocoImage:
    """One image of a COCO JSON with its annotations (contiguous labels, xyxy boxes)."""

    image_id: int
    file_name: str
    height: int
    width: int
    boxes: np.ndarray      # float64 (M, 4) x1, y1, x2, y2
    labels: np.ndarray     # int64 (M,)
    is_crowd: np.ndarray   # bool (M,)
    area: np.ndarray       # float64 (M,)

    def objects(self) -> dict[str, np.ndarray]:
        """The record's ``objects`` feature."""
        return {"bbox": self.boxes, "label": self.labels, "is_crowd": self.is_crowd, "area": self.area}


@dataclasses.dataclass
class CocoSplit:
    """A validated COCO JSON: its categories and its images, in the JSON's order."""

    where: str
    categories: Categories
    images: list[CocoImage]

    @property
    def num_annotations(self) -> int:
        return sum(len(image.labels) for image in self.images)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _entries(data: Mapping[str, Any], key: str, where: str) -> list:
    if key not in data:
        raise ValueError(f"{where}: missing key {key!r}; a COCO detection JSON has "
                         "'images', 'annotations' and 'categories' lists.")
    value = data[key]
    if not isinstance(value, list):
        raise ValueError(f"{where}: {key!r} must be a list, got {type(value).__name__}.")
    return value


def _field(entry: Any, key: str, check, what: str, where: str, kind: str, index: int) -> Any:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: {kind}[{index}] is a {type(entry).__name__}, not an object.")
    if key not in entry:
        raise ValueError(f"{where}: {kind}[{index}] has no {key!r}.")
    if not check(entry[key]):
        raise ValueError(f"{where}: {kind}[{index}] {key!r} = {entry[key]!r} is not {what}.")
    return entry[key]


def parse_categories(data: Mapping[str, Any], where: str) -> Categories:
    """The categories of a COCO JSON, sorted by id; ValueError (one line) if malformed."""
    entries = _entries(data, "categories", where)
    if not entries:
        raise ValueError(f"{where}: 'categories' is empty; a detection JSON needs at least one.")
    names: dict[int, str] = {}
    for i, entry in enumerate(entries):
        category_id = _field(entry, "id", _is_int, "an integer", where, "categories", i)
        name = _field(entry, "name", lambda v: isinstance(v, str), "a string", where, "categories", i)
        if category_id in names:
            raise ValueError(f"{where}: category id {category_id} appears twice in 'categories'.")
        names[category_id] = name
    ids = tuple(sorted(names))
    return Categories(ids, tuple(names[i] for i in ids))


def parse_coco_json(data: Any, where: str, categories: Categories | None = None,
                    box_tolerance: float = BOX_TOLERANCE) -> CocoSplit:
    """Validates a loaded COCO detection JSON and converts it (one pass, no image read).

    ``categories`` (e.g. the training JSON's) must equal this file's when given. Raises
    ValueError (one line naming ``where`` and the entry) for: a non-object JSON, missing or
    mistyped keys, duplicate image or category ids, no images (an empty split), an
    annotation of an unknown image or category, a negative box size, or a box that leaves
    its image by more than ``box_tolerance`` pixels.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where}: the JSON is a {type(data).__name__}, not a COCO object.")
    own = parse_categories(data, where)
    if categories is not None and own != categories:
        raise ValueError(f"{where}: its categories {list(zip(own.ids, own.names))} differ from the "
                         f"training JSON's {list(zip(categories.ids, categories.names))}; both "
                         "splits must declare the same categories.")
    images_json = _entries(data, "images", where)
    annotations_json = _entries(data, "annotations", where)
    if not images_json:
        raise ValueError(f"{where}: 'images' is empty (an empty split); export the split with its images.")
    if not annotations_json:
        raise ValueError(f"{where}: 'annotations' is empty (an empty split); export the split with its boxes.")
    positive = lambda v: _is_int(v) and v > 0  # noqa: E731
    index_of: dict[int, int] = {}
    heads = []
    for i, entry in enumerate(images_json):
        image_id = _field(entry, "id", _is_int, "an integer", where, "images", i)
        file_name = _field(entry, "file_name", lambda v: isinstance(v, str) and v, "a file name",
                           where, "images", i)
        width = _field(entry, "width", positive, "a positive integer", where, "images", i)
        height = _field(entry, "height", positive, "a positive integer", where, "images", i)
        if image_id in index_of:
            raise ValueError(f"{where}: image id {image_id} appears twice in 'images'.")
        index_of[image_id] = i
        heads.append((image_id, file_name, height, width))

    class_of = own.class_of()
    per_image: list[list[tuple]] = [[] for _ in heads]
    for i, entry in enumerate(annotations_json):
        label = f"annotation {entry.get('id', f'#{i}')}" if isinstance(entry, dict) else f"annotations[{i}]"
        image_id = _field(entry, "image_id", _is_int, "an integer", where, "annotations", i)
        category = _field(entry, "category_id", _is_int, "an integer", where, "annotations", i)
        bbox = _field(entry, "bbox", lambda v: isinstance(v, list) and len(v) == 4 and all(map(_is_number, v)),
                      "a list of 4 finite numbers [x, y, w, h]", where, "annotations", i)
        if image_id not in index_of:
            raise ValueError(f"{where}: {label} refers to image id {image_id}, which is not in 'images'.")
        if category not in class_of:
            raise ValueError(f"{where}: {label} has category_id {category}, which is not in 'categories' "
                             f"(ids {list(own.ids)}).")
        x, y, w, h = (float(v) for v in bbox)
        image_index = index_of[image_id]
        _, file_name, height, width = heads[image_index]
        if w < 0 or h < 0:
            raise ValueError(f"{where}: {label} has a negative box size (bbox {bbox}).")
        if x < -box_tolerance or y < -box_tolerance or x + w > width + box_tolerance or \
                y + h > height + box_tolerance:
            raise ValueError(f"{where}: {label} box [x, y, w, h] = {bbox} leaves its image {file_name} "
                             f"({width}x{height}) by more than {box_tolerance:g} px.")
        area = entry.get("area", w * h)
        crowd = entry.get("iscrowd", 0)
        if not _is_number(area) or area < 0:
            raise ValueError(f"{where}: {label} 'area' = {area!r} is not a non-negative number.")
        if crowd not in (0, 1):
            raise ValueError(f"{where}: {label} 'iscrowd' = {crowd!r} is not 0 or 1.")
        per_image[image_index].append((x, y, x + w, y + h, class_of[category], bool(crowd), float(area)))

    images = []
    for (image_id, file_name, height, width), objects in zip(heads, per_image):
        rows = np.array([o[:4] for o in objects], np.float64).reshape(-1, 4)
        images.append(CocoImage(image_id, file_name, height, width, rows,
                                np.array([o[4] for o in objects], np.int64),
                                np.array([o[5] for o in objects], np.bool_),
                                np.array([o[6] for o in objects], np.float64)))
    return CocoSplit(where, own, images)


def load_json(data: bytes | str, where: str) -> Any:
    """json.loads with a one-line ValueError naming the file."""
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not valid JSON ({e}).") from None


# ----------------------------------------------------------------------------- image files
class FolderImages:
    """Images of a split in a folder: ``file_name`` relative to it, else its base name (label
    tools often write a sub-folder, e.g. ``images/x.jpg``, into ``file_name``)."""

    def __init__(self, root: str):
        self.root = root

    def describe(self) -> str:
        return self.root

    def locate(self, file_name: str) -> str | None:
        for candidate in (file_name, os.path.basename(file_name)):
            if os.path.isfile(os.path.join(self.root, candidate)):
                return candidate
        return None

    def read(self, name: str) -> bytes:
        with open(os.path.join(self.root, name), "rb") as f:
            return f.read()

    def size(self, name: str) -> tuple[int, int]:
        """(height, width) from the file's header (the pixels are not read)."""
        with Image.open(os.path.join(self.root, name)) as image:
            return image.height, image.width

    def close(self) -> None:
        pass


class ManualImages:
    """Images of a split under ``prefix/`` of :class:`seg_builder.ManualFiles` (folder or zip)."""

    def __init__(self, files: seg_builder.ManualFiles, prefix: str):
        self.files, self.prefix = files, prefix
        self._names = set(files.names(prefix))

    def describe(self) -> str:
        return f"{self.prefix}/ of {self.files.describe()}"

    def locate(self, file_name: str) -> str | None:
        name = f"{self.prefix}/{file_name}"
        return name if name in self._names else None

    def read(self, name: str) -> bytes:
        return self.files.read(name)

    def close(self) -> None:
        self.files.close()


def check_images(split: CocoSplit, images, check_sizes: bool) -> list[str]:
    """The stored name of every image of ``split`` in ``images``; ValueError (one line) for a
    missing file, or (``check_sizes``: reads each file's header) a size that differs from
    the JSON's width/height (``images`` then needs a ``size(name)`` method)."""
    names, missing = [], []
    for image in split.images:
        name = images.locate(image.file_name)
        if name is None:
            missing.append(image.file_name)
        names.append(name)
    if missing:
        raise ValueError(f"{split.where}: {len(missing)} of {len(split.images)} images are missing from "
                         f"{images.describe()}, e.g. {missing[0]!r}; pass the folder that holds them.")
    if check_sizes:
        for image, name in zip(split.images, names):
            height, width = images.size(name)
            if (height, width) != (image.height, image.width):
                raise ValueError(f"{split.where}: image {image.file_name} is {width}x{height} "
                                 f"but the JSON says {image.width}x{image.height}.")
    return names


@dataclasses.dataclass
class PreparedSplit:
    """A validated split: its annotations, where its images are, and their stored names."""

    annotations: CocoSplit
    images: Any        # FolderImages | ManualImages
    names: list[str]


# ----------------------------------------------------------------------------- builders
class CocoFormatBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes validated :class:`PreparedSplit` s as detection records (module docstring).

    Subclasses give the splits (:meth:`prepared_splits`); the class names and category ids
    of the JSON are written into the dataset's metadata.
    """

    IMAGE_KEY = IMAGE_KEY
    LABEL_KEY = LABEL_KEY

    def prepared_splits(self, manual_dir: str | None) -> dict[str, PreparedSplit]:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=detection_features(),
            homepage=getattr(self, "HOMEPAGE", None),
            metadata=tfds.core.MetadataDict(),   # filled from the JSON when built
            disable_shuffling=True,               # record i is image i of the JSON
        )

    def _manual_dir(self, download_dir, download_config) -> str | None:
        if download_config is not None and download_config.manual_dir:
            return os.fspath(download_config.manual_dir)
        return None

    def download_and_prepare(self, *, download_dir=None, download_config=None, **kwargs):
        """tfds' build, after validating every input (nothing is written if one is wrong)."""
        if not self.is_prepared():
            self._splits = self.prepared_splits(self._manual_dir(download_dir, download_config))
        return super().download_and_prepare(
            download_dir=download_dir, download_config=download_config, **kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager
        splits = self._splits
        categories = splits["train"].annotations.categories
        self.info.metadata.update(detection_metadata(categories.names, categories.ids))
        return {name: self._generate_examples(split) for name, split in splits.items()}

    def _generate_examples(self, split: PreparedSplit) -> Iterator:
        try:
            for index, (image, name) in enumerate(zip(split.annotations.images, split.names)):
                data, (height, width) = seg_builder.rgb_image_bytes(split.images.read(name), name)
                if (height, width) != (image.height, image.width):
                    raise ValueError(f"{split.annotations.where}: image {image.file_name} is "
                                     f"{width}x{height} but the JSON says {image.width}x{image.height}.")
                yield index, {IMAGE_KEY: data, "image_id": image.image_id,
                                       "file_name": image.file_name, LABEL_KEY: image.objects()}
        finally:
            split.images.close()


def prepare_splits(jsons: Mapping[str, tuple[bytes | str, str]], images: Mapping[str, Any],
                   check_sizes: bool) -> dict[str, PreparedSplit]:
    """Validates ``{split: (json text, where)}`` against ``{split: images}``; the first split's
    categories are the reference the others must match."""
    parsed: dict[str, CocoSplit] = {}
    for split, (text, where) in jsons.items():
        reference = next(iter(parsed.values())).categories if parsed else None
        parsed[split] = parse_coco_json(load_json(text, where), where, reference)
    return {split: PreparedSplit(parsed[split], images[split],
                                 check_images(parsed[split], images[split], check_sizes))
            for split in parsed}


# COCO 2017 ------------------------------------------------------------------------------
COCO_ZIPS = {"train": "train2017.zip", "validation": "val2017.zip", "annotations": "annotations_trainval2017.zip"}
COCO_FOLDERS = {"train": "train2017", "validation": "val2017", "annotations": "annotations"}
COCO_JSONS = {"train": "annotations/instances_train2017.json", "validation": "annotations/instances_val2017.json"}
_COCO_HINT = ("download train2017.zip, val2017.zip and annotations_trainval2017.zip from "
              "https://cocodataset.org and pass the folder holding them (zipped or extracted) as --src.")
# The last validation, keyed by the source files' identity: prepare() checks, then builds.
_VALIDATED: dict[tuple, dict[str, PreparedSplit]] = {}


def _coco_component(src: str, part: str) -> seg_builder.ManualFiles:
    if os.path.isdir(os.path.join(src, COCO_FOLDERS[part])):
        return seg_builder.ManualFiles.from_folder(src)
    if os.path.isfile(os.path.join(src, COCO_ZIPS[part])):
        try:
            return seg_builder.ManualFiles.from_zips([os.path.join(src, COCO_ZIPS[part])])
        except zipfile.BadZipFile:
            raise ValueError(f"COCO: {os.path.join(src, COCO_ZIPS[part])} is not a readable zip "
                             "(incomplete download?); download it again.") from None
    raise seg_builder.missing("COCO", f"folder {COCO_FOLDERS[part]}/ (or {COCO_ZIPS[part]})", src, _COCO_HINT)


def _identity(path: str) -> tuple:
    stat = os.stat(path)
    return path, stat.st_size, stat.st_mtime_ns


class Coco2017(CocoFormatBuilder):
    """COCO 2017 detection (instances): 80 categories, train 118287 / validation 5000 images."""

    name = "evit_coco"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "COCO 2017 instances; boxes xyxy in pixels, contiguous labels."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _COCO_HINT
    HOMEPAGE = "https://cocodataset.org"

    @classmethod
    def check_manual_dir(cls, manual_dir: str) -> dict[str, int]:
        """Validates the user's files without writing anything; returns split sizes."""
        return {split: len(p.annotations.images) for split, p in cls.validate(manual_dir).items()}

    @classmethod
    def validate(cls, manual_dir: str) -> dict[str, PreparedSplit]:
        if not os.path.isdir(manual_dir):
            raise FileNotFoundError(f"COCO: source folder {manual_dir} does not exist.")
        parts = {part: _coco_component(manual_dir, part) for part in COCO_FOLDERS}
        annotations = parts["annotations"]
        known = set(annotations.names("annotations"))
        for json_name in COCO_JSONS.values():
            if json_name not in known:
                raise seg_builder.missing("COCO", json_name, annotations.describe(), _COCO_HINT)
        zipped = os.path.join(manual_dir, COCO_ZIPS["annotations"])
        json_files = [zipped] if not os.path.isdir(os.path.join(manual_dir, COCO_FOLDERS["annotations"])) \
            else [os.path.join(manual_dir, name) for name in COCO_JSONS.values()]
        key = (manual_dir,) + tuple(_identity(path) for path in json_files)
        if key not in _VALIDATED:
            jsons = {split: (annotations.read(name), f"COCO {name}") for split, name in COCO_JSONS.items()}
            images = {split: ManualImages(parts[split], COCO_FOLDERS[split]) for split in SPLITS}
            _VALIDATED.clear()
            _VALIDATED[key] = prepare_splits(jsons, images, check_sizes=False)
        return _VALIDATED[key]

    def prepared_splits(self, manual_dir: str | None) -> dict[str, PreparedSplit]:
        if manual_dir is None:
            raise FileNotFoundError(f"COCO needs the downloaded files: {_COCO_HINT}")
        return self.validate(manual_dir)


# Any COCO-format dataset ---------------------------------------------------------------
class CocoJson(CocoFormatBuilder, skip_registration=True):
    """A detection dataset from COCO-format JSON files and an image folder (user-named:
    prepared with :func:`prepare_coco_json`, read back from ``data_dir/NAME``)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "COCO-format JSON; boxes xyxy in pixels, contiguous labels."}
    #: set on the instance by prepare_coco_json before building
    splits: dict[str, PreparedSplit] | None = None

    def prepared_splits(self, manual_dir: str | None) -> dict[str, PreparedSplit]:
        del manual_dir
        if self.splits is None:
            raise ValueError("CocoJson is built by evit_jax.data.prepare coco_json (it needs --images and the JSONs).")
        return self.splits


def _read_json_file(path: str, flag: str) -> tuple[bytes, str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path} does not exist.")
    with open(path, "rb") as f:
        return f.read(), path


def prepare_coco_json(name: str, data_dir: str, images: str, train_json: str, val_json: str,
                      val_images: str | None = None):
    """Builds user-named dataset ``name`` (splits train / validation) into ``data_dir/name``.

    Everything is checked before anything is written: the name (valid, not built in, not
    already prepared in ``data_dir``), both JSONs (:func:`parse_coco_json`; the validation
    JSON must declare the training JSON's categories) and every image (present under
    ``images`` / ``val_images``, of the JSON's size). Returns the prepared builder.
    """
    sources.check_user_name(name)
    data_dir = os.path.expanduser(data_dir)
    existing = sources.prepared_user_dataset(name, data_dir)
    if existing is not None:
        raise ValueError(f"dataset name {name!r} is taken: {existing} already holds it; delete that folder "
                         "or choose another --name.")
    folders = {"train": images, "validation": val_images or images}
    for split, folder in folders.items():
        if not os.path.isdir(folder):
            flag = "--images" if split == "train" or not val_images else "--val_images"
            raise FileNotFoundError(f"{flag} {folder} is not a folder.")
    jsons = {"train": _read_json_file(train_json, "--train_json"),
             "validation": _read_json_file(val_json, "--val_json")}
    splits = prepare_splits(jsons, {s: FolderImages(os.path.abspath(f)) for s, f in folders.items()},
                            check_sizes=True)
    builder = sources.named_builder_class(CocoJson, name)(data_dir=data_dir, file_format="array_record")
    builder.splits = splits
    builder.download_and_prepare()
    return sources.prepare(name, data_dir, build=False)


# ----------------------------------------------------------------------------- reading back
@dataclasses.dataclass(frozen=True)
class SplitAnnotations:
    """The ground truth of a split for evaluation, in record order."""

    image_ids: np.ndarray            # int64 (N,)
    sizes: np.ndarray                # int64 (N, 2) height, width
    objects: list[dict[str, np.ndarray]]   # per image: bbox, label, is_crowd, area


def read_annotations(name: str, split: str, data_dir: str) -> SplitAnnotations:
    """Image ids, sizes and objects of every record of ``split`` (images are not decoded:
    sizes come from the encoded headers)."""
    builder = sources.prepare(name, data_dir)
    skip = {IMAGE_KEY: tfds.decode.SkipDecoding()}
    raw = builder.as_data_source(split=split, decoders=skip)
    ids, objects = [], []
    for start in range(0, len(raw), 256):
        for record in raw.__getitems__(list(range(start, min(start + 256, len(raw))))):
            ids.append(int(record["image_id"]))
            objects.append({k: np.asarray(v) for k, v in record[LABEL_KEY].items()})
    sizes = sources.image_sizes(name, split, data_dir, IMAGE_KEY)
    return SplitAnnotations(np.asarray(ids, np.int64), sizes, objects)
