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


def _numpy_mix(images, targets, draws):
    """The mixing of one step written plainly in numpy from the step's random choices."""
    x, y = np.asarray(images, np.float64), np.asarray(targets, np.float64)
    partner, lam = np.asarray(draws["partner"]), float(draws["lam"])
    out_x, out_y = np.empty_like(x), np.empty_like(y)
    h, w = x.shape[1:3]
    for i, j in enumerate(partner):
        if bool(draws["use_cutmix"]):
            y1, y2, x1, x2 = (int(v) for v in np.asarray(draws["box"])[i])
            out_x[i] = x[i]
            out_x[i, y1:y2, x1:x2] = x[j, y1:y2, x1:x2]
            lam_i = 1.0 - (x2 - x1) * (y2 - y1) / (h * w)
            out_y[i] = lam_i * y[i] + (1 - lam_i) * y[j]
        else:
            out_x[i] = lam * x[i] + (1 - lam) * x[j]
            out_y[i] = lam * y[i] + (1 - lam) * y[j]
    return out_x, out_y


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_partners_are_a_permutation_within_each_shard(shards):
    block = B // shards
    seen_other_block_position = False
    for seed in range(10):
        d = cls.mix_draws(jax.random.key(seed), B, H, W, mixup_alpha=0.5, cutmix_alpha=0.5, shards=shards)
        partner = np.asarray(d["partner"])
        for s in range(shards):
            assert sorted(partner[s * block:(s + 1) * block]) == list(range(s * block, (s + 1) * block))
        seen_other_block_position |= bool(np.any(partner != np.arange(B)))
    assert seen_other_block_position


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shards", [1, 4])
def test_mix_equals_numpy_reference(seed, shards):
    """mix_batch == the plain numpy mixing with the same random choices (float32 vs float64: 1e-5)."""
    images, targets = _batch(seed)
    key = jax.random.key(seed)
    draws = cls.mix_draws(key, B, H, W, mixup_alpha=0.8, cutmix_alpha=0.8, shards=shards)
    out_x, out_y = cls.mix_batch(images, targets, key, mixup_alpha=0.8, cutmix_alpha=0.8, shards=shards)
    ref_x, ref_y = _numpy_mix(images, targets, draws)
    np.testing.assert_allclose(np.asarray(out_x), ref_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out_y), ref_y, rtol=1e-5, atol=1e-6)


_SHARDED_MIX = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from evit_jax.tasks import classification as cls
from evit_jax.train import hlo_stats
from tests.test_train_classification import _numpy_mix

mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp"))
sharded = NamedSharding(mesh, P(("data", "fsdp")))
b, h, w, k = 16, 8, 8, 10
fn = jax.jit(lambda x, y, key: cls.mix_batch(x, y, jax.random.wrap_key_data(key), mixup_alpha=0.8,
                                              cutmix_alpha=0.8, shards=4),
             in_shardings=(sharded, sharded, None), out_shardings=(sharded, sharded))
rng = np.random.default_rng(0)
x = rng.normal(size=(b, h, w, 3)).astype(np.float32)
y = np.asarray(jax.nn.one_hot(np.arange(b) % k, k))
xs, ys = jax.device_put(x, sharded), jax.device_put(y, sharded)
compiled = fn.lower(xs, ys, jax.random.key_data(jax.random.key(0))).compile()
for seed in range(6):
    key = jax.random.key_data(jax.random.key(seed))
    out_x, out_y = compiled(xs, ys, key)
    draws = cls.mix_draws(jax.random.wrap_key_data(key), b, h, w, mixup_alpha=0.8, cutmix_alpha=0.8, shards=4)
    ref_x, ref_y = _numpy_mix(x, y, draws)
    np.testing.assert_allclose(np.asarray(out_x), ref_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out_y), ref_y, rtol=1e-5, atol=1e-6)
print(json.dumps(hlo_stats.summarize(hlo_stats.collectives(compiled.as_text()))))
"""


def test_sharded_mix_gathers_nothing_across_devices():
    """On 4 CPU devices the compiled mixing has no collective at all (the partners are on the same
    device) and equals the numpy reference of per-shard pairing."""
    import json
    import subprocess
    import sys

    from tests import _train_helpers as h

    result = subprocess.run([sys.executable, "-c", _SHARDED_MIX], env=h.env_for(4), cwd=h.REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(v["count"] == 0 for v in found.values()), found


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
