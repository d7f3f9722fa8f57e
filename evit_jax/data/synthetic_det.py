"""`evit_det_shapes`: a procedurally generated object-detection dataset.

Each 128x128 scene holds 1-4 objects over a textured background with clutter (smooth
noise, stripes, checkerboard or gradient; small dots and lines; up to two thicker distractor
strokes). The class of an object is its SHAPE (disc, square, triangle, cross, ring, star,
drawn as in ``evit_seg_shapes``); its colour (flat or a two-tone texture) is drawn
independently of the class and contrasts with the background, so colour cannot give the
class away. Sizes are log-uniform from small to large (shape radius 7-30 % of the side:
boxes of about 16 to 90 px at 128 px); rotations are uniform. Objects may overlap: a later
object occludes an earlier one, by at most 25 % of the earlier one's area. Each object's
box is the tight box of its VISIBLE pixels, in pixel-edge coordinates (x1 = first column,
x2 = last column + 1).

Records follow the detection layout of ``evit_jax.data.coco`` (``image``, ``image_id`` = the
index, ``file_name``, ``objects`` with ``bbox`` / ``label`` / ``is_crowd`` (always False) /
``area`` = the box's area). Class k has category id k + 1 (``CATEGORY_IDS``).

Generation is deterministic: example ``i`` of split ``s`` is drawn from
``numpy.random.default_rng([SEED, split_id, i])``. Built automatically on first use by
``evit_jax.data.sources.get_source("evit_det_shapes", ...)``; the ``tiny`` config (64 px,
64 / 32 images) is for tests and smoke runs.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw, ImageFilter

from evit_jax.data import coco, seg_builder, synthetic_seg

# The six shapes of evit_seg_shapes, in its order (its class id = ours + 1).
CLASS_NAMES = synthetic_seg.CLASS_NAMES[1:]
CATEGORY_IDS = tuple(range(1, len(CLASS_NAMES) + 1))
SEED = 20240615
_SPLIT_IDS = {"train": 0, "validation": 1}
RADIUS_RANGE = (0.07, 0.30)     # shape radius, fraction of the image side (log-uniform)
MAX_OCCLUSION = 0.25            # largest fraction of an object a later one may hide
_EXTENT = 1.3                   # the shapes of shape_mask reach at most 1.3 radius from the centre


@dataclasses.dataclass
class EvitDetShapesConfig(tfds.core.BuilderConfig):
    """Image size, split sizes and object count of one variant of the dataset."""

    image_size: int = 128
    num_train: int = 2400
    num_validation: int = 300
    max_objects: int = 4


def _strokes(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Adds 0-2 thick random polyline strokes (clutter that belongs to no class)."""
    size = image.shape[0]
    layer = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(0, 3))):
        points = rng.uniform(0, size, size=(int(rng.integers(2, 5)), 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.line([tuple(p) for p in points], fill=colour, width=2)
    return np.asarray(layer, dtype=np.float32)


def _fits(candidate: np.ndarray, visible: list[np.ndarray]) -> bool:
    """True if ``candidate`` hides at most MAX_OCCLUSION of every visible object."""
    return all((candidate & v).sum() <= MAX_OCCLUSION * v.sum() for v in visible)


def _tight_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def generate_scene(rng: np.random.Generator, size: int = 128, max_objects: int = 4
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene: (uint8 (size, size, 3) image, float64 (M, 4) xyxy boxes, int64 (M,) labels)."""
    image = _strokes(rng, synthetic_seg.background(rng, size))
    wanted = int(rng.integers(1, max_objects + 1))
    labels: list[int] = []
    visible: list[np.ndarray] = []
    log_lo, log_hi = math.log(RADIUS_RANGE[0] * size), math.log(RADIUS_RANGE[1] * size)
    for _ in range(8 * wanted):
        if len(labels) == wanted:
            break
        radius = math.exp(rng.uniform(log_lo, log_hi))
        margin = _EXTENT * radius
        cx, cy = rng.uniform(margin, size - margin, size=2)
        label = int(rng.integers(len(CLASS_NAMES)))
        region = synthetic_seg.shape_mask(label + 1, size, cx, cy, radius, rng.uniform(0, 2 * np.pi))
        if not region.any() or not _fits(region, visible):
            continue
        colour = synthetic_seg.colour_far_from(rng, image[region].mean(axis=0))  # contrast with what it covers
        if rng.uniform() < 0.5:
            image[region] = colour
        else:  # A two-tone texture around the object's colour, drawn over the object's box only.
            x1, y1, x2, y2 = (int(v) for v in _tight_box(region))
            side = max(x2 - x1, y2 - y1)
            fill = synthetic_seg.texture(rng, side, colour, np.clip(colour + rng.normal(0, 35, 3), 0, 255))
            inside = region[y1:y2, x1:x2]
            image[y1:y2, x1:x2][inside] = fill[:y2 - y1, :x2 - x1][inside]
        visible = [v & ~region for v in visible] + [region]
        labels.append(label)
    image += 4 * rng.standard_normal(size=image.shape, dtype=np.float32)  # Pixel noise.
    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    if rng.uniform() < 0.2:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 0.7)))
    boxes = np.array([_tight_box(v) for v in visible], np.float64).reshape(-1, 4)
    return np.asarray(pil), boxes, np.array(labels, np.int64)


def generate_example(split: str, index: int, size: int = 128, max_objects: int = 4
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Example ``index`` of ``split`` ("train" | "validation"); deterministic."""
    return generate_scene(np.random.default_rng([SEED, _SPLIT_IDS[split], index]), size, max_objects)


class EvitDetShapes(tfds.core.GeneratorBasedBuilder):
    """Procedural shapes detection: 6 shape classes, 1-4 objects per image."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        EvitDetShapesConfig(name="default", description="128x128, 2400 train / 300 validation",
                            image_size=128, num_train=2400, num_validation=300),
        EvitDetShapesConfig(name="tiny", description="64x64, 64 train / 32 validation (tests, smoke runs)",
                            image_size=64, num_train=64, num_validation=32),
    ]
    DEFAULT_CONFIG_NAME = "default"
    IMAGE_KEY = coco.IMAGE_KEY
    LABEL_KEY = coco.LABEL_KEY
    CLASS_NAMES = CLASS_NAMES
    NUM_CLASSES = len(CLASS_NAMES)
    CATEGORY_IDS = CATEGORY_IDS

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=coco.detection_features(image_shape=(size, size, 3), image_encoding="png"),
            disable_shuffling=True,  # Record i is example i.
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded.
        config = self.builder_config
        return {"train": self._generate_examples("train", config.num_train),
                "validation": self._generate_examples("validation", config.num_validation)}

    def _generate_examples(self, split: str, num_examples: int):
        config = self.builder_config
        for index in range(num_examples):
            image, boxes, labels = generate_example(split, index, config.image_size, config.max_objects)
            yield index, {
                coco.IMAGE_KEY: seg_builder.encode_png(image),
                "image_id": index,
                "file_name": f"{split}/{index:05d}.png",
                coco.LABEL_KEY: {"bbox": boxes, "label": labels,
                                 "is_crowd": np.zeros(len(labels), np.bool_),
                                 "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])},
            }
