"""Per-example classification transforms (host side, numpy + PIL).

Pure functions of (image, numpy Generator) follow torchvision semantics on PIL images
(PIL resizing is what torchvision uses for PIL inputs, antialiasing included):

- `random_resized_crop`: torchvision `RandomResizedCrop` (10 tries, then centre-crop
    fallback) with the interpolation drawn per sample in "random" mode, as the official
    EfficientViT recipe does (`MyRandomResizedCrop`, one of nearest / bilinear / bicubic /
    box / hamming / lanczos), or any fixed mode / tuple of modes to draw from.
- `random_horizontal_flip`.
- `resize_center_crop`: the official evaluation protocol, resize the short side to
    ceil(size / crop_ratio) with bicubic, then centre-crop `size`.
- RandAugment (`evit_jax.data.randaugment`, timm's `rand-n{n}-m{m}-mstd1.0-inc1`) and the
    box of random erasing (`evit_jax.data.random_erasing`; the box is zeroed on the device
    after normalisation, exactly as timm erases the normalised tensor).

Outputs stay uint8 HWC: mean/std normalisation happens on the device (4x fewer bytes
to move, and cheaper there).

`ClassificationTrainTransform` / `ClassificationEvalTransform` bundle these into the
callables that `evit_jax.data.pipeline` runs in grain (picklable, so they run in grain
worker processes too).
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image

from evit_jax.data import random_erasing
from evit_jax.data.randaugment import RandAugment

_PIL_MODES = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
    "lanczos": Image.LANCZOS,
}
# The official "random" interpolation draws uniformly from all six torchvision modes.
RANDOM_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")

Size = int | tuple[int, int]

# ImageNet statistics on 0..255 pixels (every EfficientViT model is trained with them).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255.0
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255.0


def normalize_images(images):
    """uint8 NHWC -> float32 ``(x - mean) / std`` with the ImageNet statistics.

    Written with array methods only, so the same function normalises numpy arrays on the host and
    jax arrays inside jit (the tasks' device-side preprocessing) without this package importing jax.
    """
    return (images.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD


def _hw(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def _interpolation_choices(interpolation: str | Sequence[str]) -> tuple[str, ...]:
    choices = RANDOM_INTERPOLATIONS if interpolation == "random" else (
        (interpolation,) if isinstance(interpolation, str) else tuple(interpolation))
    unknown = [c for c in choices if c not in _PIL_MODES]
    if unknown or not choices:
        raise ValueError(f"Unknown interpolation {interpolation!r}; use 'random', one of "
                         f"{sorted(_PIL_MODES)} or a tuple of them.")
    return choices


def decode_image(value: Any) -> np.ndarray:
    """Any stored image (encoded bytes or array, gray/RGB/RGBA) -> uint8 (H, W, 3) RGB."""
    if isinstance(value, (bytes, bytearray)):
        with Image.open(io.BytesIO(value)) as pil:
            return np.asarray(pil.convert("RGB"))
    image = np.asarray(value)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"Expected an image of shape (H, W[, 1|3|4]), got {image.shape}.")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:
        image = image[..., :3]
    return image.astype(np.uint8, copy=False)


def resize(image: np.ndarray, size: Size, interpolation: str = "bicubic") -> np.ndarray:
    """Resizes a uint8 HWC image to `size` = (height, width) with PIL (antialiased)."""
    height, width = _hw(size)
    if image.shape[:2] == (height, width):
        return image
    pil = Image.fromarray(image).resize((width, height), _PIL_MODES[interpolation])
    return np.asarray(pil)


def random_resized_crop_params(height: int, width: int, rng: np.random.Generator,
                               scale: tuple[float, float] = (0.08, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)
                               ) -> tuple[int, int, int, int]:
    """torchvision `RandomResizedCrop.get_params`: (top, left, crop_height, crop_width)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the largest centred crop whose aspect ratio lies within `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop_pil(image: np.ndarray, size: Size, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3),
                            interpolation: str | Sequence[str] = "random") -> Image.Image:
    """`random_resized_crop` returning the PIL image (for PIL ops that follow, one copy less)."""
    choices = _interpolation_choices(interpolation)
    top, left, h, w = random_resized_crop_params(image.shape[0], image.shape[1], rng, scale, ratio)
    mode = choices[int(rng.integers(len(choices)))] if len(choices) > 1 else choices[0]
    height, width = _hw(size)
    # Crop first (torchvision's crop-then-resize; PIL's resize `box` would sample outside it).
    crop = Image.fromarray(np.ascontiguousarray(image[top:top + h, left:left + w]))
    return crop.resize((width, height), _PIL_MODES[mode])


def random_resized_crop(image: np.ndarray, size: Size, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        interpolation: str | Sequence[str] = "random") -> np.ndarray:
    """Crops a random area/aspect region and resizes it to `size` (int or (h, w)).

    `interpolation`: a mode name, a tuple of names drawn from per call, or "random"
    (the official recipe: any of RANDOM_INTERPOLATIONS).
    """
    return np.asarray(random_resized_crop_pil(image, size, rng, scale, ratio, interpolation))


def random_horizontal_flip(image: np.ndarray | Image.Image, rng: np.random.Generator,
                           probability: float = 0.5) -> np.ndarray | Image.Image:
    """Mirrors the image (numpy HWC or PIL) left-right with `probability`."""
    if rng.uniform() < probability:
        if isinstance(image, Image.Image):
            return image.transpose(Image.FLIP_LEFT_RIGHT)
        return np.ascontiguousarray(image[:, ::-1])
    return image


def resize_short_side(image: np.ndarray, short_side: int,
                      interpolation: str = "bicubic") -> np.ndarray:
    """torchvision `Resize(int)`: the short side becomes `short_side`, aspect kept."""
    height, width = image.shape[:2]
    if height <= width:
        new_h, new_w = short_side, int(short_side * width / height)
    else:
        new_h, new_w = int(short_side * height / width), short_side
    return resize(image, (new_h, new_w), interpolation)


def center_crop(image: np.ndarray, size: Size) -> np.ndarray:
    """torchvision `CenterCrop` for images at least `size` large."""
    crop_h, crop_w = _hw(size)
    height, width = image.shape[:2]
    if crop_h > height or crop_w > width:
        raise ValueError(
            f"Cannot centre-crop {(crop_h, crop_w)} from an image of {(height, width)}.")
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return image[top:top + crop_h, left:left + crop_w]


def resize_center_crop(image: np.ndarray, size: int, crop_ratio: float = 1.0,
                       interpolation: str = "bicubic") -> np.ndarray:
    """Official evaluation: short side to ceil(size / crop_ratio), then centre crop `size`."""
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}.")
    short_side = int(math.ceil(size / crop_ratio))
    return np.ascontiguousarray(
        center_crop(resize_short_side(image, short_side, interpolation), size))


@dataclasses.dataclass(frozen=True)
class ClassificationTrainTransform:
    """Training transform: decode, RandomResizedCrop to the batch's size, flip, then
    optionally RandAugment and the random-erasing box (the official recipe's order).

    Called by the train pipeline as `transform(example, size, rng)`, where `size` is the
    (height, width) drawn for the whole batch and `rng` a per-example numpy Generator.
    Returns {"image": uint8 (h, w, 3), "label": int32 scalar}, plus "erase_box" int32 (4,)
    (`random_erasing.random_erasing_box`) when `erasing_prob` > 0.

    `randaugment`: (n, m) for timm's `rand-n{n}-m{m}-mstd1.0-inc1` with the official hparams
    (`randaugment.RandAugment`), or None. `erasing_prob`: timm RandomErasing probability.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str | tuple[str, ...] = "random"
    flip_probability: float = 0.5
    randaugment: tuple[int, float] | None = None
    erasing_prob: float = 0.0
    image_key: str = "image"
    label_key: str = "label"

    def __post_init__(self):
        _interpolation_choices(self.interpolation)  # Fail at construction, not in a worker.
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}.")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}.")
        if self.randaugment is not None:
            if len(self.randaugment) != 2:
                raise ValueError(f"randaugment must be (num_ops, magnitude) or None, got {self.randaugment!r}.")
            self._randaugment()
        if not 0 <= self.erasing_prob <= 1:
            raise ValueError(f"erasing_prob must be in [0, 1], got {self.erasing_prob}.")

    def _randaugment(self) -> RandAugment:
        num_ops, magnitude = self.randaugment
        return RandAugment(int(num_ops), float(magnitude))

    def __call__(self, example: dict[str, Any], size: Size,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
        image = random_resized_crop_pil(decode_image(example[self.image_key]), size, rng,
                                        self.scale, self.ratio, self.interpolation)
        image = random_horizontal_flip(image, rng, self.flip_probability)
        if self.randaugment is not None:
            image = self._randaugment()(image, rng)
        out = {"image": np.asarray(image), "label": np.int32(example[self.label_key])}
        if self.erasing_prob > 0:
            out[random_erasing.ERASE_BOX_KEY] = random_erasing.random_erasing_box(
                image.height, image.width, rng, self.erasing_prob)
        return out


@dataclasses.dataclass(frozen=True)
class ClassificationEvalTransform:
    """Evaluation transform: decode, short side to ceil(size / crop_ratio), centre crop.

    Called by the eval pipeline as `transform(example)`; returns
    {"image": uint8 (size, size, 3), "label": int32 scalar}.
    """

    size: int
    crop_ratio: float = 1.0
    interpolation: str = "bicubic"
    image_key: str = "image"
    label_key: str = "label"

    def __post_init__(self):
        _interpolation_choices(self.interpolation)
        if not 0 < self.crop_ratio <= 1:
            raise ValueError(f"crop_ratio must be in (0, 1], got {self.crop_ratio}.")

    def __call__(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        image = decode_image(example[self.image_key])
        image = resize_center_crop(image, self.size, self.crop_ratio, self.interpolation)
        return {"image": image, "label": np.int32(example[self.label_key])}
