"""`evit_shapes`: a procedurally generated 10-class image-classification dataset.

Each image shows one shape (the class) with a random colour, position, scale and
rotation over a textured random background with a few distractor blobs and lines.
Colour is drawn independently of the class, so the class cannot be read from the mean
colour (a nearest-centroid classifier on mean colour stays near chance), while a small
CNN learns the shapes quickly. Generation is deterministic: example ``i`` of split ``s``
is drawn from ``numpy.random.default_rng([SEED, split_id, i])``.

The builder writes ArrayRecord files with PNG-encoded images and needs no TensorFlow.
Build it through `evit_jax.data.sources.get_source("evit_shapes", ...)`, which does it
automatically on first use.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw, ImageFilter

CLASS_NAMES = (
    "circle", "square", "triangle", "star", "cross",
    "ring", "hexagon", "crescent", "arrow", "heart",
)
SEED = 20240601
_SPLIT_IDS = {"train": 0, "test": 1}
# Shapes are drawn at this multiple of the output size and downsampled: smooth edges.
_SUPERSAMPLE = 2


@dataclasses.dataclass
class EvitShapesConfig(tfds.core.BuilderConfig):
    """Image size and split sizes of one variant of the dataset."""

    image_size: int = 64
    num_train: int = 20000
    num_test: int = 2000


# ----------------------------------------------------------------------------- geometry
def _regular_polygon(n: int, radius: float, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(radius: float) -> np.ndarray:
    angles = -np.pi / 2 + np.pi * np.arange(10) / 5
    radii = np.where(np.arange(10) % 2 == 0, radius, 0.42 * radius)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _cross(radius: float) -> np.ndarray:
    a, b = radius, 0.33 * radius
    return np.array([(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b),
                     (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)], float)


def _arrow(radius: float) -> np.ndarray:
    r = radius
    return np.array([(r, 0), (0.05 * r, -0.8 * r), (0.05 * r, -0.3 * r), (-r, -0.3 * r),
                     (-r, 0.3 * r), (0.05 * r, 0.3 * r), (0.05 * r, 0.8 * r)], float)


def _heart(radius: float) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], axis=1) / 17.0
    return radius * pts


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _shape_mask(label: int, canvas: int, cx: float, cy: float, radius: float,
                angle: float) -> Image.Image:
    """A binary ('L') mask of shape `label` centred at (cx, cy), rotated by `angle`."""
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)

    def polygon(points):
        pts = _rotate(points, angle) + np.array([cx, cy])
        draw.polygon([tuple(p) for p in pts], fill=255)

    def disc(x, y, r, fill=255):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)

    name = CLASS_NAMES[label]
    if name == "circle":
        disc(cx, cy, radius)
    elif name == "square":
        polygon(_regular_polygon(4, radius * 1.05, np.pi / 4))
    elif name == "triangle":
        polygon(_regular_polygon(3, radius * 1.1, -np.pi / 2))
    elif name == "star":
        polygon(_star(radius * 1.1))
    elif name == "cross":
        polygon(_cross(radius))
    elif name == "ring":
        disc(cx, cy, radius)
        disc(cx, cy, radius * 0.55, fill=0)
    elif name == "hexagon":
        polygon(_regular_polygon(6, radius))
    elif name == "crescent":
        disc(cx, cy, radius)
        offset = _rotate(np.array([[0.45 * radius, 0.0]]), angle)[0]
        disc(cx + offset[0], cy + offset[1], radius * 0.85, fill=0)
    elif name == "arrow":
        polygon(_arrow(radius * 1.1))
    elif name == "heart":
        polygon(_heart(radius * 1.05))
    return mask


# ----------------------------------------------------------------------------- textures
def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3)


def _contrasting_colour(rng: np.random.Generator, avoid: list[np.ndarray],
                        min_distance: float = 120.0) -> np.ndarray:
    """A random colour at least `min_distance` (RGB L2) from every colour in `avoid`."""
    best, best_dist = None, -1.0
    for _ in range(32):
        colour = _random_colour(rng)
        dist = min(np.linalg.norm(colour - a) for a in avoid)
        if dist >= min_distance:
            return colour
        if dist > best_dist:
            best, best_dist = colour, dist
    return best


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A float (size, size, 3) texture and the colours it is made of."""
    base = _random_colour(rng)
    # The second colour stays near the first so that the shape can contrast with both.
    other = np.clip(base + rng.normal(0, 20, size=3), 0, 255)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = rng.integers(4)
    if kind == 0:    # smooth noise
        coarse = rng.uniform(size=(size // 8 + 1, size // 8 + 1)).astype(np.float32)
        t = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
        t = np.clip(t, 0, 1)
    elif kind == 1:  # stripes at a random angle and period
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(0.08, 0.3)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
    elif kind == 2:  # checkerboard
        cells = rng.integers(3, 9)
        t = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(np.float32)
    else:            # linear gradient
        theta = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(theta) + yy * np.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    texture = base + t[..., None] * (other - base)
    texture += rng.normal(0, 6, size=texture.shape)  # pixel noise
    return texture, [base, other]


def _distractors(rng: np.random.Generator, size: int) -> Image.Image:
    """An RGBA layer with 1-3 small blobs and thin lines in random colours."""
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(1, 4))):
        colour = tuple(int(c) for c in _random_colour(rng)) + (255,)
        if rng.uniform() < 0.5:
            x, y = rng.uniform(0, size, size=2)
            r = rng.uniform(0.02, 0.06) * size
            rx, ry = r * rng.uniform(0.6, 1.4), r * rng.uniform(0.6, 1.4)
            draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=colour)
        else:
            x0, y0, x1, y1 = rng.uniform(0, size, size=4)
            draw.line((x0, y0, x1, y1), fill=colour, width=max(1, int(size / 64)))
    return layer


# ----------------------------------------------------------------------------- examples
def generate_image(label: int, rng: np.random.Generator, image_size: int = 64) -> np.ndarray:
    """Draws one uint8 (image_size, image_size, 3) image of class `label`."""
    texture, background_colours = _background(rng, image_size)
    image = Image.fromarray(np.clip(texture, 0, 255).astype(np.uint8))
    # Distractors go under the shape, or over it (crossing its outline) a quarter of the time.
    distractors = _distractors(rng, image_size)
    over = rng.uniform() < 0.25
    if not over:
        image.paste(distractors, (0, 0), distractors)

    canvas = image_size * _SUPERSAMPLE
    radius = rng.uniform(0.25, 0.4) * canvas
    margin = 1.05 * radius  # Keeps (nearly) the whole shape inside the image.
    cx, cy = rng.uniform(margin, canvas - margin, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    mask = _shape_mask(label, canvas, cx, cy, radius, angle)
    mask = mask.resize((image_size, image_size), Image.BILINEAR)
    colour = _contrasting_colour(rng, background_colours)
    fill = Image.new("RGB", (image_size, image_size), tuple(int(c) for c in colour))
    image.paste(fill, (0, 0), mask)
    if over:
        image.paste(distractors, (0, 0), distractors)
    if rng.uniform() < 0.2:
        image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 0.8)))
    return np.asarray(image)


def generate_example(split: str, index: int, image_size: int = 64) -> tuple[np.ndarray, int]:
    """Example `index` of `split`: (uint8 HWC image, label). Deterministic."""
    rng = np.random.default_rng([SEED, _SPLIT_IDS[split], index])
    label = int(rng.integers(len(CLASS_NAMES)))
    return generate_image(label, rng, image_size), label


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class EvitShapes(tfds.core.GeneratorBasedBuilder):
    """Procedural 10-class shapes dataset (see the module docstring)."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {
        "1.0.0": "First release.",
        "1.1.0": "Easier: shapes kept inside the image, calmer backgrounds, fewer distractors.",
        "1.2.0": "Easier: larger shapes, more colour contrast, calmer textures, less blur.",
    }
    BUILDER_CONFIGS = [
        EvitShapesConfig(name="default", description="64x64, 20000 train / 2000 test",
                         image_size=64, num_train=20000, num_test=2000),
        EvitShapesConfig(name="tiny", description="32x32, 300 train / 70 test (tests, smoke runs)",
                         image_size=32, num_train=300, num_test=70),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded.
        config = self.builder_config
        return {
            "train": self._generate_examples("train", config.num_train),
            "test": self._generate_examples("test", config.num_test),
        }

    def _generate_examples(self, split: str, num_examples: int):
        size = self.builder_config.image_size
        for index in range(num_examples):
            image, label = generate_example(split, index, size)
            yield index, {"image": _png_bytes(image), "label": label}
