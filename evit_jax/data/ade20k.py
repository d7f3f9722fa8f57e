"""ADE20K (SceneParsing ADEChallengeData2016, 150 classes) as a tfds ArrayRecord builder.

Download ``ADEChallengeData2016.zip`` (http://sceneparsing.csail.mit.edu), then

    python -m evit_jax.data.prepare ade20k --src DIR --data_dir DATA_DIR

where DIR is the extracted ``ADEChallengeData2016`` folder, its parent, or the folder
holding the zip. Images ``images/{training,validation}/<stem>.jpg`` pair with
``annotations/{training,validation}/<stem>.png``. As in the official EfficientViT
evaluation the stored mask is ``png - 1``: the annotation value 0 ("other") becomes 255
(ignore) and values 1..150 become classes 0..149. Splits: ``train`` (20210) and
``validation`` (2000). JPEG images are stored as the original bytes (the few grey ones
as lossless RGB PNGs).
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from evit_jax.data import seg_builder

CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
# Annotation value v in 1..150 -> class v - 1; 0 ("other") and anything else -> ignore.
LABEL_TABLE = seg_builder.label_lookup_table({v: v - 1 for v in range(1, len(CLASS_NAMES) + 1)})
ROOT = "ADEChallengeData2016"
ZIP = "ADEChallengeData2016.zip"
SPLITS = {"train": "training", "validation": "validation"}  # tfds split -> ADE folder
_HINT = (f"download {ZIP} from http://sceneparsing.csail.mit.edu and pass the extracted "
         f"{ROOT} folder, its parent, or the folder holding the zip as --src.")


class Ade20k(seg_builder.ManualSegmentationBuilder):
    """ADE20K SceneParsing: 150 classes, "other" = 255 (ignore)."""

    name = "evit_ade20k"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Masks stored as png - 1 (150 classes, 255 = ignore)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
    HOMEPAGE = "http://sceneparsing.csail.mit.edu"
    CLASS_NAMES = CLASS_NAMES
    NUM_CLASSES = len(CLASS_NAMES)
    IMAGE_ENCODING = None  # JPEG bytes as downloaded; PNG for the converted grey images.

    @classmethod
    def open_manual_files(cls, manual_dir: str) -> tuple[seg_builder.ManualFiles, str]:
        if os.path.isdir(os.path.join(manual_dir, "images")) or \
                os.path.isdir(os.path.join(manual_dir, "annotations")):
            return seg_builder.ManualFiles.from_folder(manual_dir), ""
        if os.path.isdir(os.path.join(manual_dir, ROOT)):
            return seg_builder.ManualFiles.from_folder(manual_dir), ROOT + "/"
        if os.path.isfile(os.path.join(manual_dir, ZIP)):
            return seg_builder.ManualFiles.from_zips([os.path.join(manual_dir, ZIP)]), ROOT + "/"
        raise seg_builder.missing("ADE20K", f"folder {ROOT}/ (or images/ and annotations/, or {ZIP})",
                                  manual_dir, _HINT)

    @classmethod
    def find_pairs(cls, files: seg_builder.ManualFiles, root: str) -> seg_builder.Pairs:
        pairs: seg_builder.Pairs = {}
        for split, folder in SPLITS.items():
            image_dir, label_dir = f"{root}images/{folder}", f"{root}annotations/{folder}"
            for needed in (image_dir, label_dir):
                if not files.has_folder(needed):
                    raise seg_builder.missing("ADE20K", f"folder {needed}/", files.describe(), _HINT)
            images = [n for n in files.names(image_dir) if n.endswith(".jpg")]
            if not images:
                raise seg_builder.missing("ADE20K", f"*.jpg images under {image_dir}/",
                                          files.describe(), _HINT)
            labels = set(files.names(label_dir))
            split_pairs = []
            for image in images:
                label = label_dir + image[len(image_dir):-len(".jpg")] + ".png"
                if label not in labels:
                    raise seg_builder.missing("ADE20K", f"annotation {label} (for {image})",
                                              files.describe(), _HINT)
                split_pairs.append((image, label))
            pairs[split] = split_pairs
        return pairs

    @classmethod
    def map_label(cls, raw: np.ndarray) -> np.ndarray:
        return seg_builder.apply_label_table(LABEL_TABLE, raw)
