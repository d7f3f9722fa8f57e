"""Classification transforms: shapes, torchvision semantics, determinism."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from evit_jax.data import transforms


def _image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("height,width", [(40, 60), (60, 40), (32, 32)])
def test_random_resized_crop_params_respect_scale_and_ratio(height, width):
    rng = np.random.default_rng(0)
    scale, ratio = (0.2, 0.9), (3 / 4, 4 / 3)
    for _ in range(200):
        top, left, h, w = transforms.random_resized_crop_params(height, width, rng, scale, ratio)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        # Rounding to whole pixels moves area and aspect slightly off the sampled values.
        assert scale[0] * 0.8 <= h * w / (height * width) <= scale[1] * 1.2
        assert ratio[0] * 0.85 <= w / h <= ratio[1] * 1.15


@pytest.mark.parametrize("height,width", [(10, 100), (100, 10), (50, 60)])
def test_random_resized_crop_fallback_matches_torchvision(height, width):
    torchvision = pytest.importorskip("torchvision")
    # A scale above 1 never fits, so both take the deterministic centre-crop fallback.
    scale, ratio = (2.0, 3.0), (3 / 4, 4 / 3)
    ours = transforms.random_resized_crop_params(height, width, np.random.default_rng(0),
                                                 scale, ratio)
    pil = Image.fromarray(_image(height, width))
    theirs = torchvision.transforms.RandomResizedCrop.get_params(pil, list(scale), list(ratio))
    assert ours == tuple(theirs)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest", "lanczos"])
def test_random_resized_crop_equals_torchvision_resized_crop(mode):
    torchvision = pytest.importorskip("torchvision")
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    image = _image(50, 70)
    rng = np.random.default_rng(3)
    ours = transforms.random_resized_crop(image, (24, 32), rng, interpolation=mode)
    top, left, h, w = transforms.random_resized_crop_params(50, 70, np.random.default_rng(3))
    theirs = F.resized_crop(Image.fromarray(image), top, left, h, w, [24, 32],
                            InterpolationMode(mode))
    assert ours.shape == (24, 32, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, np.asarray(theirs))


def test_random_interpolation_draws_several_modes():
    assert transforms._interpolation_choices("random") == transforms.RANDOM_INTERPOLATIONS
    assert transforms._interpolation_choices(("bilinear", "bicubic")) == ("bilinear", "bicubic")
    image = _image(40, 40)
    # The crop is the whole image, so the only randomness left is the interpolation mode.
    outputs = {transforms.random_resized_crop(image, 17, np.random.default_rng(seed),
                                              scale=(1, 1), ratio=(1, 1)).tobytes()
               for seed in range(40)}
    assert len(outputs) >= 4
    with pytest.raises(ValueError, match="Unknown interpolation"):
        transforms.ClassificationTrainTransform(interpolation="cubic")


@pytest.mark.parametrize("size,crop_ratio,shape", [(32, 1.0, (48, 64)), (32, 0.875, (64, 48)),
                                                   (24, 0.95, (24, 24)), (20, 1.0, (100, 21))])
def test_resize_center_crop_matches_torchvision(size, crop_ratio, shape):
    torchvision = pytest.importorskip("torchvision")
    from torchvision import transforms as T

    image = _image(*shape)
    ours = transforms.resize_center_crop(image, size, crop_ratio)
    reference = T.Compose([
        T.Resize(int(math.ceil(size / crop_ratio)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
    ])(Image.fromarray(image))
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, np.asarray(reference))


def test_center_crop_keeps_the_centre():
    image = np.arange(10 * 10 * 3, dtype=np.uint8).reshape(10, 10, 3)
    np.testing.assert_array_equal(transforms.center_crop(image, 4), image[3:7, 3:7])
    with pytest.raises(ValueError, match="Cannot centre-crop"):
        transforms.center_crop(image, 12)


def test_horizontal_flip():
    image = _image(4, 6)
    np.testing.assert_array_equal(
        transforms.random_horizontal_flip(image, np.random.default_rng(0), 1.0), image[:, ::-1])
    np.testing.assert_array_equal(
        transforms.random_horizontal_flip(image, np.random.default_rng(0), 0.0), image)


def test_decode_image_variants():
    rgb = _image(5, 7)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    np.testing.assert_array_equal(transforms.decode_image(buffer.getvalue()), rgb)
    gray = rgb[..., 0]
    np.testing.assert_array_equal(transforms.decode_image(gray), np.stack([gray] * 3, -1))
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 255, np.uint8)], -1)
    np.testing.assert_array_equal(transforms.decode_image(rgba), rgb)
    with pytest.raises(ValueError, match="Expected an image"):
        transforms.decode_image(np.zeros((2, 2, 2, 3)))


def test_train_and_eval_transforms_outputs():
    example = {"image": _image(48, 64), "label": 7}
    train = transforms.ClassificationTrainTransform(scale=(0.3, 1.0))
    a = train(example, (24, 32), np.random.default_rng(5))
    b = train(example, (24, 32), np.random.default_rng(5))
    c = train(example, (24, 32), np.random.default_rng(6))
    assert a["image"].shape == (24, 32, 3) and a["image"].dtype == np.uint8
    assert a["label"].dtype == np.int32 and a["label"] == 7
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])

    out = transforms.ClassificationEvalTransform(size=32, crop_ratio=0.95)(example)
    assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.uint8
    assert out["label"] == 7
    with pytest.raises(ValueError, match="crop_ratio"):
        transforms.ClassificationEvalTransform(size=32, crop_ratio=1.5)
    with pytest.raises(ValueError, match="scale"):
        transforms.ClassificationTrainTransform(scale=(0.5, 0.1))
