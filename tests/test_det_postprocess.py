"""Post-processing (evit_jax/tasks/det_postprocess.py) against torchvision.

The reference is YOLOX's post-processing written with torch + torchvision.ops.batched_nms on the same
points: decode, best class, score = sigmoid(obj) x max sigmoid(cls), threshold, the same top-K pre-selection,
class-aware (or agnostic) NMS, the first max_detections. Cases are random and built without score ties.
Kept sets and classes must be identical; boxes and scores equal within 1e-5 relative (exp/sigmoid of XLA
and torch differ in the last bits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evit_jax.models.det import detection_grid
from evit_jax.tasks import det_postprocess as pp

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


def random_predictions(seed: int, batch: int = 3, size: int = 128, num_classes: int = 4):
    """Clustered boxes (several points predicting around the same objects) so that NMS has work to do."""
    rng = np.random.default_rng(seed)
    grid = detection_grid(size, size)
    n = grid.shape[0]
    raw = np.empty((batch, n, 5 + num_classes), np.float32)
    raw[..., :2] = rng.uniform(-2, 3, (batch, n, 2))
    raw[..., 2:4] = rng.normal(0.8, 0.6, (batch, n, 2))
    raw[..., 4:] = rng.normal(-0.5, 1.5, (batch, n, 1 + num_classes))
    return raw, grid


def torchvision_reference(raw: np.ndarray, grid: np.ndarray, config: pp.PostprocessConfig):
    r, g = torch.from_numpy(raw), torch.from_numpy(grid)
    xy = (r[:, :2] + g[:, :2]) * g[:, 2:]
    wh = torch.exp(r[:, 2:4]) * g[:, 2:]
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], 1)
    conf, cls = torch.sigmoid(r[:, 5:]).max(1)
    scores = torch.sigmoid(r[:, 4]) * conf
    assert len(set(scores.tolist())) == len(scores), "tie in the scores: pick another seed"
    top = torch.topk(scores, min(config.pre_nms_top_k, len(scores))).indices
    top = top[scores[top] >= config.score_threshold]
    if config.class_agnostic:
        keep = torchvision.ops.nms(boxes[top], scores[top], config.iou_threshold)
    else:
        keep = torchvision.ops.batched_nms(boxes[top], scores[top], cls[top], config.iou_threshold)
    kept = top[keep[: config.max_detections]]
    return boxes[kept].numpy(), scores[kept].numpy(), cls[kept].numpy(), kept.numpy()


CASES = [  # (config, number of classes)
    (pp.PostprocessConfig(), 80),  # YOLOX COCO eval: 0.01, 0.65, top 1000, 100 detections
    (pp.PostprocessConfig(score_threshold=0.2, iou_threshold=0.3, pre_nms_top_k=300, max_detections=40), 4),
    (pp.PostprocessConfig(iou_threshold=0.5, pre_nms_top_k=150, max_detections=200, class_agnostic=True), 1),  # K < D
]


@pytest.mark.parametrize("config,num_classes", CASES, ids=["yolox-eval", "strict", "agnostic-pad"])
def test_equals_torchvision_batched_nms(config, num_classes):
    suppressed = 0
    fn = jax.jit(lambda r, g: pp.postprocess(r, g, config))
    for seed in range(3):
        raw, grid = random_predictions(seed, num_classes=num_classes)
        det = fn(raw, grid)
        assert det.boxes.shape == (3, config.max_detections, 4) and det.classes.dtype == jnp.int32
        for b in range(raw.shape[0]):
            boxes, scores, classes, kept = torchvision_reference(raw[b], grid, config)
            n = int(det.count[b])
            assert n == len(kept), (seed, b)
            np.testing.assert_array_equal(np.asarray(det.classes[b, :n]), classes)
            np.testing.assert_allclose(np.asarray(det.scores[b, :n]), scores, rtol=1e-5)
            np.testing.assert_allclose(np.asarray(det.boxes[b, :n]), boxes, rtol=1e-5, atol=1e-4)
            assert np.asarray(det.valid[b, :n]).all() and not np.asarray(det.valid[b, n:]).any()
            assert (np.asarray(det.classes[b, n:]) == -1).all() and (np.asarray(det.scores[b, n:]) == 0).all()
            assert (np.diff(np.asarray(det.scores[b, :n])) <= 0).all()
            above = int((torch.sigmoid(torch.from_numpy(raw[b, :, 4])) *
                         torch.sigmoid(torch.from_numpy(raw[b, :, 5:])).max(1).values >= config.score_threshold).sum())
            suppressed += min(above, config.pre_nms_top_k) - len(kept)
    assert suppressed > 50  # NMS and the caps removed many boxes: the comparison is not vacuous


def test_greedy_nms_hand_case():
    """A suppresses B (IoU 0.82), B would suppress C but B is gone, so C stays; D has another class."""
    boxes = jnp.array([[0, 0, 10, 10], [1, 0, 11, 10], [2, 0, 12, 10], [0, 0, 10, 10]], jnp.float32)
    # IoU(A, B) = 90/110 = 0.82, IoU(B, C) = 0.82, IoU(A, C) = 80/120 = 0.67
    classes = jnp.array([0, 0, 0, 1])
    valid = jnp.array([True, True, True, True])
    assert pp.greedy_nms(boxes, classes, valid, 0.7).tolist() == [True, False, True, True]
    assert pp.greedy_nms(boxes, classes, valid, 0.6).tolist() == [True, False, False, True]
    assert pp.greedy_nms(boxes, classes, valid, 0.7, class_agnostic=True).tolist() == [True, False, True, False]
    # an invalid box suppresses nothing
    assert pp.greedy_nms(boxes, classes, valid.at[0].set(False), 0.7).tolist() == [False, True, False, True]


def test_bad_input_is_one_clear_error():
    raw, grid = random_predictions(0, batch=1)
    with pytest.raises(ValueError, match="detection_grid"):
        pp.postprocess(raw, detection_grid(64, 64))
    with pytest.raises(ValueError, match="max_detections"):
        pp.PostprocessConfig(max_detections=0)
