"""COCO box evaluation with the official ``pycocotools`` (host side).

    gt = coco_ground_truth(coco.read_annotations(name, "validation", data_dir),
                           info.category_ids, info.class_names)           # once per run
    metrics, table = coco_evaluate(gt, detections)                       # after each evaluation

``detections`` are the whole split's (:class:`Detections`: image id, box x1, y1, x2, y2 in
ORIGINAL image pixels, score, contiguous class); :func:`detections_from_batch` turns a padded
eval batch of per-image detections in letterboxed input pixels into them. The metrics are
COCOeval's summary (maxDets 100): ``AP`` (IoU 0.50:0.95), ``AP50``, ``AP75``, ``APs``, ``APm``,
``APl`` as floats in [0, 1]; a size range without any ground truth is NaN (COCOeval prints -1).
The table lists AP and AP50 per class. Class k is reported as category ``category_ids[k]``,
so the official ground truth (crowds, the JSON's areas, unclipped boxes) is evaluated exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from typing import Any, Mapping, Sequence

import numpy as np

from evit_jax.data import det_transforms

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_ground_truth(annotations, category_ids: Sequence[int],
                      class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """A COCO-format ground-truth dict from a split's records.

    ``annotations`` is an ``evit_jax.data.coco.SplitAnnotations`` (image ids, (height, width),
    per-image objects with xyxy ``bbox``, contiguous ``label``, ``is_crowd``, ``area``);
    labels map back to ``category_ids``. Annotation ids count from 1 (COCOeval treats id 0 as
    "unmatched").
    """
    category_ids = [int(c) for c in category_ids]
    names = list(class_names) if class_names is not None else [str(c) for c in category_ids]
    images, anns = [], []
    for image_id, (height, width), objects in zip(annotations.image_ids, annotations.sizes,
                                                  annotations.objects):
        images.append({"id": int(image_id), "height": int(height), "width": int(width)})
        boxes = np.asarray(objects["bbox"], np.float64).reshape(-1, 4)
        for box, label, crowd, area in zip(boxes, objects["label"], objects["is_crowd"], objects["area"]):
            if not 0 <= int(label) < len(category_ids):
                raise ValueError(f"Image {int(image_id)} has label {int(label)} but the dataset has "
                                 f"{len(category_ids)} classes.")
            x1, y1, x2, y2 = (float(v) for v in box)
            anns.append({"id": len(anns) + 1, "image_id": int(image_id),
                         "category_id": category_ids[int(label)], "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "area": float(area), "iscrowd": int(bool(crowd))})
    return {"images": images, "annotations": anns,
            "categories": [{"id": c, "name": n} for c, n in zip(category_ids, names)]}


@dataclasses.dataclass(frozen=True)
class Detections:
    """Detections of a split, flat: (N,) image ids, (N, 4) xyxy original pixels, (N,) scores,
    (N,) contiguous classes."""

    image_ids: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))

    @classmethod
    def concatenate(cls, parts: Sequence["Detections"]) -> "Detections":
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts])
                     for f in dataclasses.fields(cls)))


def detections_from_batch(batch: Mapping[str, np.ndarray], boxes: np.ndarray, scores: np.ndarray,
                          classes: np.ndarray, valid: np.ndarray) -> Detections:
    """Flat detections in original pixels from one padded eval batch.

    ``batch`` carries ``image_id`` (B,), ``scale`` (B,), ``orig_hw`` (B, 2) and ``mask`` (B,)
    (1 real, 0 padding) as the eval transform and iterator produce them; ``boxes`` (B, K, 4)
    are in letterboxed input pixels, ``scores`` / ``classes`` / ``valid`` (B, K) (valid: a
    kept detection). Boxes are divided by the image's scale and clipped to the image.
    """
    keep = np.asarray(valid, bool) & (np.asarray(batch["mask"]) > 0)[:, None]
    rows, cols = np.nonzero(keep)
    originals = det_transforms.unletterbox_boxes(np.asarray(boxes)[rows, cols], np.asarray(batch["scale"])[rows],
                                                 np.asarray(batch["orig_hw"])[rows])
    return Detections(np.asarray(batch["image_id"], np.int64)[rows], originals,
                      np.asarray(scores, np.float64)[rows, cols], np.asarray(classes, np.int64)[rows, cols])


def _coco(dataset: dict[str, Any]):
    from pycocotools.coco import COCO

    api = COCO()
    api.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def _detection_dataset(ground_truth: dict[str, Any], detections: Detections) -> dict[str, Any]:
    """The detections as COCO's ``loadRes`` builds them (area = w * h, iscrowd 0, ids from 1);
    also for an empty list, which ``loadRes`` rejects."""
    category_ids = [c["id"] for c in ground_truth["categories"]]
    known = {image["id"] for image in ground_truth["images"]}
    unknown = sorted(set(int(i) for i in detections.image_ids) - known)
    if unknown:
        raise ValueError(f"Detections for image ids {unknown[:5]} that the ground truth does not have.")
    if len(detections.classes) and not 0 <= int(detections.classes.min()) <= int(detections.classes.max()) < len(category_ids):
        raise ValueError(f"Detection classes must be in [0, {len(category_ids)}).")
    anns = []
    for k, (image_id, box, score, label) in enumerate(zip(detections.image_ids, detections.boxes,
                                                          detections.scores, detections.classes)):
        x1, y1, x2, y2 = (float(v) for v in box)
        w, h = x2 - x1, y2 - y1
        anns.append({"id": k + 1, "image_id": int(image_id), "category_id": category_ids[int(label)],
                     "bbox": [x1, y1, w, h], "area": w * h, "score": float(score), "iscrowd": 0})
    return {"images": ground_truth["images"], "categories": ground_truth["categories"], "annotations": anns}


def coco_evaluate(ground_truth: dict[str, Any], detections: Detections) -> tuple[dict[str, float], str]:
    """(metrics, per-class table) of COCOeval("bbox") on ``detections`` against ``ground_truth``
    (:func:`coco_ground_truth`); see the module docstring for the keys."""
    from pycocotools.cocoeval import COCOeval

    gt = _coco(ground_truth)
    dt = _coco(_detection_dataset(ground_truth, detections))
    evaluator = COCOeval(gt, dt, "bbox")
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {name: (float(v) if v >= 0 else float("nan"))
               for name, v in zip(METRIC_NAMES, evaluator.stats[:len(METRIC_NAMES)])}
    return metrics, per_class_table(evaluator, ground_truth)


def per_class_ap(evaluator) -> tuple[np.ndarray, np.ndarray]:
    """(AP, AP50) per category of an accumulated COCOeval, in ``params.catIds`` order (area
    all, maxDets 100); NaN for a category without ground truth."""
    precision = evaluator.eval["precision"][:, :, :, 0, -1]      # (iou, recall, category)

    def mean(p):
        valid = p > -1
        return np.where(valid.any(axis=(0, 1)), np.where(valid, p, 0).sum(axis=(0, 1)) /
                        np.maximum(valid.sum(axis=(0, 1)), 1), np.nan)

    return mean(precision), mean(precision[:1])


def per_class_table(evaluator, ground_truth: dict[str, Any]) -> str:
    """A text table: one row per class with its category id, number of ground-truth boxes
    (crowds excluded), AP and AP50 (percent)."""
    ap, ap50 = per_class_ap(evaluator)
    cat_ids = list(evaluator.params.catIds)
    counts: dict[int, int] = {}
    for ann in ground_truth["annotations"]:
        if not ann["iscrowd"]:
            counts[ann["category_id"]] = counts.get(ann["category_id"], 0) + 1
    names = [c["name"] for c in ground_truth["categories"]]
    width = max([len("class")] + [len(n) for n in names])
    lines = [f"{'class':<{width}}  {'id':>5}  {'boxes':>6}  {'AP':>6}  {'AP50':>6}"]
    for category in ground_truth["categories"]:
        k = cat_ids.index(category["id"])
        fmt = lambda v: "   n/a" if np.isnan(v) else f"{100 * v:6.2f}"  # noqa: E731
        lines.append(f"{category['name']:<{width}}  {category['id']:>5}  {counts.get(category['id'], 0):>6}  "
                     f"{fmt(ap[k])}  {fmt(ap50[k])}")
    return "\n".join(lines)
