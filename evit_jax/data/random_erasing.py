"""Random erasing as the official EfficientViT L recipe runs it (host half: the box).

The official trainer (mit-han-lab/efficientvit ``efficientvit/clscore/data_provider/imagenet.py``)
appends timm's ``RandomErasing(p, device="cpu")`` after ``ToTensor`` + ``Normalize``, with timm's
defaults: mode ``"const"`` (the box is set to 0 in the NORMALISED image, i.e. to the exact
dataset mean colour), one box, area U(0.02, 1/3) of the image, log-uniform aspect ratio in
[0.3, 1/0.3], 10 tries to fit the box strictly inside the image (else nothing is erased).

Here images stay uint8 on the host and are normalised on the device, and no uint8 value
normalises to exactly 0 (the mean is 123.675, 116.28, 103.53). So the host draws the box with
:func:`random_erasing_box` and passes it beside the image as ``batch["erase_box"]`` (int32
[top, left, height, width], all 0 when nothing is erased); the classification task zeroes that
box right after normalising (``evit_jax.tasks.classification.erase_boxes``), which is exactly
timm's output.
"""

from __future__ import annotations

import math

import numpy as np

ERASE_BOX_KEY = "erase_box"
NO_BOX = (0, 0, 0, 0)


def random_erasing_box(height: int, width: int, rng: np.random.Generator, probability: float,
                       area: tuple[float, float] = (0.02, 1 / 3),
                       aspect: tuple[float, float] = (0.3, 1 / 0.3),
                       tries: int = 10) -> np.ndarray:
    """timm ``RandomErasing`` box (count 1) of an image of ``height`` x ``width``: int32
    [top, left, box_height, box_width], or all 0 when the image is not erased.

    With ``probability``, up to ``tries`` times: target area ~ U(area) * H * W, aspect
    ~ exp(U(log aspect)), box (h, w) = round(sqrt(area * aspect)), round(sqrt(area / aspect));
    the first box with h < H and w < W is placed uniformly (top in [0, H - h], left in [0, W - w]).
    """
    if rng.random() > probability:   # timm's comparison
        return np.array(NO_BOX, np.int32)
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    for _ in range(tries):
        target_area = rng.uniform(area[0], area[1]) * height * width
        ratio = math.exp(rng.uniform(log_aspect[0], log_aspect[1]))
        h = int(round(math.sqrt(target_area * ratio)))
        w = int(round(math.sqrt(target_area / ratio)))
        if w < width and h < height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return np.array((top, left, h, w), np.int32)
    return np.array(NO_BOX, np.int32)

