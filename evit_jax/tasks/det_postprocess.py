"""Detections from EfficientViT-Det's raw predictions: decoding, scores, class-aware NMS, top-k; static shapes.

As YOLOX's `postprocess` (`yolox/utils/boxes.py`): boxes are decoded to corners, each point keeps its best
class with score = sigmoid(obj) x max sigmoid(cls), points scoring below `score_threshold` are dropped, and
greedy non-maximum suppression among boxes of the same class removes every box whose IoU with a
higher-scoring kept box exceeds `iou_threshold` (torchvision's `batched_nms`). For static shapes two
bounds are added: only the `pre_nms_top_k` highest-scoring points of an image enter NMS, and the
`max_detections` highest-scoring survivors are returned (COCO evaluation keeps 100 per image).

Everything is jittable and vmapped over the batch, so evaluation and prediction run jitted on sharded
batches. Boxes stay in the model input's pixel coordinates; mapping them back to the original image
(undoing the letterbox) is the data pipeline's job.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from evit_jax.models.det import box_iou_xyxy, cxcywh_to_xyxy, decode_boxes


@dataclasses.dataclass(frozen=True)
class PostprocessConfig:
    """Defaults: YOLOX's COCO evaluation (test_conf 0.01, nmsthre 0.65) and COCO's 100 detections per image."""

    score_threshold: float = 0.01
    iou_threshold: float = 0.65
    pre_nms_top_k: int = 1000
    max_detections: int = 100
    class_agnostic: bool = False

    def __post_init__(self):
        if self.pre_nms_top_k < 1 or self.max_detections < 1:
            raise ValueError(f"pre_nms_top_k and max_detections must be >= 1, got {self.pre_nms_top_k} and "
                             f"{self.max_detections}")
        if not 0.0 <= self.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must lie in [0, 1], got {self.iou_threshold}")


class Detections(NamedTuple):
    """Per image, best score first; entries past `count` have valid False, zero boxes and scores, class -1."""

    boxes: jax.Array  # (B, D, 4) float32 corners (x1, y1, x2, y2) in input pixels
    scores: jax.Array  # (B, D) float32
    classes: jax.Array  # (B, D) int32
    valid: jax.Array  # (B, D) bool

    @property
    def count(self) -> jax.Array:
        return jnp.sum(self.valid, -1)


def greedy_nms(boxes: jax.Array, classes: jax.Array, valid: jax.Array, iou_threshold: float,
               class_agnostic: bool = False) -> jax.Array:
    """Exact greedy NMS of K boxes already sorted by descending score: (K,) bool of the boxes kept.

    Box i is kept iff it is valid and no kept box j < i of the same class (any class if `class_agnostic`)
    overlaps it with IoU > `iou_threshold`. The recursion has one solution; starting from `valid` and
    re-applying it fixes one more leading box per pass, so the loop stops after (length of the longest
    suppression chain + 1) passes of one K x K matrix product each, at most K.
    """
    k = boxes.shape[0]
    earlier = jnp.arange(k)[:, None] < jnp.arange(k)[None, :]  # [j, i]: j ranks before i
    suppresses = (box_iou_xyxy(boxes, boxes) > iou_threshold) & earlier & valid[:, None]
    if not class_agnostic:
        suppresses &= classes[:, None] == classes[None, :]

    def step(state):
        keep, _, passes = state
        new = valid & ~jnp.any(suppresses & keep[:, None], 0)
        return new, jnp.any(new != keep), passes + 1

    keep, _, _ = jax.lax.while_loop(lambda s: s[1] & (s[2] <= k), step, (valid, jnp.array(True), 0))
    return keep


def _postprocess_image(raw: jax.Array, grid: jax.Array, config: PostprocessConfig) -> Detections:
    boxes = cxcywh_to_xyxy(decode_boxes(raw[:, :4], grid))
    class_prob = jax.nn.sigmoid(raw[:, 5:])
    scores = jax.nn.sigmoid(raw[:, 4]) * jnp.max(class_prob, -1)
    classes = jnp.argmax(class_prob, -1).astype(jnp.int32)

    k = min(config.pre_nms_top_k, raw.shape[0])
    top_scores, top = jax.lax.top_k(scores, k)  # ties: lower point index first
    top_boxes, top_classes = boxes[top], classes[top]
    candidate = top_scores >= config.score_threshold
    keep = greedy_nms(top_boxes, top_classes, candidate, config.iou_threshold, config.class_agnostic)

    # The kept boxes in score order first (a stable sort of the keep flags), then the first max_detections.
    order = jnp.argsort(~keep, stable=True)
    d = config.max_detections
    if k < d:
        order = jnp.concatenate([order, jnp.full((d - k,), k, order.dtype)])  # index k: the padding row below
    order = order[:d]
    pad = lambda x, value: jnp.concatenate([x, jnp.full((1,) + x.shape[1:], value, x.dtype)])  # noqa: E731
    valid = pad(keep, False)[order]
    return Detections(
        boxes=jnp.where(valid[:, None], pad(top_boxes, 0.0)[order], 0.0),
        scores=jnp.where(valid, pad(top_scores, 0.0)[order], 0.0),
        classes=jnp.where(valid, pad(top_classes, -1)[order], -1),
        valid=valid,
    )


def postprocess(predictions: jax.Array, grid, config: PostprocessConfig = PostprocessConfig()) -> Detections:
    """Raw model output (B, N, 5 + C) and its (N, 3) `detection_grid` -> Detections with D = max_detections."""
    grid = jnp.asarray(grid, jnp.float32)
    if predictions.ndim != 3 or predictions.shape[1] != grid.shape[0] or predictions.shape[2] < 6:
        raise ValueError(f"postprocess: predictions must be (batch, {grid.shape[0]} points, 5 + classes), got "
                         f"{predictions.shape}; build the grid with detection_grid(height, width) of the input size")
    fn = functools.partial(_postprocess_image, grid=grid, config=config)
    return jax.vmap(fn)(predictions.astype(jnp.float32))
