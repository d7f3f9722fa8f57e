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


def test_horizontal_flip_of_a_pil_image_equals_the_array_flip():
    image = _image(5, 9)
    flipped = transforms.random_horizontal_flip(Image.fromarray(image), np.random.default_rng(0), 1.0)
    np.testing.assert_array_equal(np.asarray(flipped), image[:, ::-1])


def test_train_transform_with_randaugment_and_erasing_is_the_official_order():
    """decode -> RandomResizedCrop -> flip -> RandAugment (uint8) and the erasing box, drawn from
    one Generator in that order (each part is compared with torchvision / timm elsewhere)."""
    from evit_jax.data import random_erasing
    from evit_jax.data.randaugment import RandAugment

    example = {"image": _image(48, 64), "label": 3}
    train = transforms.ClassificationTrainTransform(randaugment=(2, 6), erasing_prob=0.5)
    for seed in range(10):
        out = train(example, (24, 32), np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        image = transforms.random_resized_crop_pil(example["image"], (24, 32), rng)
        image = RandAugment(2, 6)(transforms.random_horizontal_flip(image, rng), rng)
        box = random_erasing.random_erasing_box(24, 32, rng, 0.5)
        assert sorted(out) == ["erase_box", "image", "label"]
        np.testing.assert_array_equal(out["image"], np.asarray(image))
        np.testing.assert_array_equal(out["erase_box"], box)
        assert out["erase_box"].dtype == np.int32 and out["image"].dtype == np.uint8
    assert "erase_box" not in transforms.ClassificationTrainTransform()(example, 16, np.random.default_rng(0))
    for bad in (dict(randaugment=(2,)), dict(randaugment=(2, 11)), dict(erasing_prob=1.5)):
        with pytest.raises(ValueError, match="randaugment|RandAugment|erasing_prob"):
            transforms.ClassificationTrainTransform(**bad)


class _ReplayRandom:
    """timm random_erasing's `random` module fed from a numpy Generator in the order
    random_erasing_box draws: one stream of numbers for both."""

    def __init__(self, rng):
        self.rng = rng

    def random(self):
        return float(self.rng.random())

    def uniform(self, a, b):
        return float(self.rng.uniform(a, b))

    def randint(self, a, b):
        return int(self.rng.integers(a, b + 1))


@pytest.mark.parametrize("height,width", [(24, 32), (7, 9), (40, 6)])
def test_random_erasing_equals_timm_on_the_normalised_image(height, width, monkeypatch, torch):
    """Host box + device erase (`tasks.classification.erase_boxes` after `normalize_images`) vs
    timm's RandomErasing(p) (the official defaults: const mode, one box) on the torchvision-
    normalised tensor, both driven by one stream of random numbers: the erased pixels are the
    same and exactly 0 (the mean colour); the other pixels agree to 1e-5 (torchvision
    normalises (x/255 - mean)/std, the device (x - 255 mean)/(255 std): float32 rounding)."""
    import jax.numpy as jnp
    from timm.data import random_erasing as timm_erasing
    from torchvision.transforms import functional as F

    from evit_jax.data import random_erasing
    from evit_jax.tasks.classification import erase_boxes, normalize_images

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    timm_op = timm_erasing.RandomErasing(0.7, device="cpu")
    images, theirs, boxes = [], [], []
    for seed in range(40):
        images.append(_image(height, width, seed))
        monkeypatch.setattr(timm_erasing, "random", _ReplayRandom(np.random.default_rng(seed)))
        normalised = F.normalize(F.to_tensor(Image.fromarray(images[-1])), mean, std)
        theirs.append(timm_op(normalised).permute(1, 2, 0).numpy())
        boxes.append(random_erasing.random_erasing_box(height, width, np.random.default_rng(seed), 0.7))
    ours = np.asarray(erase_boxes(normalize_images(jnp.asarray(np.stack(images))), jnp.asarray(np.stack(boxes))))
    theirs = np.stack(theirs)
    np.testing.assert_array_equal(ours == 0, theirs == 0)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    erased = 0
    for image, (top, left, h, w) in zip(ours, boxes):
        assert (image[top:top + h, left:left + w] == 0).all() and (image == 0).sum() == h * w * 3
        erased += int(h * w > 0)
    assert erased > 10


def test_random_erasing_box_statistics():
    """Erased with probability p; one box strictly inside the image, area U(0.02, 1/3) of it and
    log-uniform aspect in [0.3, 1/0.3] up to whole-pixel rounding; placed uniformly."""
    from evit_jax.data import random_erasing

    rng = np.random.default_rng(0)
    height, width, n = 224, 224, 20000
    boxes = np.stack([random_erasing.random_erasing_box(height, width, rng, 0.2) for _ in range(n)])
    erased = boxes[boxes[:, 2] * boxes[:, 3] > 0]
    assert abs(len(erased) / n - 0.2) < 4 * math.sqrt(0.16 / n)
    assert not boxes[boxes[:, 2] * boxes[:, 3] == 0].any()      # no box: all zeros
    boxes = np.stack([random_erasing.random_erasing_box(height, width, rng, 1.0) for _ in range(n)])
    top, left, h, w = boxes.T
    assert (h > 0).all() and (h < height).all() and (w < width).all()
    assert (top >= 0).all() and (top + h <= height).all() and (left >= 0).all() and (left + w <= width).all()
    area = h * w / (height * width)
    slack = (h + w + 1) / (2 * height * width)                   # rounding each side by <= 1/2 px
    assert (area >= 0.02 - slack).all() and (area <= 1 / 3 + slack).all()
    assert area.min() < 0.025 and area.max() > 0.3
    aspect = h / w
    assert aspect.min() > 0.3 * 0.9 and aspect.max() < 1 / 0.3 * 1.1
    # Small boxes never hit the image border, so their log-aspect is uniform on [log .3, -log .3].
    small = np.log(aspect[area < 0.08])
    quartiles = np.quantile(small, [0.25, 0.5, 0.75])
    np.testing.assert_allclose(quartiles, [-0.602, 0.0, 0.602], atol=0.05)
    # Uniform placement: the free room is split evenly on average.
    assert abs(np.mean(top / np.maximum(height - h, 1)) - 0.5) < 0.02


def test_the_classification_task_carries_the_boxes_from_the_pipeline_to_the_device(data_dir):
    """config.data.randaugment / erasing_prob reach the train transform; the batch spec has the
    boxes (train only); preprocess_train zeroes exactly the boxes of the normalised images."""
    import jax

    from evit_jax.data.transforms import normalize_images
    from evit_jax.tasks.classification import ClassificationTask
    from evit_jax.tasks.config import base_config

    config = base_config("classification")
    config.data.randaugment = (2, 9)
    config.data.erasing_prob = 1.0
    config.data.name, config.data.data_dir, config.data.image_sizes = "evit_shapes/tiny", data_dir, [32]
    task = ClassificationTask(config)
    batch = next(task.train_iterator(seed=0, local_batch_size=8))
    assert task.train_batch_spec(8, (32, 32))["erase_box"].shape == (8, 4)
    assert "erase_box" not in task.eval_batch_spec(8, (32, 32))
    boxes = batch["erase_box"]
    assert (boxes[:, 2] * boxes[:, 3] > 0).any()
    images, _ = jax.jit(task.preprocess_train)(batch, jax.random.key(0))
    images, expected = np.asarray(images), np.asarray(normalize_images(batch["image"]))
    for image, want, (top, left, h, w) in zip(images, expected, boxes):
        inside = np.zeros(image.shape[:2], bool)
        inside[top:top + h, left:left + w] = True
        assert (image[inside] == 0).all()
        # Outside: the normalised pixels (jit may turn the division into a multiplication: 1 ulp).
        np.testing.assert_allclose(image[~inside], want[~inside], rtol=1e-6, atol=1e-6)
