"""Object detection (EfficientViT-Det: YOLOX's neck, head, loss and recipe; COCO, COCO-format
datasets, the built-in ``evit_det_shapes`` demo).

Host side (grain, numpy; ``evit_jax.data.det_transforms``):
  train: YOLOX's augmentation (:class:`~evit_jax.data.det_transforms.DetectionTrainTransform`:
  mosaic + random affine, mixup, or the letterbox with optional scale jitter; HSV jitter, flip)
  at a per-batch size drawn from ``data.image_sizes`` (YOLOX's multi-scale training: the same
  size on every process, a function of (seed, step)). Mosaic and mixup stop for the last
  ``data.no_aug_epochs`` epochs (``pipeline.SwitchAtStep`` from the step of
  :meth:`DetectionTask.no_aug_start_step`). Batches: ``image`` uint8, ``boxes`` float32
  (M, 4) x1, y1, x2, y2 in pixels of the batch's images, ``classes`` int32 (M,),
  ``box_mask`` int32 (M,), M = ``data.max_boxes``.
  eval: YOLOX's letterbox to ``data.eval_image_size`` (``DetectionEvalTransform``); batches
  carry ``image_id``, ``scale`` and ``orig_hw`` to map the detections back.

Device side:
  train loss: :func:`evit_jax.tasks.det_loss.yolox_loss` (SimOTA, ``loss.assigner``) on the
  normalised images, its L1 box term switched on from the same step as the host's
  no-augmentation phase (the loop passes the step, :meth:`Task.train_loss_and_metrics`), as
  YOLOX does for its last 15 epochs. Every term is normalised by the global foreground count.
  eval: :func:`evit_jax.tasks.det_postprocess.postprocess` (score threshold, class-aware NMS,
  top detections; ``postprocess.*``) inside the eval step; the detections, image id, scale and
  original size of every example are the eval records (:meth:`DetectionTask.eval_records`).

Evaluation: the loop gathers the records of the whole split on every process, in the split's
order; :meth:`DetectionTask.finalize_eval` maps the boxes back to original pixels and runs
pycocotools' COCOeval (``evit_jax.tasks.det_metrics``) against the split's ground truth (crowds
and the JSON's areas included), logs the per-class AP table and returns AP, AP50, AP75, APs,
APm, APl (fractions in [0, 1]; NaN for a size range without ground truth). Every process
computes the same result.

Image ids: the datasets store int64 ids; jax runs without 64-bit integers, so the eval batches
carry them as int32. Ids that fit (COCO's, every labelling tool's) travel exactly; larger ones
arrive as their low 32 bits. :meth:`DetectionTask.finalize_eval` takes the full ids from the
ground truth, by position (the records follow the split's order), and checks that the carried
ids equal their low 32 bits, so any id works and a misaligned record is an error, not a wrong AP.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from evit_jax.data import coco, det_transforms, pipeline, sources
from evit_jax.data.transforms import normalize_images
from evit_jax.models.det import detection_grid
from evit_jax.tasks import det_loss, det_metrics, det_postprocess
from evit_jax.tasks.base import BackboneInitMixin, DatasetTask
from evit_jax.tasks.config import schedule_lengths

ASSIGNERS = {"yolox_0.3.0": det_loss.YOLOX_0_3_0, "yolox_2023": det_loss.YOLOX_2023}
_STRIDE = 32  # the detector's coarsest stride: input sides must be multiples of it


def _hw(value) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    h, w = value
    return int(h), int(w)


def no_aug_steps(no_aug_epochs: float, train_examples: int, global_batch_size: int) -> int:
    """Steps of the last ``no_aug_epochs`` epochs (rounded to whole steps; 0 when off)."""
    return max(int(round(float(no_aug_epochs) * train_examples / global_batch_size)), 0)


def combined_loss(metrics: Mapping[str, jax.Array], l1_weight: jax.Array) -> jax.Array:
    """YOLOX's total from :func:`det_loss.yolox_loss`'s terms with the L1 term weighted by ``l1_weight``
    (0 or 1): the same sum, in the same order, as ``yolox_loss(use_l1=l1_weight == 1)``."""
    return metrics["iou_loss"] + metrics["obj_loss"] + metrics["cls_loss"] + l1_weight * metrics["l1_loss"]


class DetectionTask(BackboneInitMixin, DatasetTask):
    """See the module docstring. Config keys: ``model``, ``data`` (``image_sizes`` = training sizes,
    ``max_boxes``, the augmentation's probabilities and ranges, ``no_aug_epochs``, ``eval_image_size``),
    ``loss.assigner``, ``postprocess.*``."""

    name = "detection"

    # ------------------------------------------------------------------ host side
    @property
    def postprocess_config(self) -> det_postprocess.PostprocessConfig:
        p = self.config.postprocess
        return det_postprocess.PostprocessConfig(
            score_threshold=float(p.score_threshold), iou_threshold=float(p.iou_threshold),
            pre_nms_top_k=int(p.pre_nms_top_k), max_detections=int(p.max_detections))

    @property
    def class_names(self) -> list[str]:
        return self.dataset_class_names()

    def check_config(self) -> None:
        super().check_config()
        c, d = self.config, self.config.data
        for size in self.train_resolutions() + [_hw(d.eval_image_size)]:
            if size[0] <= 0 or size[1] <= 0 or size[0] % _STRIDE or size[1] % _STRIDE:
                raise ValueError(f"image size {size} is not a positive multiple of {_STRIDE} (the detector's "
                                 "coarsest stride); fix data.image_sizes / data.eval_image_size.")
        if int(d.max_boxes) < 1:
            raise ValueError(f"config.data.max_boxes={d.max_boxes} must be >= 1 (ground-truth boxes kept per "
                             "training image; YOLOX uses 120 on COCO).")
        for key in ("mosaic_prob", "mixup_prob", "hsv_prob"):
            if not 0.0 <= float(d[key]) <= 1.0:
                raise ValueError(f"config.data.{key}={d[key]} must lie in [0, 1].")
        for key in ("mosaic_scale", "mixup_scale", "scale_range"):
            lo, hi = (float(v) for v in d[key])
            if not 0 < lo <= hi:
                raise ValueError(f"config.data.{key}={tuple(d[key])} must satisfy 0 < min <= max.")
        if float(d.no_aug_epochs) < 0:
            raise ValueError(f"config.data.no_aug_epochs={d.no_aug_epochs} must be >= 0 (0: never).")
        if c.loss.assigner not in ASSIGNERS:
            raise ValueError(f"config.loss.assigner={c.loss.assigner!r}; use one of {sorted(ASSIGNERS)}.")
        if not 0.0 <= float(c.postprocess.score_threshold) <= 1.0:
            raise ValueError(f"config.postprocess.score_threshold={c.postprocess.score_threshold} must lie in [0, 1].")
        try:
            self.postprocess_config
        except ValueError as e:
            raise ValueError(f"config.postprocess: {e}.") from None

    def check_data(self) -> None:
        super().check_data()
        self.check_num_classes()

    def train_resolutions(self):
        return [_hw(s) for s in self.config.data.image_sizes]

    def eval_batch_keys(self):
        return [_hw(self.config.data.eval_image_size)]

    @functools.cached_property
    def _no_aug_start(self) -> int:
        c = self.config
        train_examples = self.num_train_examples()
        total, _ = schedule_lengths(c, train_examples)
        return max(total - no_aug_steps(c.data.no_aug_epochs, train_examples, c.global_batch_size), 0)

    def no_aug_start_step(self) -> int:
        """The first step of the last ``data.no_aug_epochs`` epochs of the run (the run's length as the
        loop schedules it): from it on, no mosaic/mixup on the host and the L1 term on the device.
        Equals the run's total steps (never reached) when no_aug_epochs is 0."""
        return self._no_aug_start

    def train_transform(self) -> det_transforms.DetectionTrainTransform:
        """The augmentation of the first part of the run (mosaic and mixup as configured)."""
        d = self.config.data
        mixing = float(d.mosaic_prob) > 0 or float(d.mixup_prob) > 0
        source = sources.get_source(d.name, d.train_split, self.data_dir) if mixing else None
        return det_transforms.DetectionTrainTransform(
            max_boxes=int(d.max_boxes), source=source, mosaic_prob=float(d.mosaic_prob),
            mixup_prob=float(d.mixup_prob), hsv_prob=float(d.hsv_prob), flip_prob=0.5 if d.hflip else 0.0,
            degrees=float(d.degrees), translate=float(d.translate), shear=float(d.shear),
            mosaic_scale=tuple(float(v) for v in d.mosaic_scale), mixup_scale=tuple(float(v) for v in d.mixup_scale),
            scale_range=tuple(float(v) for v in d.scale_range),
            image_key=self.info.image_key, label_key=self.info.label_key)

    def scheduled_train_transform(self):
        """The train pipeline's transform: :meth:`train_transform`, switched to its ``without_mosaic()``
        from :meth:`no_aug_start_step` on (``pipeline.SwitchAtStep``) when it mixes images."""
        transform = self.train_transform()
        if transform.mosaic_prob > 0 or transform.mixup_prob > 0:
            return pipeline.SwitchAtStep(transform, transform.without_mosaic(), self.no_aug_start_step())
        return transform

    def train_iterator(self, seed: int, local_batch_size: int):
        d = self.config.data
        source = sources.get_source(d.name, d.train_split, self.data_dir)
        return pipeline.make_train_iterator(
            source, self.scheduled_train_transform(), global_batch_size=local_batch_size * jax.process_count(),
            image_sizes=self.train_resolutions(), seed=seed, process_index=jax.process_index(),
            process_count=jax.process_count(), worker_count=d.num_workers)

    def eval_iterator(self, local_batch_size: int):
        d = self.config.data
        source = sources.get_source(d.name, d.eval_split, self.data_dir)
        transform = det_transforms.DetectionEvalTransform(int(d.eval_image_size), image_key=self.info.image_key)
        return pipeline.make_eval_iterator(
            source, transform, global_batch_size=local_batch_size * jax.process_count(),
            process_index=jax.process_index(), process_count=jax.process_count(), worker_count=d.num_workers)

    def train_batch_spec(self, global_batch_size, resolution):
        h, w = resolution
        n, m = global_batch_size, int(self.config.data.max_boxes)
        return {"image": jax.ShapeDtypeStruct((n, h, w, 3), jnp.uint8),
                "boxes": jax.ShapeDtypeStruct((n, m, 4), jnp.float32),
                "classes": jax.ShapeDtypeStruct((n, m), jnp.int32),
                "box_mask": jax.ShapeDtypeStruct((n, m), jnp.int32)}

    def eval_batch_spec(self, global_batch_size, key):
        h, w = key
        n = global_batch_size
        return {"image": jax.ShapeDtypeStruct((n, h, w, 3), jnp.uint8),
                "image_id": jax.ShapeDtypeStruct((n,), jnp.int32),   # int64 ids: see the module docstring
                "scale": jax.ShapeDtypeStruct((n,), jnp.float32),
                "orig_hw": jax.ShapeDtypeStruct((n, 2), jnp.int32),
                "mask": jax.ShapeDtypeStruct((n,), jnp.int32)}

    def is_classifier_param(self, path: str) -> bool:
        # The per-level class prediction convs of YOLOX's head (YOLOX's `cls_preds`).
        return path.startswith("head/cls_preds_")

    # -- evaluation ----------------------------------------------------------------
    @functools.cached_property
    def _ground_truth(self) -> tuple[dict, np.ndarray]:
        """(COCO-format ground truth of the eval split, its int64 image ids in split order), read once."""
        d, info = self.config.data, self.info
        annotations = coco.read_annotations(d.name, d.eval_split, self.data_dir)
        return (det_metrics.coco_ground_truth(annotations, info.category_ids, self.class_names),
                np.asarray(annotations.image_ids, np.int64))

    def detections_from_records(self, records: Mapping[str, np.ndarray]) -> det_metrics.Detections:
        """The split's detections in original pixels from the eval records (one row per example, in the
        split's order), with the full image ids of the ground truth."""
        _, ids = self._ground_truth
        carried = np.asarray(records["image_id"])
        if len(carried) != len(ids):
            raise ValueError(f"the evaluation produced records for {len(carried)} images but "
                             f"{self.config.data.name}/{self.config.data.eval_split} has {len(ids)}.")
        if not np.array_equal(carried.astype(np.int32), ids.astype(np.int32)):  # low 32 bits (module docstring)
            raise ValueError("the evaluation records are not in the split's order (their image ids differ from the "
                             "ground truth's); the eval iterator must keep the split's order.")
        batch = {"image_id": ids, "scale": records["scale"], "orig_hw": records["orig_hw"],
                 "mask": np.ones(len(ids), np.int32)}
        return det_metrics.detections_from_batch(batch, records["boxes"], records["scores"], records["classes"],
                                                  records["valid"])

    def finalize_eval(self, sums: Mapping[str, np.ndarray],
                      records: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
        """COCO box AP of the whole split (module docstring): AP, AP50, AP75, APs, APm, APl in [0, 1],
        the number of images and of detections per image; logs the per-class table."""
        ground_truth, _ = self._ground_truth
        detections = self.detections_from_records(records or {"image_id": np.zeros(0, np.int32)})
        metrics, table = det_metrics.coco_evaluate(ground_truth, detections)
        count = int(sums["count"])
        logging.info("Per-class AP on %s/%s (%d images, %d detections):\n%s", self.config.data.name,
                     self.config.data.eval_split, count, len(detections.scores), table)
        metrics["num_examples"] = float(count)
        metrics["detections_per_image"] = len(detections.scores) / max(count, 1)
        return metrics

    # ------------------------------------------------------------------ device side
    def preprocess_train(self, batch, rng):
        del rng  # all augmentation happens on the host, per example
        h, w = batch["image"].shape[1:3]
        targets = {"boxes": batch["boxes"], "classes": batch["classes"], "box_mask": batch["box_mask"],
                   "grid": detection_grid(h, w)}   # a numpy constant of the trace
        return normalize_images(batch["image"]), targets

    def preprocess_eval(self, batch):
        return normalize_images(batch["image"]), None

    def _loss(self, outputs, targets, l1_weight):
        """(loss, metrics) with the L1 term weighted by ``l1_weight`` (None: not computed)."""
        _, metrics = det_loss.yolox_loss(outputs, targets["grid"], targets["boxes"], targets["classes"],
                                         targets["box_mask"], use_l1=l1_weight is not None,
                                         assigner=ASSIGNERS[self.config.loss.assigner])
        weight = jnp.zeros((), jnp.float32) if l1_weight is None else l1_weight
        loss = combined_loss(metrics, weight)
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        return loss, dict(metrics, loss=loss, l1_on=weight)

    def loss_and_metrics(self, outputs, targets):
        """YOLOX's loss without the L1 term (the first, augmented part of the run)."""
        return self._loss(outputs, targets, None)

    def train_loss_and_metrics(self, outputs, targets, step):
        """YOLOX's loss, with the L1 term from :meth:`no_aug_start_step` on (metric ``l1_on``)."""
        if float(self.config.data.no_aug_epochs) <= 0:
            return self.loss_and_metrics(outputs, targets)
        l1_weight = (step >= self.no_aug_start_step()).astype(jnp.float32)
        return self._loss(outputs, targets, l1_weight)

    def eval_statistics(self, outputs, targets, mask):
        return {"count": jnp.sum(mask.astype(jnp.int32))}

    def eval_records(self, outputs, targets, batch):
        """Per example: the post-processed detections in letterboxed input pixels (``boxes``, ``scores``,
        ``classes``, ``valid``: ``postprocess.max_detections`` rows, best first) and what maps them back
        (``image_id`` (int32, see the module docstring), ``scale``, ``orig_hw``)."""
        h, w = batch["image"].shape[1:3]
        dets = det_postprocess.postprocess(outputs, detection_grid(h, w), self.postprocess_config)
        return {"boxes": dets.boxes, "scores": dets.scores, "classes": dets.classes, "valid": dets.valid,
                "image_id": batch["image_id"], "scale": batch["scale"], "orig_hw": batch["orig_hw"]}
