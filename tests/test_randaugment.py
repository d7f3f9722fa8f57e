"""RandAugment: every op and the whole transform pixel-identical to timm's; the sampling distribution."""

import math
import types

import numpy as np
import pytest
from PIL import Image

from evit_jax.data import randaugment
from evit_jax.data.randaugment import INCREASING_OPS, SIGNED_OPS, RandAugment

auto_augment = pytest.importorskip("timm.data.auto_augment")

# What the official RandAug passes to timm (efficientvit/apps/data_provider/augment/color_aug.py).
OFFICIAL_HPARAMS = dict(translate_pct=0.45, img_mean=(124, 116, 104), interpolation=Image.BICUBIC)
MAGNITUDES = (0.0, 0.7, 2.5, 3.0, 5.0, 6.4, 7.77, 9.0, 10.0)


def _natural_image(height=37, width=53, seed=0):
    """Smooth colour gradients + texture + a saturated patch: every op changes something."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([90 + 120 * x, 60 + 100 * y, 140 - 80 * x * y], -1)
    image = base + rng.normal(0, 18, (height, width, 3))
    image[height // 4:height // 2, width // 5:width // 3] = (250, 20, 5)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def _posterize_any_bits(img, bits_to_keep, **_):
    """timm's posterize as it ran with the Pillow of the official training: Pillow 13 (installed
    here) raises for 0 bits (PosterizeIncreasing at magnitude 10); earlier Pillow applied the
    same table, mask ~(2**8 - 1) = all bits cleared, i.e. a black image."""
    if bits_to_keep == 0:
        return Image.new(img.mode, img.size, 0)
    return auto_augment.posterize(img, bits_to_keep)


@pytest.fixture(autouse=True)
def _timm_posterize_for_zero_bits(monkeypatch):
    monkeypatch.setitem(auto_augment.NAME_TO_OP, "PosterizeIncreasing", _posterize_any_bits)


def _fixed_sign(monkeypatch, negate):
    # timm negates when random.random() > 0.5 (`_randomly_negate`).
    monkeypatch.setattr(auto_augment.random, "random", lambda: 0.9 if negate else 0.1)


def test_the_op_list_is_timms_increasing_list():
    assert INCREASING_OPS == tuple(auto_augment._RAND_INCREASING_TRANSFORMS)
    assert randaugment.IMAGENET_MEAN_UINT8 == tuple(min(255, round(255 * m)) for m in (0.485, 0.456, 0.406))


@pytest.mark.parametrize("name", INCREASING_OPS)
def test_op_argument_is_timms_level_to_arg(name, monkeypatch):
    for negate in (False, True):
        _fixed_sign(monkeypatch, negate)
        for magnitude in list(MAGNITUDES) + list(np.random.default_rng(1).uniform(0, 10, 50)):
            theirs = auto_augment.LEVEL_TO_ARG[name]
            want = theirs(magnitude, OFFICIAL_HPARAMS)[0] if theirs is not None else None
            assert randaugment.op_argument(name, magnitude, negate, 0.45) == want, (name, magnitude, negate)


@pytest.mark.parametrize("name", INCREASING_OPS)
def test_every_op_is_pixel_identical_to_timm_augment_op(name, monkeypatch):
    """Same image, same magnitude and sign: the same pixels (no tolerance)."""
    image = _natural_image()
    changed = 0
    for negate in ((False, True) if name in SIGNED_OPS else (False,)):
        _fixed_sign(monkeypatch, negate)
        for magnitude in MAGNITUDES:
            # prob 1 and no magnitude noise: timm's only random draw left is the sign.
            op = auto_augment.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=OFFICIAL_HPARAMS)
            want = np.asarray(op(image.copy()))
            have = np.asarray(randaugment.apply_op(image.copy(), name, magnitude, negate))
            np.testing.assert_array_equal(have, want, err_msg=f"{name} m={magnitude} negate={negate}")
            changed += int(not np.array_equal(have, np.asarray(image)))
    assert changed > 0, f"{name} never changed the test image: the comparison would prove nothing"


class _Replay:
    """timm's random sources (python `random`, `np.random.choice`) fed from a numpy Generator
    the way RandAugment.sample draws: both see one stream of numbers."""

    def __init__(self, rng):
        self.rng = rng
        self.random_module = types.SimpleNamespace(
            random=lambda: float(rng.random()), gauss=lambda mu, sigma: float(rng.normal(mu, sigma)),
            uniform=lambda a, b: float(rng.uniform(a, b)))
        self.np_module = types.SimpleNamespace(random=types.SimpleNamespace(choice=self.choice))

    def choice(self, ops, size, replace=True, p=None):
        assert replace and p is None
        return [ops[int(i)] for i in self.rng.integers(0, len(ops), size=size)]


@pytest.mark.parametrize("num_ops,magnitude", [(1, 3), (2, 6), (2, 5), (3, 9)])
def test_randaugment_replays_timms_rand_augment_transform(num_ops, magnitude, monkeypatch):
    """timm's full `rand-n{n}-m{m}-mstd1.0-inc1` transform (official hparams) and ours, given the
    same stream of random numbers, produce the same images (pixel-identical) over 60 draws."""
    timm_transform = auto_augment.rand_augment_transform(
        f"rand-n{num_ops}-m{magnitude}-mstd1.0-inc1", dict(OFFICIAL_HPARAMS))
    ours = RandAugment(num_ops, magnitude)
    assert ours.timm_config == f"rand-n{num_ops}-m{magnitude}-mstd1.0-inc1"
    image = _natural_image(29, 41, seed=3)
    applied = 0
    for seed in range(60):
        replay = _Replay(np.random.default_rng(seed))
        monkeypatch.setattr(auto_augment, "random", replay.random_module)
        monkeypatch.setattr(auto_augment, "np", replay.np_module)
        want = np.asarray(timm_transform(image.copy()))
        rng = np.random.default_rng(seed)
        calls = ours.sample(np.random.default_rng(seed))
        have = np.asarray(ours(image.copy(), rng))
        np.testing.assert_array_equal(have, want, err_msg=f"seed {seed}: {calls}")
        applied += len(calls)
    assert applied > 10


def test_sampling_distribution_matches_the_spec():
    """Op choice uniform over the 15 ops with replacement, applied with p 0.5, magnitude
    Normal(m, 1) clipped to [0, 10], sign 1/2 - checked on 40,000 draws (fixed seed; the bounds
    are > 4 standard errors, so a correct sampler passes with any seed)."""
    rng = np.random.default_rng(123)
    images = 20000
    for m in (5, 9):
        augment = RandAugment(2, m)
        calls = [c for _ in range(images) for c in augment.sample(rng)]
        drawn = 2 * images
        assert abs(len(calls) / drawn - 0.5) < 4 * math.sqrt(0.25 / drawn)
        counts = np.array([sum(c.name == op for c in calls) for op in INCREASING_OPS])
        expected = len(calls) / len(INCREASING_OPS)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 45.0, (chi2, counts)   # 14 dof: P(chi2 > 45) ~ 4e-5
        magnitudes = np.array([c.magnitude for c in calls])
        assert magnitudes.min() >= 0 and magnitudes.max() <= 10
        # The clipped normal's CDF; Kolmogorov-Smirnov distance below 1.63/sqrt(n) (alpha 1e-2).
        normal_cdf = lambda x: 0.5 * (1 + math.erf((x - m) / math.sqrt(2)))  # noqa: E731
        values = np.sort(magnitudes)
        below = values < 10
        empirical = np.arange(1, len(values) + 1) / len(values)
        theoretical = np.array([normal_cdf(v) for v in values[below]])
        ks = np.abs(empirical[below] - theoretical).max()
        assert ks < 1.63 / math.sqrt(len(values)), ks
        at_max = float(np.mean(magnitudes == 10))
        assert abs(at_max - (1 - normal_cdf(10))) < 4 * math.sqrt(0.16 / len(values)) + 1e-3, at_max
        signed = [c.negate for c in calls if c.name in SIGNED_OPS]
        assert abs(np.mean(signed) - 0.5) < 4 * math.sqrt(0.25 / len(signed))
        assert not any(c.negate for c in calls if c.name not in SIGNED_OPS)


def test_randaugment_is_deterministic_per_generator_and_validates():
    image = _natural_image()
    augment = RandAugment(2, 9)
    outputs = [np.asarray(augment(image, np.random.default_rng(seed))) for seed in (7, 7, 8)]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert RandAugment(0, 5).sample(np.random.default_rng(0)) == []
    assert all(not c for c in (RandAugment(3, 5, probability=0.0).sample(np.random.default_rng(s))
                               for s in range(20)))
    for bad in (dict(num_ops=-1, magnitude=5), dict(num_ops=1, magnitude=11),
                dict(num_ops=1, magnitude=5, probability=2), dict(num_ops=1, magnitude=5, resample="cubic")):
        with pytest.raises(ValueError, match="RandAugment"):
            RandAugment(**bad)
    with pytest.raises(ValueError, match="Unknown RandAugment op"):
        randaugment.apply_op(image, "Cutout", 5)
