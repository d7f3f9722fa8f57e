"""What every evit_jax segmentation dataset shares: features, mask encoding, manual files.

All segmentation builders store the same three features, with masks ALREADY mapped to
training ids (uint8, ``IGNORE_INDEX`` = 255 for void pixels):

    image              tfds Image (H, W, 3) uint8 (PNG or JPEG bytes, stored as given)
    segmentation_mask  tfds Image (H, W, 1) uint8 PNG
    file_name          Text: the image's path relative to the dataset root

Real datasets (Cityscapes, ADE20K) are read from files the user downloaded by hand,
either extracted into a folder or still in the official zip archives
(:class:`ManualFiles` reads both the same way). :class:`ManualSegmentationBuilder`
checks the layout BEFORE tfds writes anything and raises one-line FileNotFoundError
naming the missing folder or file.
"""

from __future__ import annotations

import abc
import io
import os
import zipfile
from typing import Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

IGNORE_INDEX = 255
IMAGE_KEY = "image"
LABEL_KEY = "segmentation_mask"


def segmentation_features(image_shape: tuple = (None, None, 3),
                          image_encoding: str | None = "png") -> tfds.features.FeaturesDict:
    """The features of every segmentation builder (see the module docstring)."""
    return tfds.features.FeaturesDict({
        IMAGE_KEY: tfds.features.Image(shape=image_shape, encoding_format=image_encoding),
        LABEL_KEY: tfds.features.Image(shape=image_shape[:2] + (1,), encoding_format="png"),
        "file_name": tfds.features.Text(),
    })


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG bytes of a uint8 (H, W) mask or (H, W, 3) image (lossless)."""
    if array.dtype != np.uint8:
        raise ValueError(f"encode_png expects uint8, got {array.dtype}.")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def label_lookup_table(mapping: Mapping[int, int]) -> np.ndarray:
    """A 256-entry uint8 table: raw label -> train id, IGNORE_INDEX for unlisted values."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for raw, train_id in mapping.items():
        table[raw] = train_id
    return table


def apply_label_table(table: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Maps raw ids through a 256-entry table (ids above 255, from 16-bit PNGs, map as 255)."""
    return table[np.clip(raw, 0, 255).astype(np.intp)]


def decode_label_png(data: bytes, name: str) -> np.ndarray:
    """A single-channel label PNG as an integer (H, W) array; ValueError otherwise."""
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image)
    if array.ndim != 2:
        raise ValueError(f"Label image {name} has shape {array.shape}; expected a single-channel "
                         "PNG of label ids (did you pass the colour PNGs?).")
    return array


def stored_as_is(image: Image.Image) -> bool:
    """True when an opened image's file decodes to the same 8-bit RGB with PIL and OpenCV (which
    tfds uses to decode): an RGB JPEG, or an 8-bit RGB PNG without a transparent colour
    (OpenCV would add an alpha channel, or return 16-bit values)."""
    if image.mode != "RGB" or "transparency" in image.info:
        return False
    if image.format == "JPEG":
        return True
    return image.format == "PNG" and bool(image.tile) and image.tile[0][3] == "RGB"  # raw mode: 8-bit


def rgb_image_bytes(data: bytes, name: str) -> tuple[bytes, tuple[int, int]]:
    """(bytes, (H, W)) of an RGB image: the original bytes when :func:`stored_as_is` (no
    re-encoding), else a lossless PNG of PIL's RGB conversion (grey, CMYK, palette, alpha,
    16-bit, other formats), i.e. the pixels torchvision's ImageFolder loader sees."""
    with Image.open(io.BytesIO(data)) as image:
        size = (image.height, image.width)
        if stored_as_is(image):
            return data, size
        return encode_png(np.asarray(image.convert("RGB"))), size


class ManualFiles:
    """Read-only view of files under a folder, or inside zip archives, by relative path.

    ``ManualFiles.from_folder(root)`` lists every file below ``root``;
    ``ManualFiles.from_zips([a.zip, b.zip])`` lists the members of the archives (their
    internal paths, e.g. ``leftImg8bit/train/aachen/x.png``). Both answer ``names(prefix)``
    and ``read(name)`` identically, so builders never care which one the user has.
    """

    def __init__(self, folder: str | None = None, zips: Sequence[str] = ()):
        self._folder = folder
        self._zip_paths = list(zips)
        self._zips: dict[str, zipfile.ZipFile] = {}
        self._member_zip: dict[str, str] = {}
        for path in self._zip_paths:
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    if not info.is_dir():
                        self._member_zip[info.filename] = path

    @classmethod
    def from_folder(cls, folder: str) -> "ManualFiles":
        return cls(folder=folder)

    @classmethod
    def from_zips(cls, zips: Sequence[str]) -> "ManualFiles":
        return cls(zips=zips)

    def describe(self) -> str:
        return self._folder if self._folder is not None else ", ".join(self._zip_paths)

    def names(self, prefix: str) -> list[str]:
        """Sorted relative paths of the files below folder ``prefix`` ("a/b")."""
        prefix = prefix.rstrip("/") + "/"
        if self._folder is None:
            return sorted(n for n in self._member_zip if n.startswith(prefix))
        top = os.path.join(self._folder, prefix)
        found = []
        for dirpath, _, filenames in os.walk(top):
            rel = os.path.relpath(dirpath, self._folder).replace(os.sep, "/")
            found.extend(f"{rel}/{f}" for f in filenames)
        return sorted(found)

    def has_folder(self, prefix: str) -> bool:
        """True when folder ``prefix`` exists (in a zip: holds at least one member)."""
        if self._folder is None:
            prefix = prefix.rstrip("/") + "/"
            return any(n.startswith(prefix) for n in self._member_zip)
        return os.path.isdir(os.path.join(self._folder, prefix))

    def read(self, name: str) -> bytes:
        if self._folder is not None:
            with open(os.path.join(self._folder, name), "rb") as f:
                return f.read()
        path = self._member_zip[name]
        if path not in self._zips:  # Opened lazily, kept open while generating a split.
            self._zips[path] = zipfile.ZipFile(path)
        return self._zips[path].read(name)

    def close(self) -> None:
        for archive in self._zips.values():
            archive.close()
        self._zips.clear()


Pairs = dict[str, list[tuple[str, str]]]  # split -> [(image name, label name)]


class ManualSegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of builders that read (image, label) pairs from manually downloaded files.

    A subclass says where the files are (:meth:`open_manual_files`), how images pair with
    labels (:meth:`find_pairs`) and how raw labels become train ids (:meth:`map_label`).
    Both may raise FileNotFoundError; they run before tfds creates any file.
    """

    IMAGE_KEY = IMAGE_KEY
    LABEL_KEY = LABEL_KEY
    IGNORE_INDEX = IGNORE_INDEX
    CLASS_NAMES: tuple[str, ...] = ()
    IMAGE_ENCODING: str | None = "png"

    @classmethod
    @abc.abstractmethod
    def open_manual_files(cls, manual_dir: str) -> tuple[ManualFiles, str]:
        """(files, root prefix inside them) for the user's folder, or FileNotFoundError."""

    @classmethod
    @abc.abstractmethod
    def find_pairs(cls, files: ManualFiles, root: str) -> Pairs:
        """(image, label) names per split, or FileNotFoundError naming what is missing."""

    @classmethod
    @abc.abstractmethod
    def map_label(cls, raw: np.ndarray) -> np.ndarray:
        """Raw label ids (H, W) -> uint8 train ids with IGNORE_INDEX for void."""

    @classmethod
    def check_manual_dir(cls, manual_dir: str) -> dict[str, int]:
        """Validates the user's files without writing anything; returns split sizes."""
        if not os.path.isdir(manual_dir):
            raise FileNotFoundError(f"{cls.__name__}: source folder {manual_dir} does not exist.")
        files, root = cls.open_manual_files(manual_dir)
        return {split: len(pairs) for split, pairs in cls.find_pairs(files, root).items()}

    def _manual_dir(self, download_dir, download_config) -> str:
        if download_config is not None and download_config.manual_dir:
            return os.fspath(download_config.manual_dir)
        download_dir = download_dir or os.path.join(self.data_dir_root, "downloads")
        return os.path.join(os.fspath(download_dir), "manual")

    def download_and_prepare(self, *, download_dir=None, download_config=None, **kwargs):
        """tfds' build, after checking the manual files (nothing is written if they are wrong)."""
        if not self.is_prepared():
            self.check_manual_dir(self._manual_dir(download_dir, download_config))
        return super().download_and_prepare(
            download_dir=download_dir, download_config=download_config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=segmentation_features(image_encoding=self.IMAGE_ENCODING),
            homepage=getattr(self, "HOMEPAGE", None),
            disable_shuffling=True,  # Records keep the sorted file order.
        )

    def _split_generators(self, dl_manager):
        files, root = self.open_manual_files(os.fspath(dl_manager.manual_dir))
        return {split: self._generate_examples(files, pairs)
                for split, pairs in self.find_pairs(files, root).items()}

    def _generate_examples(self, files: ManualFiles, pairs: list[tuple[str, str]]) -> Iterator:
        try:
            for image_name, label_name in pairs:
                image_bytes, image_hw = rgb_image_bytes(files.read(image_name), image_name)
                raw = decode_label_png(files.read(label_name), label_name)
                if raw.shape != image_hw:
                    raise ValueError(f"Label {label_name} is {raw.shape[0]}x{raw.shape[1]} but "
                                     f"image {image_name} is {image_hw[0]}x{image_hw[1]}.")
                yield image_name, {
                    IMAGE_KEY: image_bytes,
                    LABEL_KEY: encode_png(self.map_label(raw)),
                    "file_name": image_name,
                }
        finally:
            files.close()


def missing(dataset: str, what: str, where: str, hint: str) -> FileNotFoundError:
    """The one-line error of a wrong manual layout."""
    return FileNotFoundError(f"{dataset}: {what} not found in {where}; {hint}")
