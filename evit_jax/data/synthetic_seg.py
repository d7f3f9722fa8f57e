"""`evit_seg_shapes`: a procedurally generated semantic-segmentation dataset.

Each 128x128 scene holds 2-4 possibly overlapping objects over a textured background
(smooth noise, stripes, checkerboard or gradient, with small distractor dots and lines
that belong to the background). The class of an object is its SHAPE (disc, square,
triangle, cross, ring, star); its colour and texture are drawn independently of the class
and contrast with the background, so colour alone cannot solve the task. Later objects
occlude earlier ones. The dense uint8 mask holds 0 for background, 1..6 for the shapes and
255 (ignore) on a thin band where two labels meet and under an occasional grey occluding
patch whose content is unknowable.

Generation is deterministic: example ``i`` of split ``s`` is drawn from
``numpy.random.default_rng([SEED, split_id, i])``; 4500 scenes take a few seconds.
The builder writes ArrayRecord with PNG images and masks and needs no TensorFlow; it is
built automatically on first use by ``evit_jax.data.sources.get_source("evit_seg_shapes", ...)``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from evit_jax.data import seg_builder

CLASS_NAMES = ("background", "disc", "square", "triangle", "cross", "ring", "star")
IGNORE_INDEX = seg_builder.IGNORE_INDEX
SEED = 20240607
_SPLIT_IDS = {"train": 0, "validation": 1}
# Colours of an object and of the background mean differ by at least this (RGB L2).
_MIN_CONTRAST = 90.0


@dataclasses.dataclass
class EvitSegShapesConfig(tfds.core.BuilderConfig):
    """Image size and split sizes of one variant of the dataset."""

    image_size: int = 128
    num_train: int = 4000
    num_validation: int = 500


# ----------------------------------------------------------------------------- shapes
def _polygon(points: np.ndarray, cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    rotated = points @ np.array([[c, s], [-s, c]])
    return [(float(x + cx), float(y + cy)) for x, y in rotated]


def _regular(n: int, radius: float) -> np.ndarray:
    t = np.arange(n) * 2 * np.pi / n - np.pi / 2
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _star_points(radius: float) -> np.ndarray:
    t = np.arange(10) * np.pi / 5 - np.pi / 2
    r = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _cross_points(radius: float) -> np.ndarray:
    a, b = radius, 0.34 * radius
    return np.array([(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b),
                     (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)])


def shape_mask(class_id: int, size: int, cx: float, cy: float, radius: float,
               angle: float) -> np.ndarray:
    """Boolean (size, size) mask of shape ``CLASS_NAMES[class_id]`` (1..6)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    name = CLASS_NAMES[class_id]
    if name in ("disc", "ring"):
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=1)
        if name == "ring":
            inner = 0.5 * radius
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    else:
        points = {"square": lambda: _regular(4, 1.15 * radius),
                  "triangle": lambda: _regular(3, 1.3 * radius),
                  "cross": lambda: _cross_points(1.1 * radius),
                  "star": lambda: _star_points(1.3 * radius)}[name]()
        draw.polygon(_polygon(points, cx, cy, angle), fill=1)
    return np.asarray(canvas, dtype=bool)


# ----------------------------------------------------------------------------- textures
def texture(rng: np.random.Generator, size: int, colour_a: np.ndarray,
            colour_b: np.ndarray) -> np.ndarray:
    """A float32 (size, size, 3) texture blending two colours by a random pattern."""
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    kind = int(rng.integers(4))
    if kind == 0:    # smooth value noise
        cells = int(rng.integers(3, 9))
        coarse = rng.uniform(size=(cells, cells)).astype(np.float32)
        t = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))
    elif kind == 1:  # stripes
        theta, period = rng.uniform(0, np.pi), rng.uniform(0.05, 0.25)
        t = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period))
    elif kind == 2:  # checkerboard
        cells = int(rng.integers(2, 10))
        t = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(np.float32)
    else:            # linear gradient
        theta = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(theta) + yy * np.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    colour_a, colour_b = np.float32(colour_a), np.float32(colour_b)
    return colour_a + np.clip(t, 0, 1)[..., None] * (colour_b - colour_a)


def colour_far_from(rng: np.random.Generator, reference: np.ndarray) -> np.ndarray:
    """A random RGB colour at least _MIN_CONTRAST from ``reference`` (also used by synthetic_det)."""
    for _ in range(64):
        colour = rng.uniform(0, 255, size=3)
        if np.linalg.norm(colour - reference) >= _MIN_CONTRAST:
            return colour
    return 255.0 - reference  # Always far enough from a mid-range reference.


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A float32 (size, size, 3) textured background with small distractor dots and lines
    (also the background of synthetic_det's scenes)."""
    base = rng.uniform(0, 255, size=3)
    other = np.clip(base + rng.normal(0, 45, size=3), 0, 255)
    image = texture(rng, size, base, other)
    # Distractors: small dots and thin lines, all background.
    layer = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(0, 4))):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        x, y = rng.uniform(0, size, size=2)
        if rng.uniform() < 0.5:
            r = rng.uniform(0.015, 0.04) * size
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        else:
            x1, y1 = rng.uniform(0, size, size=2)
            draw.line((x, y, x1, y1), fill=colour, width=1)
    return np.asarray(layer, dtype=np.float32)


def _place_objects(rng: np.random.Generator, size: int) -> list[tuple[float, float, float]]:
    """(cx, cy, radius) of 2-4 objects that overlap a little at most."""
    placed: list[tuple[float, float, float]] = []
    wanted = int(rng.integers(2, 5))
    for _ in range(40):
        if len(placed) == wanted:
            break
        radius = rng.uniform(0.14, 0.25) * size
        cx, cy = rng.uniform(0.6 * radius, size - 0.6 * radius, size=2)
        if all(math.hypot(cx - x, cy - y) >= 0.8 * (radius + r) for x, y, r in placed):
            placed.append((cx, cy, radius))
    return placed


def _label_boundaries(labels: np.ndarray) -> np.ndarray:
    """True on both pixels of every 4-neighbour pair whose labels differ."""
    edge = np.zeros(labels.shape, dtype=bool)
    vertical = labels[1:] != labels[:-1]
    horizontal = labels[:, 1:] != labels[:, :-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge


def generate_scene(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (uint8 (size, size, 3) image, uint8 (size, size) mask with 255 = ignore)."""
    image = background(rng, size)
    background_mean = image.reshape(-1, 3).mean(axis=0)
    labels = np.zeros((size, size), dtype=np.uint8)
    for cx, cy, radius in _place_objects(rng, size):
        class_id = int(rng.integers(1, len(CLASS_NAMES)))
        region = shape_mask(class_id, size, cx, cy, radius, rng.uniform(0, 2 * np.pi))
        colour = colour_far_from(rng, background_mean)
        if rng.uniform() < 0.5:
            image[region] = colour
        else:  # A two-tone texture around the object's colour.
            fill = texture(rng, size, colour, np.clip(colour + rng.normal(0, 35, 3), 0, 255))
            image[region] = fill[region]
        labels[region] = class_id
    image += 4 * rng.standard_normal(size=image.shape, dtype=np.float32)  # Pixel noise.

    mask = labels.copy()
    mask[_label_boundaries(labels)] = IGNORE_INDEX
    if rng.uniform() < 0.3:  # An occluder hides whatever is below: its label is unknowable.
        h, w = (rng.uniform(0.08, 0.18, size=2) * size).astype(int) + 1
        y, x = int(rng.integers(0, size - h)), int(rng.integers(0, size - w))
        image[y:y + h, x:x + w] = rng.uniform(90, 170) + rng.normal(0, 12, size=(h, w, 1))
        mask[y:y + h, x:x + w] = IGNORE_INDEX
    return np.clip(image, 0, 255).astype(np.uint8), mask


def generate_example(split: str, index: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Example ``index`` of ``split`` ("train" | "validation"); deterministic."""
    return generate_scene(np.random.default_rng([SEED, _SPLIT_IDS[split], index]), size)


class EvitSegShapes(tfds.core.GeneratorBasedBuilder):
    """Procedural shapes segmentation: 7 classes (background + 6 shapes), 255 = ignore."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        EvitSegShapesConfig(name="default", description="128x128, 4000 train / 500 validation",
                            image_size=128, num_train=4000, num_validation=500),
        EvitSegShapesConfig(name="tiny", description="64x64, 96 train / 32 validation (tests, smoke runs)",
                            image_size=64, num_train=96, num_validation=32),
    ]
    DEFAULT_CONFIG_NAME = "default"
    IMAGE_KEY = seg_builder.IMAGE_KEY
    LABEL_KEY = seg_builder.LABEL_KEY
    IGNORE_INDEX = IGNORE_INDEX
    CLASS_NAMES = CLASS_NAMES
    NUM_CLASSES = len(CLASS_NAMES)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=seg_builder.segmentation_features(image_shape=(size, size, 3)),
            disable_shuffling=True,  # Record i is example i: easy to check and to browse.
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded.
        config = self.builder_config
        return {"train": self._generate_examples("train", config.num_train),
                "validation": self._generate_examples("validation", config.num_validation)}

    def _generate_examples(self, split: str, num_examples: int):
        size = self.builder_config.image_size
        for index in range(num_examples):
            image, mask = generate_example(split, index, size)
            yield index, {
                seg_builder.IMAGE_KEY: seg_builder.encode_png(image),
                seg_builder.LABEL_KEY: seg_builder.encode_png(mask),
                "file_name": f"{split}/{index:05d}.png",
            }
