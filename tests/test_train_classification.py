"""Device-side pieces of the classification task: mixup/cutmix label mixing, smoothing, loss,
eval statistics with padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evit_jax.tasks import classification as cls

B, H, W, K = 8, 16, 16, 8


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(B, H, W, 3)).astype(np.float32))
    targets = jax.nn.one_hot(jnp.arange(B), K)  # example i has class i: the mix is readable
    return images, targets


@pytest.mark.parametrize("seed", range(6))
def test_mix_targets_match_pixels(seed):
    images, targets = _batch()
    out_x, out_y = cls.mix_batch(images, targets, jax.random.key(seed), mixup_alpha=0.8, cutmix_alpha=0.8)
    out_x, out_y = np.asarray(out_x), np.asarray(out_y)
    np.testing.assert_allclose(out_y.sum(-1), 1.0, rtol=1e-6)
    x = np.asarray(images)
    for i in range(B):
        weights = out_y[i]
        own = weights[i]
        others = [j for j in range(B) if j != i and weights[j] > 0]
        if not others:  # paired with itself or lam == 1
            np.testing.assert_allclose(out_x[i], x[i], rtol=1e-5, atol=1e-5)
            continue
        (j,) = others
        from_self = np.all(np.isclose(out_x[i], x[i]), axis=-1)
        from_other = np.all(np.isclose(out_x[i], x[j]), axis=-1)
        if np.all(from_self | from_other):  # cutmix: the label weight is the pasted area
            assert from_other.mean() == pytest.approx(weights[j], abs=1e-6)
            ys, xs = np.nonzero(from_other)
            if len(ys):  # the pasted region is one rectangle
                assert from_other[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
        else:  # mixup: every pixel is the same blend as the labels
            np.testing.assert_allclose(out_x[i], own * x[i] + weights[j] * x[j], rtol=1e-4, atol=1e-5)


def test_exactly_one_of_mixup_cutmix_with_equal_chance():
    images, targets = _batch()
    kinds = []
    for seed in range(60):
        out_x, out_y = cls.mix_batch(images, targets, jax.random.key(seed), mixup_alpha=1.0, cutmix_alpha=1.0)
        pasted_only = all(
            np.all(np.isclose(np.asarray(out_x)[i], np.asarray(images)[i]) |
                   np.isclose(np.asarray(out_x)[i], np.asarray(images)[np.argmax(np.where(
                       np.arange(B) == i, -1, np.asarray(out_y)[i]))]))
            for i in range(B))
        kinds.append("cutmix" if pasted_only else "mixup")
    assert 15 <= kinds.count("cutmix") <= 45, kinds


def test_mix_disabled_and_single_kind():
    images, targets = _batch()
    x, y = cls.mix_batch(images, targets, jax.random.key(0), mixup_alpha=0.0, cutmix_alpha=0.0)
    assert x is images and y is targets
    for seed in range(5):  # cutmix only: pixels always come from one of two images
        x, y = cls.mix_batch(images, targets, jax.random.key(seed), mixup_alpha=0.0, cutmix_alpha=1.0)
        for i in range(B):
            j = int(np.argmax(np.where(np.arange(B) == i, -1, np.asarray(y)[i])))
            ok = np.isclose(np.asarray(x)[i], np.asarray(images)[i]) | np.isclose(np.asarray(x)[i], np.asarray(images)[j])
            assert ok.all()


def test_label_smoothing_and_losses():
    y = cls.smooth_labels(jnp.array([2]), 4, 0.1)
    np.testing.assert_allclose(y, [[0.025, 0.025, 0.925, 0.025]], rtol=1e-6)
    logits = jnp.array([[1.0, -2.0, 3.0, 0.5]])
    bce = -(y * jax.nn.log_sigmoid(logits) + (1 - y) * jax.nn.log_sigmoid(-logits)).mean()
    assert float(cls.classification_loss(logits, y, bce=True)) == pytest.approx(float(bce), rel=1e-6)
    ce = -(y * jax.nn.log_softmax(logits)).sum(-1).mean()
    assert float(cls.classification_loss(logits, y, bce=False)) == pytest.approx(float(ce), rel=1e-6)


def test_normalize_images_equals_torchvision_on_host_and_in_jit(torch):
    """The same function normalises numpy batches and traced jax batches as torchvision's
    ToTensor + Normalize(ImageNet mean/std) does."""
    import torchvision.transforms.functional as TF

    from evit_jax.data.transforms import normalize_images

    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    reference = TF.normalize(TF.to_tensor(image), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    reference = reference.permute(1, 2, 0).numpy()
    np.testing.assert_allclose(normalize_images(image[None])[0], reference, rtol=1e-5, atol=1e-5)
    traced = jax.jit(normalize_images)(jnp.asarray(image[None]))
    assert traced.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(traced)[0], reference, rtol=1e-5, atol=1e-5)


def test_eval_statistics_respect_mask():
    import ml_collections
    task = cls.ClassificationTask(ml_collections.ConfigDict({}))
    logits = jnp.array([[5.0, 1, 0, 0, 0, 0], [0, 5.0, 1, 0, 0, 0], [5.0, 0, 0, 0, 0, 0]])
    labels = jnp.array([0, 2, 3])
    stats = task.eval_statistics(logits, labels, jnp.array([1, 1, 0]))
    assert int(stats["count"]) == 2
    assert int(stats["top1_correct"]) == 1  # row 0; row 2 is padding
    assert int(stats["top5_correct"]) == 2  # label 2 of row 1 is 2nd
    metrics = task.finalize_eval({k: np.asarray(v) for k, v in stats.items()})
    assert metrics["top1"] == pytest.approx(50.0) and metrics["top5"] == pytest.approx(100.0)
