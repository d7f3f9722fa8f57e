"""Semantic-segmentation metrics as summable per-class statistics (pure jax / numpy).

:func:`segmentation_statistics` runs inside jit on a batch and returns per-class pixel
counts (int32, shape (num_classes,)) that are simply SUMMED over batches, devices and
hosts; :func:`miou_from_stats` turns the totals into the mIoU of the official EfficientViT
evaluation (``SegIOU`` in ``applications/efficientvit_seg/eval_efficientvit_seg_model.py``):
intersections and unions accumulated per class over the whole dataset (``torch.histc``),
then ``mean(sum I / sum U)``.

Class with zero union (absent from both labels and predictions of the whole set): the
official code divides 0 by 0 and its mean becomes NaN; here such classes are left out of
the mean (reported as NaN in the per-class table), as mmsegmentation does.
Labels equal to ``ignore_index`` or outside [0, num_classes), and every pixel of a padding
example (``example_mask == 0``), count nowhere.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

STAT_KEYS = ("intersection", "union", "label_area", "pred_area")


def segmentation_statistics(predictions, labels, num_classes: int, ignore_index: int = 255,
                            example_mask=None) -> dict[str, jnp.ndarray]:
    """Per-class pixel counts of one batch, to be summed over batches/devices/hosts.

    Args:
      predictions: (B, H, W) integer class ids (argmax of logits at label resolution).
      labels: (B, H, W) integer labels, ``ignore_index`` for void.
      num_classes: number of classes C.
      ignore_index: label value that counts nowhere.
      example_mask: optional (B,) array, 0 for padding examples (they count nowhere).

    Returns:
      ``{"intersection", "union", "label_area", "pred_area"}``, each int32 (C,):
      pixels where prediction == label == c; |pred == c OR label == c|; |label == c|;
      |pred == c| (all over valid pixels only).
    """
    predictions = jnp.asarray(predictions).astype(jnp.int32)
    labels = jnp.asarray(labels).astype(jnp.int32)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ in shape.")
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    if example_mask is not None:
        example_mask = jnp.asarray(example_mask).reshape((-1,) + (1,) * (labels.ndim - 1))
        valid = valid & (example_mask > 0)
    # Invalid pixels go to an extra bin C that is dropped: no (B, H, W, C) one-hot needed.
    overflow = jnp.int32(num_classes)

    def histogram(values, keep):
        ids = jnp.where(keep, values, overflow).reshape(-1)
        return jnp.bincount(ids, length=num_classes + 1)[:num_classes].astype(jnp.int32)

    label_area = histogram(labels, valid)
    pred_area = histogram(predictions, valid & (predictions >= 0) & (predictions < num_classes))
    intersection = histogram(labels, valid & (predictions == labels))
    return {
        "intersection": intersection,
        "union": label_area + pred_area - intersection,
        "label_area": label_area,
        "pred_area": pred_area,
    }


def per_class_iou(stats: Mapping[str, np.ndarray]) -> np.ndarray:
    """(C,) float64 IoU per class; NaN where the union is 0."""
    intersection = np.asarray(stats["intersection"], dtype=np.float64)
    union = np.asarray(stats["union"], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / union, np.nan)


def miou_from_stats(stats: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray]:
    """(mIoU, per-class IoU) from statistics summed over a whole evaluation.

    mIoU = mean over classes with a non-zero union of sum(I) / sum(U); NaN if no class
    has any pixel.
    """
    iou = per_class_iou(stats)
    present = ~np.isnan(iou)
    miou = float(iou[present].mean()) if present.any() else float("nan")
    return miou, iou


def segmentation_metrics(stats: Mapping[str, np.ndarray]) -> dict[str, float]:
    """mIoU, pixel accuracy and mean per-class accuracy from summed statistics."""
    miou, _ = miou_from_stats(stats)
    label_area = np.asarray(stats["label_area"], dtype=np.float64)
    intersection = np.asarray(stats["intersection"], dtype=np.float64)
    total = label_area.sum()
    present = label_area > 0
    return {
        "miou": miou,
        "pixel_accuracy": float(intersection.sum() / total) if total > 0 else float("nan"),
        "mean_accuracy": float((intersection[present] / label_area[present]).mean())
        if present.any() else float("nan"),
    }


def format_iou_table(stats: Mapping[str, np.ndarray], class_names: Sequence[str] | None = None,
                     digits: int = 2) -> str:
    """A plain-text table: class, IoU (%), accuracy (%) and label pixels, then the mean."""
    iou = per_class_iou(stats)
    label_area = np.asarray(stats["label_area"], dtype=np.float64)
    intersection = np.asarray(stats["intersection"], dtype=np.float64)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    if len(names) != len(iou):
        raise ValueError(f"{len(names)} class names for {len(iou)} classes.")
    width = max([len("class"), len("mean")] + [len(n) for n in names])

    def pct(x):
        return "n/a" if np.isnan(x) else f"{100 * x:.{digits}f}"

    lines = [f"{'class':<{width}}  {'IoU':>7}  {'Acc':>7}  {'pixels':>12}"]
    for name, value, correct, area in zip(names, iou, intersection, label_area):
        accuracy = correct / area if area > 0 else np.nan
        lines.append(f"{name:<{width}}  {pct(value):>7}  {pct(accuracy):>7}  {int(area):>12d}")
    metrics = segmentation_metrics(stats)
    lines.append(f"{'mean':<{width}}  {pct(metrics['miou']):>7}  {pct(metrics['mean_accuracy']):>7}"
                 f"  {int(label_area.sum()):>12d}")
    return "\n".join(lines)
