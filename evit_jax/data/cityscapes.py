"""Cityscapes (fine annotations) as a tfds ArrayRecord builder, from files you download.

Download ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip`` from
https://www.cityscapes-dataset.com (registration needed), then

    python -m evit_jax.data.prepare cityscapes --src DIR --data_dir DATA_DIR

where DIR holds either the two zips or their extracted folders ``leftImg8bit/`` and
``gtFine/``. Images ``leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png`` pair with
``gtFine/{train,val}/<city>/<stem>_gtFine_labelIds.png``; the 34 official label ids are
mapped to the 19 evaluation train ids (the table of the official EfficientViT evaluation,
``applications/efficientvit_seg/eval_efficientvit_seg_model.py``) and every other id to
255 (ignore). Splits: ``train`` (2975) and ``validation`` (500). Images are stored as the
original PNG bytes.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from evit_jax.data import seg_builder

CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
    "bus", "train", "motorcycle", "bicycle",
)
# Official label id -> train id for the 19 evaluated classes; all other ids are void.
LABEL_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
LABEL_TABLE = seg_builder.label_lookup_table(LABEL_ID_TO_TRAIN_ID)
ZIPS = ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip")
SPLITS = {"train": "train", "validation": "val"}  # tfds split -> Cityscapes folder
_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"
_HINT = ("download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
         "https://www.cityscapes-dataset.com and pass the folder holding them (zipped or "
         "extracted) as --src.")


class Cityscapes(seg_builder.ManualSegmentationBuilder):
    """Cityscapes gtFine semantic segmentation: 19 classes, void = 255."""

    name = "evit_cityscapes"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Masks stored as train ids (19 classes, 255 = ignore)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
    HOMEPAGE = "https://www.cityscapes-dataset.com"
    CLASS_NAMES = CLASS_NAMES
    NUM_CLASSES = len(CLASS_NAMES)
    IMAGE_ENCODING = "png"

    @classmethod
    def open_manual_files(cls, manual_dir: str) -> tuple[seg_builder.ManualFiles, str]:
        if all(os.path.isdir(os.path.join(manual_dir, d)) for d in ("leftImg8bit", "gtFine")):
            return seg_builder.ManualFiles.from_folder(manual_dir), ""
        zips = [os.path.join(manual_dir, z) for z in ZIPS]
        if all(os.path.isfile(z) for z in zips):
            return seg_builder.ManualFiles.from_zips(zips), ""
        absent = [d for d, z in zip(("leftImg8bit", "gtFine"), ZIPS)
                  if not os.path.isdir(os.path.join(manual_dir, d))
                  and not os.path.isfile(os.path.join(manual_dir, z))]
        if not absent:  # One folder extracted, the other still zipped: read what is there.
            raise seg_builder.missing(
                "Cityscapes", "a consistent layout (both folders or both zips)", manual_dir,
                "extract both zips or keep both zipped; " + _HINT)
        what = " and ".join(f"folder {d}/ (or {z})" for d, z in zip(("leftImg8bit", "gtFine"), ZIPS)
                            if d in absent)
        raise seg_builder.missing("Cityscapes", what, manual_dir, _HINT)

    @classmethod
    def find_pairs(cls, files: seg_builder.ManualFiles, root: str) -> seg_builder.Pairs:
        pairs: seg_builder.Pairs = {}
        for split, folder in SPLITS.items():
            image_dir, label_dir = f"leftImg8bit/{folder}", f"gtFine/{folder}"
            for needed in (image_dir, label_dir):
                if not files.has_folder(needed):
                    raise seg_builder.missing("Cityscapes", f"folder {needed}/", files.describe(), _HINT)
            images = [n for n in files.names(image_dir) if n.endswith(_IMAGE_SUFFIX)]
            if not images:
                raise seg_builder.missing("Cityscapes", f"*{_IMAGE_SUFFIX} images under {image_dir}/",
                                          files.describe(), _HINT)
            labels = set(files.names(label_dir))
            split_pairs = []
            for image in images:
                label = (label_dir + image[len(image_dir):])[: -len(_IMAGE_SUFFIX)] + _LABEL_SUFFIX
                if label not in labels:
                    raise seg_builder.missing("Cityscapes", f"label {label} (for {image})",
                                              files.describe(), _HINT)
                split_pairs.append((image, label))
            pairs[split] = split_pairs
        return pairs

    @classmethod
    def map_label(cls, raw: np.ndarray) -> np.ndarray:
        return seg_builder.apply_label_table(LABEL_TABLE, raw)
