"""COCO evaluation (evit_jax.tasks.det_metrics) against hand-computed AP and pycocotools' own loadRes path.

COCO's AP is the mean over 10 IoU thresholds (0.50:0.05:0.95) and over classes of the precision
interpolated at 101 recall points (0, 0.01, ..., 1); AP50/AP75 use one threshold. The expected
values below follow from that definition.
"""

import contextlib
import io
import math

import numpy as np
import pytest

from evit_jax.data import coco
from evit_jax.tasks import det_metrics

pytest.importorskip("pycocotools")

CATEGORY_IDS = (3, 7, 12)          # non-contiguous on purpose: class k <-> CATEGORY_IDS[k]
NAMES = ("cat", "dog", "emu")


def _annotations(images):
    """SplitAnnotations from [(image_id, (h, w), [(x1, y1, x2, y2, label, crowd), ...])]."""
    objects = []
    for _, _, objs in images:
        arr = np.array([o[:4] for o in objs], np.float64).reshape(-1, 4)
        objects.append({"bbox": arr, "label": np.array([o[4] for o in objs], np.int64),
                        "is_crowd": np.array([o[5] for o in objs], bool),
                        "area": (arr[:, 2] - arr[:, 0]) * (arr[:, 3] - arr[:, 1])})
    return coco.SplitAnnotations(np.array([i for i, _, _ in images], np.int64),
                                 np.array([hw for _, hw, _ in images], np.int64), objects)


# Small (< 32^2), medium and large (> 96^2) boxes of every class, a crowd-only image, an image
# without objects, a crowd next to a real box.
IMAGES = [
    (10, (200, 300), [(10, 10, 30, 30, 0, False), (50, 40, 110, 100, 1, False), (120, 20, 250, 180, 2, False)]),
    (11, (200, 300), [(5, 5, 25, 15, 1, False), (100, 100, 160, 170, 0, False), (170, 10, 200, 40, 2, False)]),
    (12, (150, 150), [(0, 0, 150, 150, 0, True)]),                                   # crowd only
    (13, (120, 160), []),                                                            # no objects
    (14, (300, 300), [(0, 0, 120, 120, 1, True), (150, 150, 280, 290, 1, False), (10, 200, 40, 230, 0, False)]),
]


@pytest.fixture(scope="module")
def ground_truth():
    return det_metrics.coco_ground_truth(_annotations(IMAGES), CATEGORY_IDS, NAMES)


def _perfect(images=IMAGES, score=0.9):
    rows = [(i, o[:4], score, o[4]) for i, _, objs in images for o in objs if not o[5]]
    return _detections(rows)


def _detections(rows):
    if not rows:
        return det_metrics.Detections.empty()
    ids, boxes, scores, classes = zip(*rows)
    return det_metrics.Detections(np.array(ids), np.array(boxes, np.float64), np.array(scores), np.array(classes))


def test_ground_truth_maps_classes_back_and_keeps_crowds(ground_truth):
    anns = ground_truth["annotations"]
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))   # id 0 would read as "unmatched"
    assert [c["id"] for c in ground_truth["categories"]] == list(CATEGORY_IDS)
    first = anns[0]
    assert first["category_id"] == 3 and first["bbox"] == [10.0, 10.0, 20.0, 20.0] and first["area"] == 400.0
    assert sum(a["iscrowd"] for a in anns) == 2
    assert [im["id"] for im in ground_truth["images"]] == [10, 11, 12, 13, 14]


def test_perfect_detections_score_one(ground_truth):
    metrics, table = det_metrics.coco_evaluate(ground_truth, _perfect())
    assert set(metrics) == set(det_metrics.METRIC_NAMES)
    for name, value in metrics.items():
        assert value == pytest.approx(1.0, abs=1e-12), name
    assert "cat" in table and "100.00" in table


def test_detections_on_crowds_are_ignored(ground_truth):
    # A detection inside a crowd region (also on the crowd-only image) is neither TP nor FP.
    extra = [(12, (10, 10, 60, 60), 0.95, 0), (14, (0, 0, 100, 100), 0.99, 1)]
    metrics, _ = det_metrics.coco_evaluate(ground_truth, _detections(extra + _rows(_perfect())))
    assert metrics["AP"] == pytest.approx(1.0, abs=1e-12)


def _rows(d):
    return list(zip(d.image_ids, map(tuple, d.boxes), d.scores, d.classes))


def test_shift_to_iou_0_6_gives_ap50_one_ap75_zero():
    # Square boxes of side 40 shifted by 10 px: IoU = 30*40 / (2*1600 - 1200) = 0.6 exactly.
    images = [(1, (100, 200), [(10, 10, 50, 50, 0, False), (100, 40, 140, 80, 1, False)])]
    gt = det_metrics.coco_ground_truth(_annotations(images), CATEGORY_IDS[:2], NAMES[:2])
    shifted = _detections([(1, (20, 10, 60, 50), 0.9, 0), (1, (110, 40, 150, 80), 0.8, 1)])
    metrics, _ = det_metrics.coco_evaluate(gt, shifted)
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP75"] == 0.0
    # COCOeval matches when IoU >= threshold: at 0.50, 0.55 and 0.60 of the 10 thresholds.
    from pycocotools.cocoeval import Params
    assert Params("bbox").iouThrs[2] == 0.6
    assert metrics["AP"] == pytest.approx(0.3)


def test_half_of_one_class_missing():
    boxes = [(10 + 30 * k, 10, 30 + 30 * k, 40, 0, False) for k in range(4)] + \
            [(10 + 30 * k, 60, 30 + 30 * k, 90, 1, False) for k in range(4)]
    images = [(5, (120, 140), boxes)]
    gt = det_metrics.coco_ground_truth(_annotations(images), CATEGORY_IDS[:2], NAMES[:2])
    rows = [(5, b[:4], 0.9, b[4]) for b in boxes if b[4] == 0] + [(5, b[:4], 0.9, 1) for b in boxes[4:6]]
    metrics, table = det_metrics.coco_evaluate(gt, _detections(rows))
    # Class 1: recall 0.5 at precision 1 -> 51 of the 101 recall points (0 .. 0.50) have precision 1.
    expected = (1.0 + 51 / 101) / 2
    assert metrics["AP"] == pytest.approx(expected) and metrics["AP50"] == pytest.approx(expected)
    assert "50.50" in table.splitlines()[2]


def test_false_positive_low_score_costs_nothing_high_score_costs_a_fifth():
    boxes = [(10 + 30 * k, 10, 30 + 30 * k, 40, 0, False) for k in range(4)]
    gt = det_metrics.coco_ground_truth(_annotations([(1, (60, 140), boxes)]), CATEGORY_IDS[:1], NAMES[:1])
    hits = [(1, b[:4], 0.9, 0) for b in boxes]
    low = det_metrics.coco_evaluate(gt, _detections(hits + [(1, (0, 45, 20, 60), 0.1, 0)]))[0]
    assert low["AP"] == pytest.approx(1.0)
    # Ranked first, the false positive makes the precision k/(k+1) after k hits; interpolated
    # (max to the right) it is 4/5 at every recall level.
    high = det_metrics.coco_evaluate(gt, _detections(hits + [(1, (0, 45, 20, 60), 0.99, 0)]))[0]
    assert high["AP"] == pytest.approx(0.8) and high["AP50"] == pytest.approx(0.8)


def test_no_detections_gives_zero(ground_truth):
    metrics, table = det_metrics.coco_evaluate(ground_truth, det_metrics.Detections.empty())
    assert all(v == 0.0 for v in metrics.values()), metrics
    assert "0.00" in table


def test_size_range_without_ground_truth_is_nan():
    gt = det_metrics.coco_ground_truth(_annotations([(1, (100, 100), [(10, 10, 30, 30, 0, False)])]),
                                       CATEGORY_IDS[:1], NAMES[:1])
    metrics, _ = det_metrics.coco_evaluate(gt, _detections([(1, (10, 10, 30, 30), 0.5, 0)]))
    assert metrics["AP"] == pytest.approx(1.0) and metrics["APs"] == pytest.approx(1.0)
    assert math.isnan(metrics["APm"]) and math.isnan(metrics["APl"])


def test_category_mapping_round_trips(ground_truth):
    # Every detection with its class shifted by one lands on another category: nothing matches.
    wrong = _perfect()
    wrong = det_metrics.Detections(wrong.image_ids, wrong.boxes, wrong.scores, (wrong.classes + 1) % 3)
    assert det_metrics.coco_evaluate(ground_truth, wrong)[0]["AP"] == 0.0
    dt = det_metrics._detection_dataset(ground_truth, _perfect())
    assert {a["category_id"] for a in dt["annotations"]} == set(CATEGORY_IDS)


def test_same_result_as_pycocotools_load_res(ground_truth):
    """Our detection dataset equals what COCO.loadRes builds: identical COCOeval stats."""
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    perfect = _perfect()
    jitter = rng.normal(0, 6, perfect.boxes.shape)
    noisy = np.concatenate([perfect.boxes + jitter, rng.uniform(0, 150, (10, 2)) @ [[1, 0, 1, 0], [0, 1, 0, 1]]
                            + [0, 0, 40, 30]])
    ids = np.concatenate([perfect.image_ids, rng.choice([10, 11, 12, 13, 14], 10)])
    dets = det_metrics.Detections(ids, noisy, rng.uniform(0, 1, len(ids)), rng.integers(0, 3, len(ids)))
    ours = det_metrics.coco_evaluate(ground_truth, dets)[0]

    gt = det_metrics._coco(ground_truth)
    results = [{"image_id": int(i), "category_id": CATEGORY_IDS[int(c)],
                "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])], "score": float(s)}
               for i, b, s, c in zip(dets.image_ids, dets.boxes, dets.scores, dets.classes)]
    with contextlib.redirect_stdout(io.StringIO()):
        official = COCOeval(gt, gt.loadRes(results), "bbox")
        official.evaluate()
        official.accumulate()
        official.summarize()
    for k, name in enumerate(det_metrics.METRIC_NAMES):
        expected = official.stats[k] if official.stats[k] >= 0 else float("nan")
        assert ours[name] == pytest.approx(expected, nan_ok=True), name
    assert 0.1 < ours["AP"] < 0.9   # a case where matching really is exercised


def test_detections_from_batch_undo_the_letterbox():
    batch = {"image_id": np.array([7, 8, 7]), "scale": np.array([0.5, 2.0, 0.5], np.float32),
             "orig_hw": np.array([[100, 200], [30, 40], [100, 200]], np.int32), "mask": np.array([1, 1, 0])}
    boxes = np.array([[[10, 10, 20, 30], [0, 0, 150, 60]], [[2, 4, 6, 8], [1, 1, 2, 2]], [[1, 1, 2, 2]] * 2], np.float32)
    scores = np.array([[0.9, 0.8], [0.7, 0.6], [0.5, 0.4]])
    classes = np.array([[0, 1], [2, 0], [1, 1]])
    valid = np.array([[True, True], [True, False], [True, True]])
    d = det_metrics.detections_from_batch(batch, boxes, scores, classes, valid)
    assert d.image_ids.tolist() == [7, 7, 8]                        # padding row and invalid entry gone
    np.testing.assert_allclose(d.boxes, [[20, 20, 40, 60], [0, 0, 200, 100], [1, 2, 3, 4]])  # /scale, clipped
    np.testing.assert_allclose(d.scores, [0.9, 0.8, 0.7])
    assert d.classes.tolist() == [0, 1, 2]


def test_unknown_image_or_class_is_an_error(ground_truth):
    with pytest.raises(ValueError, match="image ids"):
        det_metrics.coco_evaluate(ground_truth, _detections([(99, (0, 0, 1, 1), 0.5, 0)]))
    with pytest.raises(ValueError, match="classes"):
        det_metrics.coco_evaluate(ground_truth, _detections([(10, (0, 0, 1, 1), 0.5, 3)]))
