"""YOLOX loss and SimOTA assignment (evit_jax/tasks/det_loss.py).

(a) the jitted, vmapped, dense assignment against a plain numpy implementation written here with loops in
    YOLOX's own structure (candidate columns first, then costs, dynamic k, per-box selection, conflicts),
    on random images: zero to many boxes, boxes clipped at the borders, tiny boxes, predictions copying
    jittered boxes (dynamic k > 1, conflicts); identical assignments required, both YOLOX versions;
(b) the whole loss on a 4-point, 1-box case, with the numbers written out from the formulas;
(c) finite gradients, also for empty images and extreme predictions;
(d) the loss of a batch sharded over 2 devices equals the unsharded loss (global foreground count).
The comparison with YOLOX's own PyTorch code is a documented one-off (docs/detection.md).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evit_jax.models.det import detection_grid, xyxy_to_cxcywh
from evit_jax.tasks import det_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32 = np.float32
LOSS = jax.jit(det_loss.yolox_loss, static_argnames=("use_l1", "assigner"))  # one compile per batch shape


def random_case(seed: int, batch: int = 4, size: int = 64, num_classes: int = 5, max_boxes: int = 6):
    """Raw predictions, grid and padded ground truth of a random batch (image 0 full, image 1 empty)."""
    rng = np.random.default_rng(seed)
    grid = detection_grid(size, size)
    n = grid.shape[0]
    boxes = np.zeros((batch, max_boxes, 4), F32)
    classes = np.full((batch, max_boxes), -1, np.int32)  # padding holds any class id
    mask = np.zeros((batch, max_boxes), bool)
    for b in range(batch):
        count = max_boxes if b == 0 else 0 if b == 1 else int(rng.integers(1, max_boxes + 1))
        slots = rng.permutation(max_boxes)[:count]  # real boxes anywhere among the padding
        for m in slots:
            kind = rng.integers(0, 4)
            wh = rng.uniform(*((0.5, 4) if kind == 0 else (size / 3, size) if kind == 1 else (4, size / 2)), 2)
            xy = rng.uniform(-wh / 2, size - wh / 2)  # often crosses a border: clipped below
            x1y1, x2y2 = np.clip(xy, 0, size), np.clip(xy + wh, 0, size)
            x2y2 = np.maximum(x2y2, x1y1 + 0.25)
            boxes[b, m] = np.concatenate([x1y1, x2y2])
            classes[b, m] = rng.integers(0, num_classes)
            mask[b, m] = True
    raw = np.zeros((batch, n, 5 + num_classes), F32)
    stride = grid[:, 2]
    raw[..., :2] = rng.uniform(-1, 2, (batch, n, 2))
    raw[..., 2:4] = rng.normal(0.5, 1.0, (batch, n, 2))
    raw[..., 4:] = rng.normal(-1, 2, (batch, n, 1 + num_classes))
    cxcywh = np.asarray(xyxy_to_cxcywh(boxes))
    for b in range(batch):  # a third of the points predict a jittered copy of a box: high IoUs, conflicts
        if mask[b].any():
            pts = rng.random(n) < 0.33
            target = cxcywh[b, rng.choice(np.flatnonzero(mask[b]), n)]
            jittered = target * (1 + rng.normal(0, 0.15, target.shape))
            jittered[:, 2:] = np.maximum(jittered[:, 2:], 0.2)
            raw[b, pts, :2] = jittered[pts, :2] / stride[pts, None] - grid[pts, :2]
            raw[b, pts, 2:4] = np.log(jittered[pts, 2:] / stride[pts, None])
    return raw, grid, boxes, classes, mask


# ---------------------------------------------------------------------------- numpy reference
def reference_assign(raw, grid, gt_boxes, gt_classes, config):
    """SimOTA of one image in YOLOX's structure, with loops; gt_boxes (K, 4) cxcywh of the real boxes only.
    Returns (foreground (N,) bool, matched box per foreground point in point order)."""
    n, k_gt = raw.shape[0], gt_boxes.shape[0]
    foreground = np.zeros(n, bool)
    if k_gt == 0:
        return foreground, np.zeros(0, np.int64)
    stride = grid[:, 2]
    pred = np.empty((n, 4), F32)
    pred[:, :2] = (raw[:, :2] + grid[:, :2]) * stride[:, None]
    pred[:, 2:] = np.exp(raw[:, 2:4]) * stride[:, None]
    cx, cy = (grid[:, 0] + F32(0.5)) * stride, (grid[:, 1] + F32(0.5)) * stride

    in_box = np.zeros((k_gt, n), bool)
    in_center = np.zeros((k_gt, n), bool)
    for m in range(k_gt):
        gx, gy, gw, gh = gt_boxes[m]
        for p in range(n):
            r = F32(config.center_radius) * stride[p]
            in_box[m, p] = min(cx[p] - (gx - F32(0.5) * gw), cy[p] - (gy - F32(0.5) * gh),
                               (gx + F32(0.5) * gw) - cx[p], (gy + F32(0.5) * gh) - cy[p]) > 0
            in_center[m, p] = min(cx[p] - (gx - r), cy[p] - (gy - r), (gx + r) - cx[p], (gy + r) - cy[p]) > 0
    if config.in_box_candidates:
        candidates = np.flatnonzero((in_box | in_center).any(0))
        geometric = (in_box & in_center)[:, candidates]
    else:
        candidates = np.flatnonzero(in_center.any(0))
        geometric = in_center[:, candidates]
    if candidates.size == 0:
        return foreground, np.zeros(0, np.int64)

    cost = np.zeros((k_gt, candidates.size), F32)
    ious = np.zeros((k_gt, candidates.size), F32)
    for m in range(k_gt):
        g = gt_boxes[m]
        for j, p in enumerate(candidates):
            q = pred[p]
            tl = np.maximum(g[:2] - g[2:] / 2, q[:2] - q[2:] / 2)
            br = np.minimum(g[:2] + g[2:] / 2, q[:2] + q[2:] / 2)
            inter = (br[0] - tl[0]) * (br[1] - tl[1]) if np.all(tl < br) else F32(0)
            ious[m, j] = inter / (g[2] * g[3] + q[2] * q[3] - inter)
            prob = np.sqrt((1 / (1 + np.exp(-raw[p, 5:]))) * (1 / (1 + np.exp(-raw[p, 4]))))
            bce = F32(0)
            for c in range(prob.size):
                bce -= max(np.log(prob[c]), F32(-100)) if c == gt_classes[m] else max(np.log(1 - prob[c]), F32(-100))
            cost[m, j] = (bce + F32(config.iou_cost_weight) * -np.log(ious[m, j] + F32(1e-8))
                          + F32(config.geometry_penalty) * F32(not geometric[m, j]))

    matching = np.zeros(cost.shape, bool)
    for m in range(k_gt):
        dynamic_k = max(1, int(np.sort(ious[m])[::-1][:10].sum()))
        matching[m, np.argsort(cost[m], kind="stable")[:dynamic_k]] = True
    for j in range(candidates.size):
        if matching[:, j].sum() > 1:
            matching[:, j] = False
            matching[np.argmin(cost[:, j]), j] = True
    chosen = matching.any(0)
    foreground[candidates[chosen]] = True
    return foreground, matching[:, chosen].argmax(0)


def _jax_assign(raw, grid, boxes, classes, mask, config):
    grid_j = jnp.asarray(grid)
    pred = det_loss.decode_boxes(jnp.asarray(raw[..., :4]), grid_j)
    fn = jax.jit(jax.vmap(lambda p, c, o, g, k, m: det_loss.simota_assign(p, c, o, grid_j, g, k, m, config)))
    safe_classes = np.where(mask, classes, 0)
    return fn(pred, jnp.asarray(raw[..., 5:]), jnp.asarray(raw[..., 4]), xyxy_to_cxcywh(jnp.asarray(boxes)),
              jnp.asarray(safe_classes), jnp.asarray(mask))


@pytest.mark.parametrize("config", [det_loss.YOLOX_0_3_0, det_loss.YOLOX_2023], ids=["yolox-0.3.0", "yolox-2023"])
def test_assignment_equals_the_numpy_reference(config):
    checked = conflicts_or_k = 0
    for seed in range(6):
        raw, grid, boxes, classes, mask = random_case(seed, size=(64, 96)[seed % 2], num_classes=(1, 5, 80)[seed % 3])
        got = _jax_assign(raw, grid, boxes, classes, mask, config)
        cxcywh = np.asarray(xyxy_to_cxcywh(boxes))
        for b in range(raw.shape[0]):
            real = np.flatnonzero(mask[b])
            fg, matched = reference_assign(raw[b], grid, cxcywh[b, real], classes[b, real], config)
            np.testing.assert_array_equal(np.asarray(got.foreground[b]), fg, err_msg=f"seed {seed} image {b}")
            # Our box indices address the padded slots; the reference's the real boxes in slot order.
            np.testing.assert_array_equal(np.asarray(got.matched_gt[b])[fg], real[matched],
                                          err_msg=f"seed {seed} image {b}")
            assert not np.asarray(got.foreground[b]).any() or mask[b].any()
            checked += int(fg.sum())
            conflicts_or_k += int(fg.sum()) - len(set(matched.tolist()))
    assert checked > 100 and conflicts_or_k > 20  # boxes with several points: the dynamic k matters


def _bce(x, y):
    return max(x, 0.0) - x * y + math.log1p(math.exp(-abs(x)))


@pytest.mark.parametrize("use_l1", [False, True])
def test_loss_by_hand_one_box_four_points(use_l1):
    """16x16 input, one stride-8 level (4 points, centres (4,4) (12,4) (4,12) (12,12)), one box of class 1
    with corners (2, 2, 10, 8) = centre (6, 5), size 8 x 6. Every point is a candidate (2.5 strides around the
    centre); only point 0 lies inside the box too. Point 0 predicts (6.5, 5, 8, 7): IoU 45/59."""
    grid = detection_grid(16, 16, strides=(8,))
    raw = np.zeros((1, 4, 7), F32)
    raw[0, 0, :4] = [6.5 / 8, 5 / 8, 0.0, math.log(7 / 8)]
    raw[0, 1, :4] = [0.5, 0.5, 0.0, 0.0]  # (12, 4, 8, 8): IoU 12/100
    # points 2 and 3 keep zero raw boxes: (0, 8, 8, 8) IoU 8/104 and (8, 8, 8, 8) IoU 24/88
    obj = [2.0, -1.0, 0.0, 1.0]
    cls = [[0.5, 1.5], [-0.5, 0.3], [1.0, -2.0], [0.0, 0.0]]
    raw[0, :, 4], raw[0, :, 5:] = obj, cls
    boxes = np.array([[[2, 2, 10, 8], [0, 0, 0, 0]]], F32)  # one real box + one padding slot
    classes, mask = np.array([[1, 0]]), np.array([[True, False]])

    # sum of IoUs 0.763 + 0.12 + 0.077 + 0.273 = 1.23: dynamic k = 1; point 0 is the only geometric one.
    iou = 45 / 59
    expect_iou = 5 * (1 - iou**2)
    expect_obj = sum(_bce(o, t) for o, t in zip(obj, [1, 0, 0, 0]))
    expect_cls = _bce(0.5, 0.0) + _bce(1.5, iou)
    expect_l1 = (abs(6.5 / 8 - 6 / 8) + 0.0 + abs(0.0 - math.log(1 + 1e-8))
                 + abs(math.log(7 / 8) - math.log(6 / 8 + 1e-8)))
    loss, m = LOSS(raw, grid, boxes, classes, mask, use_l1=use_l1)
    assert int(m["num_fg"]) == 1 and int(m["num_gt"]) == 1
    np.testing.assert_allclose(float(m["iou_loss"]), expect_iou, rtol=1e-5)
    np.testing.assert_allclose(float(m["obj_loss"]), expect_obj, rtol=1e-5)
    np.testing.assert_allclose(float(m["cls_loss"]), expect_cls, rtol=1e-5)
    np.testing.assert_allclose(float(m["l1_loss"]), expect_l1 if use_l1 else 0.0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(loss), expect_iou + expect_obj + expect_cls + (expect_l1 if use_l1 else 0),
                               rtol=1e-5)
    a = det_loss.simota_assign(det_loss.decode_boxes(jnp.asarray(raw[0, :, :4]), jnp.asarray(grid)),
                               jnp.asarray(raw[0, :, 5:]), jnp.asarray(raw[0, :, 4]), jnp.asarray(grid),
                               xyxy_to_cxcywh(jnp.asarray(boxes[0])), jnp.asarray(classes[0]), jnp.asarray(mask[0]))
    assert a.foreground.tolist() == [True, False, False, False] and int(a.matched_gt[0]) == 0
    np.testing.assert_allclose(float(a.matched_iou[0]), iou, rtol=1e-6)


def test_no_boxes_leaves_only_the_objectness_loss():
    raw, grid, boxes, classes, _ = random_case(0, batch=2)
    mask = np.zeros(classes.shape, bool)
    loss, m = LOSS(raw, grid, boxes, classes, mask, use_l1=True)
    expect = np.sum(np.maximum(raw[..., 4], 0) + np.log1p(np.exp(-np.abs(raw[..., 4]))))  # all targets 0, / max(1, 0)
    assert int(m["num_fg"]) == 0 and float(m["iou_loss"]) == float(m["cls_loss"]) == float(m["l1_loss"]) == 0.0
    np.testing.assert_allclose(float(loss), expect, rtol=1e-5)


def test_normaliser_is_the_batch_foreground_count():
    """Two images' loss = (sum of per-image loss x per-image fg) / total fg, as one global normaliser."""
    raw, grid, boxes, classes, mask = random_case(3, batch=2)
    f = lambda r, b, c, k: LOSS(r, grid, b, c, k, use_l1=True)  # noqa: E731
    whole, mw = f(raw, boxes, classes, mask)
    parts = [f(raw[i : i + 1], boxes[i : i + 1], classes[i : i + 1], mask[i : i + 1]) for i in range(2)]
    fg = [max(int(p[1]["num_fg"]), 1) for p in parts]
    assert int(mw["num_fg"]) == sum(int(p[1]["num_fg"]) for p in parts) > 0
    np.testing.assert_allclose(float(whole), sum(float(p[0]) * n for p, n in zip(parts, fg)) / int(mw["num_fg"]),
                               rtol=1e-5)


def test_gradients_are_finite():
    raw, grid, boxes, classes, mask = random_case(1, batch=2)  # image 1 has no box
    raw[0, :5, 2:4] = 10.0  # huge boxes
    raw[0, 5:10, 2:4] = -10.0  # vanishing boxes
    raw[0, 10:15, 4:] = 30.0  # saturated logits
    grad_fn = jax.jit(jax.grad(lambda r, m: det_loss.yolox_loss(r, grid, boxes, classes, m, use_l1=True)[0]))
    grad = np.asarray(grad_fn(raw, mask))
    assert np.isfinite(grad).all() and np.abs(grad[0]).sum() > 0
    assert np.isfinite(np.asarray(grad_fn(raw, np.zeros_like(mask)))).all()


def test_bad_input_is_one_clear_error():
    raw, grid, boxes, classes, mask = random_case(0, batch=1)
    with pytest.raises(ValueError, match="detection_grid"):
        det_loss.yolox_loss(raw, detection_grid(32, 32), boxes, classes, mask)
    with pytest.raises(ValueError, match=r"M >= 1 \(pad images"):
        det_loss.yolox_loss(raw, grid, boxes[:, :0], classes[:, :0], mask[:, :0])
    with pytest.raises(ValueError, match="classes \\(B, M\\)"):
        det_loss.yolox_loss(raw, grid, boxes, classes[:, :2], mask)


_SHARDED = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from tests.test_det_loss import random_case
    from evit_jax.tasks import det_loss, det_postprocess
    assert jax.device_count() == 2
    raw, grid, boxes, classes, mask = random_case(5, batch=4)
    shard = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    loss_fn = jax.jit(lambda *a: det_loss.yolox_loss(*a[:1], grid, *a[1:], use_l1=True))
    post_fn = jax.jit(lambda r: det_postprocess.postprocess(r, grid))
    one = loss_fn(raw, boxes, classes, mask), post_fn(raw)
    two = loss_fn(*(jax.device_put(a, shard) for a in (raw, boxes, classes, mask))), post_fn(jax.device_put(raw, shard))
    np.testing.assert_allclose(float(two[0][0]), float(one[0][0]), rtol=1e-6)
    assert int(two[0][1]["num_fg"]) == int(one[0][1]["num_fg"]) > 0
    for a, b in zip(two[1], one[1]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print("OK")
""")


def test_loss_and_postprocess_on_a_batch_sharded_over_two_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SHARDED], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
