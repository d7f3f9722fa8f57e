"""Segmentation statistics and mIoU against a plain numpy confusion matrix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evit_jax.tasks import seg_metrics

IGNORE = 255


def _confusion(predictions, labels, num_classes):
    """A straightforward confusion matrix over non-ignored pixels (rows: label)."""
    keep = labels != IGNORE
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels[keep], predictions[keep]), 1)
    return matrix


def _random_batch(rng, num_classes, shape=(3, 17, 23), ignore_fraction=0.2):
    labels = rng.integers(0, num_classes, shape)
    # Predictions right 60% of the time so that IoUs are spread out.
    predictions = np.where(rng.uniform(size=shape) < 0.6, labels, rng.integers(0, num_classes, shape))
    labels = np.where(rng.uniform(size=shape) < ignore_fraction, IGNORE, labels)
    return predictions, labels


def _sum(stats_list):
    return {k: sum(np.asarray(s[k], dtype=np.int64) for s in stats_list) for k in seg_metrics.STAT_KEYS}


@pytest.mark.parametrize("num_classes", [2, 7, 19])
def test_statistics_match_confusion_matrix(num_classes):
    rng = np.random.default_rng(num_classes)
    batches = [_random_batch(rng, num_classes) for _ in range(4)]
    step = jax.jit(seg_metrics.segmentation_statistics, static_argnums=(2,))
    totals = _sum([step(p, l, num_classes) for p, l in batches])
    matrix = sum(_confusion(p, l, num_classes) for p, l in batches)
    tp = np.diag(matrix)
    np.testing.assert_array_equal(totals["intersection"], tp)
    np.testing.assert_array_equal(totals["label_area"], matrix.sum(axis=1))
    np.testing.assert_array_equal(totals["pred_area"], matrix.sum(axis=0))
    np.testing.assert_array_equal(totals["union"], matrix.sum(0) + matrix.sum(1) - tp)
    miou, iou = seg_metrics.miou_from_stats(totals)
    expected = tp / (matrix.sum(0) + matrix.sum(1) - tp)
    np.testing.assert_allclose(iou, expected)
    assert miou == pytest.approx(expected.mean())
    metrics = seg_metrics.segmentation_metrics(totals)
    assert metrics["pixel_accuracy"] == pytest.approx(tp.sum() / matrix.sum())
    assert metrics["mean_accuracy"] == pytest.approx(np.mean(tp / matrix.sum(1)))


def test_padding_examples_count_nothing_and_stats_are_summable():
    rng = np.random.default_rng(0)
    predictions, labels = _random_batch(rng, 5, shape=(6, 8, 9))
    example_mask = np.array([1, 1, 0, 1, 0, 0])
    masked = seg_metrics.segmentation_statistics(predictions, labels, 5, example_mask=example_mask)
    real = example_mask.astype(bool)
    only_real = seg_metrics.segmentation_statistics(predictions[real], labels[real], 5)
    for key in seg_metrics.STAT_KEYS:
        np.testing.assert_array_equal(masked[key], only_real[key])
        assert masked[key].dtype == jnp.int32 and masked[key].shape == (5,)
    # Per-shard statistics (what each device/host computes) add up to the whole batch.
    whole = seg_metrics.segmentation_statistics(predictions, labels, 5)
    shards = _sum([seg_metrics.segmentation_statistics(predictions[i:i + 2], labels[i:i + 2], 5)
                   for i in range(0, 6, 2)])
    for key in seg_metrics.STAT_KEYS:
        np.testing.assert_array_equal(whole[key], shards[key])


def test_absent_classes_are_left_out_of_the_mean():
    labels = np.array([[[0, 0, 1, IGNORE]]])
    predictions = np.array([[[0, 1, 1, 3]]])  # Class 2 nowhere; class 3 only on ignore.
    stats = seg_metrics.segmentation_statistics(predictions, labels, 4)
    miou, iou = seg_metrics.miou_from_stats(stats)
    assert iou[0] == pytest.approx(0.5) and iou[1] == pytest.approx(0.5)
    assert np.isnan(iou[2]) and np.isnan(iou[3])
    assert miou == pytest.approx(0.5)
    # Out-of-range labels count nowhere, out-of-range predictions only as misses.
    stats = seg_metrics.segmentation_statistics(np.array([[[0, 9]]]), np.array([[[7, 1]]]), 4)
    assert np.asarray(stats["label_area"]).tolist() == [0, 1, 0, 0]
    assert np.asarray(stats["pred_area"]).tolist() == [0, 0, 0, 0]
    assert np.asarray(stats["union"]).tolist() == [0, 1, 0, 0]


def test_matches_the_official_histc_formula():
    # Re-derives SegIOU of the official evaluation: histograms of (x + 1) * valid over
    # bins 1..C, ignore pixels mapped to 0 and therefore outside every bin.
    rng = np.random.default_rng(1)
    predictions, labels = _random_batch(rng, 6)
    valid = labels != IGNORE
    out = (predictions + 1) * valid
    tgt = (labels + 1) * valid
    inter = out * (out == tgt)
    hist = lambda x: np.histogram(x, bins=6, range=(1, 6))[0]
    stats = seg_metrics.segmentation_statistics(predictions, labels, 6)
    np.testing.assert_array_equal(stats["intersection"], hist(inter))
    np.testing.assert_array_equal(stats["union"], hist(out) + hist(tgt) - hist(inter))


def test_format_table_names_every_class():
    stats = {"intersection": np.array([5, 0, 0]), "union": np.array([10, 4, 0]),
             "label_area": np.array([8, 2, 0]), "pred_area": np.array([7, 2, 0])}
    table = seg_metrics.format_iou_table(stats, ["road", "sky", "bus"])
    lines = table.splitlines()
    assert lines[1].split() == ["road", "50.00", "62.50", "8"]
    assert lines[2].split() == ["sky", "0.00", "0.00", "2"]
    assert lines[3].split() == ["bus", "n/a", "n/a", "0"]
    assert lines[4].split() == ["mean", "25.00", "31.25", "10"]
    with pytest.raises(ValueError):
        seg_metrics.format_iou_table(stats, ["road"])
    with pytest.raises(ValueError, match="differ in shape"):
        seg_metrics.segmentation_statistics(np.zeros((1, 2, 2)), np.zeros((1, 2, 3)), 3)
