"""RandAugment as the official EfficientViT recipe runs it: timm's ``rand-n{N}-m{M}-mstd1.0-inc1``.

The official trainer (mit-han-lab/efficientvit ``efficientvit/apps/data_provider/augment/color_aug.py``,
``RandAug``) builds timm's ``rand_augment_transform`` with the hparams ``translate_pct=0.45``,
``img_mean`` = the ImageNet mean in uint8 ((124, 116, 104)) and bicubic resampling. That is:

- each image gets N ops drawn uniformly WITH replacement from the 15 ops of timm's
  ``_RAND_INCREASING_TRANSFORMS`` (:data:`INCREASING_OPS`);
- each drawn op is applied with probability 0.5;
- an applied op draws its magnitude from Normal(M, 1.0), clipped to [0, 10], and (for the
  signed ops) a sign with probability 1/2 each;
- the magnitude maps to the op's argument as timm's ``LEVEL_TO_ARG`` does (:func:`op_argument`).

:func:`apply_op` runs one op with explicit (magnitude, sign) on a PIL image; it is pixel-identical
to timm's ``AugmentOp`` with the same values (tests/test_randaugment.py). :class:`RandAugment`
draws the random parts from the numpy Generator the pipeline passes per example (so the result
depends only on the seed and the stream position, not on the grain worker count) and applies them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# round(255 * ImageNet mean): the fill of the geometric ops in the official recipe.
IMAGENET_MEAN_UINT8 = (124, 116, 104)
# The magnitude scale: M is in [0, MAGNITUDE_MAX] and arguments scale with M / 10.
MAGNITUDE_MAX = 10.0

# timm `_RAND_INCREASING_TRANSFORMS`, in its order.
INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
# Ops whose argument takes a random sign (timm's `_randomly_negate`).
SIGNED_OPS = frozenset({
    "Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
})
# Ops without an argument (their magnitude is irrelevant).
UNARY_OPS = frozenset({"AutoContrast", "Equalize", "Invert"})

_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


class OpCall(NamedTuple):
    """One applied op: its name, magnitude (already clipped) and whether its sign is negated."""

    name: str
    magnitude: float
    negate: bool


def _signed(value: float, negate: bool) -> float:
    return -value if negate else value


def op_argument(name: str, magnitude: float, negate: bool = False,
                translate_pct: float = 0.45) -> float | int | None:
    """The argument timm passes to op ``name`` at ``magnitude`` (0..10): degrees, enhance
    factor, shear factor, translation fraction, kept bits, threshold or added value.

    The arithmetic follows timm's ``*_level_to_arg`` functions operation by operation (the
    same float rounding), so the argument is bit-identical.
    """
    level = magnitude / MAGNITUDE_MAX
    if name in UNARY_OPS:
        return None
    if name == "Rotate":                                  # [-30, 30] degrees
        return _signed(level * 30.0, negate)
    if name == "PosterizeIncreasing":                     # keep 4 .. 0 bits
        return 4 - int(level * 4)
    if name == "SolarizeIncreasing":                      # threshold 256 .. 0
        return 256 - min(256, int(level * 256))
    if name == "SolarizeAdd":                             # add 0 .. 110 below 128
        return min(128, int(level * 110))
    if name.endswith("Increasing"):                       # enhance factor 1 -/+ 0.9, >= 0.1
        return max(0.1, 1.0 + _signed(level * 0.9, negate))
    if name in ("ShearX", "ShearY"):                      # [-0.3, 0.3]
        return _signed(level * 0.3, negate)
    if name in ("TranslateXRel", "TranslateYRel"):        # fraction of the image side
        return _signed(level * translate_pct, negate)
    raise ValueError(f"Unknown RandAugment op {name!r}; known: {', '.join(INCREASING_OPS)}.")


def _posterize(image: Image.Image, bits: int) -> Image.Image:
    # Pillow's posterize table, for 0 bits too: Pillow 13 refuses bits < 1 (timm's
    # PosterizeIncreasing reaches 0 at magnitude 10), earlier releases gave this black image.
    if bits >= 8:
        return image
    mask = ~(2 ** (8 - bits) - 1)
    return image.point([i & mask for i in range(256)] * len(image.getbands()))


def _solarize_add(image: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    table = [min(255, i + add) if i < threshold else i for i in range(256)]
    return image.point(table * len(image.getbands()))


def _affine(image: Image.Image, matrix: tuple, fill: tuple[int, ...], resample: int) -> Image.Image:
    return image.transform(image.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


# name -> fn(image, argument, fill, resample); the argument comes from `op_argument`.
_APPLY: dict[str, Callable[..., Image.Image]] = {
    "AutoContrast": lambda im, a, fill, rs: ImageOps.autocontrast(im),
    "Equalize": lambda im, a, fill, rs: ImageOps.equalize(im),
    "Invert": lambda im, a, fill, rs: ImageOps.invert(im),
    "Rotate": lambda im, a, fill, rs: im.rotate(a, resample=rs, fillcolor=fill),
    "PosterizeIncreasing": lambda im, a, fill, rs: _posterize(im, a),
    "SolarizeIncreasing": lambda im, a, fill, rs: ImageOps.solarize(im, a),
    "SolarizeAdd": lambda im, a, fill, rs: _solarize_add(im, a),
    "ColorIncreasing": lambda im, a, fill, rs: ImageEnhance.Color(im).enhance(a),
    "ContrastIncreasing": lambda im, a, fill, rs: ImageEnhance.Contrast(im).enhance(a),
    "BrightnessIncreasing": lambda im, a, fill, rs: ImageEnhance.Brightness(im).enhance(a),
    "SharpnessIncreasing": lambda im, a, fill, rs: ImageEnhance.Sharpness(im).enhance(a),
    "ShearX": lambda im, a, fill, rs: _affine(im, (1, a, 0, 0, 1, 0), fill, rs),
    "ShearY": lambda im, a, fill, rs: _affine(im, (1, 0, 0, a, 1, 0), fill, rs),
    # The translation is a fraction of the width (x) or height (y) of the image.
    "TranslateXRel": lambda im, a, fill, rs: _affine(im, (1, 0, a * im.size[0], 0, 1, 0), fill, rs),
    "TranslateYRel": lambda im, a, fill, rs: _affine(im, (1, 0, 0, 0, 1, a * im.size[1]), fill, rs),
}


def apply_op(image: Image.Image, name: str, magnitude: float, negate: bool = False, *,
             fill: tuple[int, ...] = IMAGENET_MEAN_UINT8, translate_pct: float = 0.45,
             resample: str = "bicubic") -> Image.Image:
    """Applies RandAugment op ``name`` to an RGB PIL image with an explicit magnitude (0..10)
    and sign; geometric ops resample with ``resample`` and fill uncovered pixels with ``fill``."""
    if name not in _APPLY:
        raise ValueError(f"Unknown RandAugment op {name!r}; known: {', '.join(INCREASING_OPS)}.")
    argument = op_argument(name, magnitude, negate, translate_pct)
    return _APPLY[name](image, argument, tuple(fill), _RESAMPLE[resample])


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """timm ``rand-n{num_ops}-m{magnitude}-mstd{magnitude_std}-inc1`` with the official hparams.

    ``rng`` draws, per image: ``num_ops`` op indices (uniform, with replacement); per op, whether
    it applies (``probability``); per applied op, its magnitude ~ Normal(magnitude,
    magnitude_std) clipped to [0, 10] (``magnitude_std=inf``: Uniform(0, magnitude), timm's
    ``mstd`` > 100) and, for signed ops, the sign (1/2 each). Call it on a PIL RGB image.
    """

    num_ops: int
    magnitude: float
    magnitude_std: float = 1.0
    probability: float = 0.5
    translate_pct: float = 0.45
    fill: tuple[int, int, int] = IMAGENET_MEAN_UINT8
    resample: str = "bicubic"

    def __post_init__(self):
        if self.num_ops < 0 or not 0 <= self.magnitude <= MAGNITUDE_MAX:
            raise ValueError(f"RandAugment needs num_ops >= 0 and 0 <= magnitude <= {MAGNITUDE_MAX:g}, "
                             f"got n={self.num_ops}, m={self.magnitude}.")
        if self.magnitude_std < 0 or not 0 <= self.probability <= 1:
            raise ValueError(f"RandAugment needs magnitude_std >= 0 and 0 <= probability <= 1, "
                             f"got mstd={self.magnitude_std}, p={self.probability}.")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"RandAugment resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}.")
        if len(self.fill) != 3 or not all(0 <= int(v) <= 255 for v in self.fill):
            raise ValueError(f"RandAugment fill must be 3 uint8 values, got {self.fill!r}.")

    @property
    def timm_config(self) -> str:
        """The equivalent timm config string (with the hparams above)."""
        return f"rand-n{self.num_ops}-m{self.magnitude:g}-mstd{self.magnitude_std}-inc1"

    def _sample_magnitude(self, rng: np.random.Generator) -> float:
        if self.magnitude_std == math.inf:
            value = rng.uniform(0.0, self.magnitude)
        elif self.magnitude_std > 0:
            value = rng.normal(self.magnitude, self.magnitude_std)
        else:
            value = self.magnitude
        return float(min(max(value, 0.0), MAGNITUDE_MAX))

    def sample(self, rng: np.random.Generator) -> list[OpCall]:
        """The ops applied to one image, in order (skipped draws are left out)."""
        calls = []
        # The draws come in timm's order and with its comparisons (skip when u > p, negate
        # when u > 0.5), so that one stream of numbers gives timm's result (tested).
        for index in rng.integers(0, len(INCREASING_OPS), size=self.num_ops):
            if self.probability < 1.0 and rng.random() > self.probability:
                continue
            name = INCREASING_OPS[int(index)]
            magnitude = self._sample_magnitude(rng)
            negate = bool(rng.random() > 0.5) if name in SIGNED_OPS else False
            calls.append(OpCall(name, magnitude, negate))
        return calls

    def apply(self, image: Image.Image, calls: Sequence[OpCall]) -> Image.Image:
        """Applies the drawn ``calls`` in order."""
        for call in calls:
            image = apply_op(image, call.name, call.magnitude, call.negate, fill=self.fill,
                             translate_pct=self.translate_pct, resample=self.resample)
        return image

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        return self.apply(image, self.sample(rng))
