"""YOLOX's training loss with SimOTA label assignment, with static shapes under jit.

Follows Megvii-BaseDetection/YOLOX `yolox/models/yolo_head.py` (`get_losses`, `get_assignments`) and
`yolox/models/losses.py` (`IOUloss`) at release 0.3.0 (commit 4197784, April 2022, the version of the
EfficientViT paper's time); `YOLOX_2023` selects the geometry constraint of later YOLOX (commit 14c62a7,
January 2023). docs/detection.md ("Loss and assignment") states both and what was compared.

Ground truth is padded to a fixed number M of boxes per image: `boxes` (B, M, 4) corners (x1, y1, x2, y2) in
pixels of the model input, `classes` (B, M) int32, `mask` (B, M) bool (True for real boxes). Predictions are
the model's raw output (B, N, 4 + 1 + C) and `grid` the (N, 3) (x, y, stride) rows of
`evit_jax.models.det.detection_grid`.

Assignment of one image, with dense (M x N) matrices:
1. candidates: points whose centre ((x + 0.5) * stride) lies inside some gt box or within
   `center_radius` x stride of its centre (0.3.0; later YOLOX: only the centre region, radius 1.5);
2. cost[m, n] = BCE(sqrt(sigmoid(cls) * sigmoid(obj)), one-hot class) summed over classes
   + 3 x -log(IoU + 1e-8) + penalty x (point not inside both box and centre region of gt m);
   points that are no candidate of any box are never chosen;
3. dynamic k[m] = max(1, floor(sum of the 10 largest IoUs over the candidates)) (k <= 10);
   gt m takes its k lowest-cost candidates (ties: lower point index first);
4. a point taken by several boxes keeps the box of lowest cost (over all boxes of the image, as YOLOX).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from evit_jax.models.det import box_iou_cxcywh, decode_boxes, xyxy_to_cxcywh

REG_WEIGHT = 5.0  # YOLOX: weight of the IoU loss
L1_EPS = 1e-8  # YOLOX get_l1_target: log(w / stride + eps)
BCE_LOG_FLOOR = -100.0  # PyTorch's binary_cross_entropy clamps log() at -100


@dataclasses.dataclass(frozen=True)
class SimOTA:
    """Geometry and cost settings of the SimOTA assignment.

    center_radius: half side of the square centre region, in strides.
    in_box_candidates: candidates are points inside a box OR its centre region, and the penalty applies to
      points not inside BOTH (YOLOX 0.3.0); False: candidates and penalty use the centre region alone.
    geometry_penalty: cost added to a (box, point) pair outside the box's geometric region.
    """

    center_radius: float = 2.5
    in_box_candidates: bool = True
    geometry_penalty: float = 1e5
    iou_cost_weight: float = 3.0
    max_dynamic_k: int = 10


YOLOX_0_3_0 = SimOTA()
YOLOX_2023 = SimOTA(center_radius=1.5, in_box_candidates=False, geometry_penalty=1e6)


class Assignment(NamedTuple):
    """Per point: whether it is foreground, its box index (0 for background) and the IoU of its prediction with
    that box (0 for background)."""

    foreground: jax.Array  # (..., N) bool
    matched_gt: jax.Array  # (..., N) int32
    matched_iou: jax.Array  # (..., N) float32


def _inside(cx: jax.Array, cy: jax.Array, left, right, top, bottom) -> jax.Array:
    """Point centres (N,) strictly inside the (M, 1) or (M, N) rectangles: (M, N) bool."""
    deltas = jnp.stack([cx - left, cy - top, right - cx, bottom - cy], -1)
    return jnp.min(deltas, -1) > 0.0


def geometry(grid: jax.Array, gt_boxes: jax.Array, config: SimOTA) -> tuple[jax.Array, jax.Array]:
    """(candidate pairs, geometric pairs), both (M, N) bool: a point is a candidate of a box if inside the box
    or its centre region (centre region only without `in_box_candidates`); a pair is geometric if inside both
    (the centre region only, likewise)."""
    stride = grid[:, 2]
    cx, cy = (grid[:, 0] + 0.5) * stride, (grid[:, 1] + 0.5) * stride
    gx, gy, gw, gh = (gt_boxes[:, i : i + 1] for i in range(4))
    radius = config.center_radius * stride
    in_center = _inside(cx, cy, gx - radius, gx + radius, gy - radius, gy + radius)
    if not config.in_box_candidates:
        return in_center, in_center
    in_box = _inside(cx, cy, gx - 0.5 * gw, gx + 0.5 * gw, gy - 0.5 * gh, gy + 0.5 * gh)
    return in_box | in_center, in_box & in_center


def class_cost(cls_logits: jax.Array, obj_logits: jax.Array, gt_classes: jax.Array) -> jax.Array:
    """(M, N) binary cross-entropy of sqrt(sigmoid(cls) * sigmoid(obj)) against each box's one-hot class,
    summed over classes (PyTorch's log clamp at -100 included)."""
    p = jnp.sqrt(jax.nn.sigmoid(cls_logits) * jax.nn.sigmoid(obj_logits)[:, None])  # (N, C)
    log_p = jnp.maximum(jnp.log(p), BCE_LOG_FLOOR)
    log_not_p = jnp.maximum(jnp.log(1.0 - p), BCE_LOG_FLOOR)
    all_negative = -jnp.sum(log_not_p, -1)  # every class a negative
    # The box's own class is a positive: swap its negative term for the positive one.
    own = gt_classes[None, :]
    swap = jnp.take_along_axis(log_not_p, own, 1) - jnp.take_along_axis(log_p, own, 1)  # (N, M)
    return (all_negative[:, None] + swap).T


def simota_assign(pred_boxes: jax.Array, cls_logits: jax.Array, obj_logits: jax.Array, grid: jax.Array,
                  gt_boxes: jax.Array, gt_classes: jax.Array, gt_mask: jax.Array,
                  config: SimOTA = YOLOX_0_3_0) -> Assignment:
    """SimOTA assignment of one image (module docstring, steps 1-4); no gradient flows through it.

    pred_boxes: (N, 4) decoded (cx, cy, w, h); cls_logits (N, C); obj_logits (N,); grid (N, 3);
    gt_boxes: (M, 4) (cx, cy, w, h); gt_classes (M,) int; gt_mask (M,) bool.
    """
    pred_boxes, cls_logits, obj_logits = map(jax.lax.stop_gradient, (pred_boxes, cls_logits, obj_logits))
    num_points, num_gt = pred_boxes.shape[0], gt_boxes.shape[0]
    valid = gt_mask[:, None]
    candidate_pairs, geometric = geometry(grid, gt_boxes, config)
    candidate = jnp.any(candidate_pairs & valid, 0)  # YOLOX's fg_mask: candidates of any box
    pairs = valid & candidate[None, :]

    ious = jnp.where(pairs, box_iou_cxcywh(gt_boxes[:, None, :], pred_boxes[None, :, :]), 0.0)
    cost = (class_cost(cls_logits, obj_logits, gt_classes.astype(jnp.int32))
            + config.iou_cost_weight * -jnp.log(ious + 1e-8)
            + config.geometry_penalty * (~geometric).astype(jnp.float32))
    cost = jnp.where(pairs, cost, jnp.inf)

    k_max = min(config.max_dynamic_k, num_points)
    top_ious = jax.lax.top_k(ious, k_max)[0]
    dynamic_k = jnp.maximum(jnp.floor(jnp.sum(top_ious, -1)).astype(jnp.int32), 1)  # (M,), <= k_max
    neg_cost, chosen = jax.lax.top_k(-cost, k_max)  # lowest costs, lower index first among ties
    take = (jnp.arange(k_max)[None, :] < dynamic_k[:, None]) & jnp.isfinite(neg_cost)
    matching = jnp.zeros((num_gt, num_points), bool).at[jnp.arange(num_gt)[:, None], chosen].set(take)

    matches = jnp.sum(matching, 0)
    cheapest = jnp.argmin(cost, 0)
    matching = jnp.where(matches[None, :] > 1, jnp.arange(num_gt)[:, None] == cheapest[None, :], matching)
    foreground = matches > 0
    matched_gt = jnp.where(foreground, jnp.argmax(matching, 0), 0).astype(jnp.int32)
    matched_iou = jnp.where(foreground, jnp.take_along_axis(ious, matched_gt[None, :], 0)[0], 0.0)
    return Assignment(foreground, matched_gt, matched_iou)


def l1_targets(gt_boxes: jax.Array, grid: jax.Array) -> jax.Array:
    """YOLOX's L1 targets in the raw output's units: (cx / stride - x, cy / stride - y, log(w / stride + 1e-8),
    log(h / stride + 1e-8)); gt_boxes (..., N, 4) matched (cx, cy, w, h) per point."""
    stride = grid[:, 2:3]
    xy = gt_boxes[..., :2] / stride - grid[:, :2]
    wh = jnp.log(gt_boxes[..., 2:4] / stride + L1_EPS)
    return jnp.concatenate([xy, wh], -1)


def yolox_loss(predictions: jax.Array, grid, boxes: jax.Array, classes: jax.Array, mask: jax.Array, *,
               use_l1: bool = False, assigner: SimOTA = YOLOX_0_3_0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """YOLOX's loss: 5 x IoU loss (1 - IoU^2) on foreground boxes + objectness BCE on every point + class BCE on
    foreground points against one-hot x matched IoU (+ L1 on the raw box outputs when `use_l1`, YOLOX's last
    no-augmentation epochs), each summed and divided by max(1, foreground points of the whole batch).

    Shapes: module docstring. Under jit with a batch sharded over devices and hosts the sums run over the
    global batch. Returns (loss, metrics): `iou_loss` (already x 5), `obj_loss`, `cls_loss`, `l1_loss`,
    `num_fg` and `num_gt` (batch totals).
    """
    grid = jnp.asarray(grid, jnp.float32)
    predictions = predictions.astype(jnp.float32)
    if predictions.shape[1] != grid.shape[0]:
        raise ValueError(f"yolox_loss: predictions have {predictions.shape[1]} points but the grid has "
                         f"{grid.shape[0]}; build the grid with detection_grid(height, width) of the input size")
    b, m = predictions.shape[0], boxes.shape[1] if boxes.ndim == 3 else 0
    if boxes.shape != (b, m, 4) or m < 1 or classes.shape != (b, m) or mask.shape != (b, m):
        raise ValueError(f"yolox_loss: ground truth must be boxes (B, M, 4), classes (B, M) and mask (B, M) with "
                         f"B = {b} and M >= 1 (pad images to a fixed M); got {boxes.shape}, {classes.shape}, "
                         f"{mask.shape}")
    raw_boxes, obj_logits, cls_logits = predictions[..., :4], predictions[..., 4], predictions[..., 5:]
    num_classes = cls_logits.shape[-1]
    pred_boxes = decode_boxes(raw_boxes, grid)
    gt = xyxy_to_cxcywh(boxes.astype(jnp.float32))
    mask = mask.astype(bool)
    classes = jnp.where(mask, classes, 0).astype(jnp.int32)  # padding may hold any class id
    assign = jax.vmap(functools.partial(simota_assign, config=assigner), in_axes=(0, 0, 0, None, 0, 0, 0))(
        pred_boxes, cls_logits, obj_logits, grid, gt, classes, mask)
    fg = assign.foreground
    num_fg = jnp.sum(fg)
    denominator = jnp.maximum(num_fg, 1).astype(jnp.float32)

    matched_boxes = jnp.take_along_axis(gt, assign.matched_gt[..., None], 1)
    # Background points get a harmless unit target so that no masked-out term can produce a NaN gradient.
    matched_boxes = jnp.where(fg[..., None], matched_boxes, jnp.array([0.0, 0.0, 1.0, 1.0]))
    iou = box_iou_cxcywh(pred_boxes, matched_boxes, eps=1e-16)
    iou_loss = jnp.sum(jnp.where(fg, 1.0 - iou**2, 0.0)) / denominator

    obj_loss = jnp.sum(optax.sigmoid_binary_cross_entropy(obj_logits, fg.astype(jnp.float32))) / denominator

    matched_classes = jnp.take_along_axis(classes, assign.matched_gt, 1)
    cls_targets = jax.nn.one_hot(matched_classes, num_classes) * assign.matched_iou[..., None]
    cls_bce = optax.sigmoid_binary_cross_entropy(cls_logits, cls_targets)
    cls_loss = jnp.sum(jnp.where(fg[..., None], cls_bce, 0.0)) / denominator

    if use_l1:
        l1 = jnp.abs(raw_boxes - l1_targets(matched_boxes, grid))
        l1_loss = jnp.sum(jnp.where(fg[..., None], l1, 0.0)) / denominator
    else:
        l1_loss = jnp.zeros((), jnp.float32)

    loss = REG_WEIGHT * iou_loss + obj_loss + cls_loss + l1_loss
    metrics = dict(iou_loss=REG_WEIGHT * iou_loss, obj_loss=obj_loss, cls_loss=cls_loss, l1_loss=l1_loss,
                   num_fg=num_fg, num_gt=jnp.sum(mask))
    return loss, metrics
