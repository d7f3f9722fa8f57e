"""DetectionTask (evit_jax/tasks/detection.py) through the generic loop.

- the smoke config (EfficientViT-Det-B0 on `evit_det_shapes/tiny`) trains, evaluates and writes eval/AP...
  to metrics.jsonl; predict on its workdir draws labelled boxes and prints COCO-style JSON;
- finalize_eval on the ground truth fed back as records gives AP 1.0 (pycocotools), also with image ids
  beyond int32, and refuses records out of the split's order;
- the L1 term and the host's no-augmentation switch start at the same step;
- evaluation sharded over 4 devices equals one device (same records, same AP); 2 processes x 2 devices
  train like 1 process x 4 devices; resume after SIGKILL is exact (tiny stand-in detector,
  `tests/_train_helpers.py`, so that each run compiles in seconds);
- bad configs are one clear line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests import _train_helpers as h

sys.path.insert(0, h.REPO)
from configs import demo_det  # noqa: E402

STEPS = 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from evit_jax.data import sources

    path = str(tmp_path_factory.mktemp("det_data"))
    sources.get_info("evit_det_shapes/tiny", path)  # builds the 64-px variant once (about a second)
    return path


def smoke_config(data_dir, **data):
    config = demo_det.get_config("smoke")
    config.data.data_dir = data_dir
    for key, value in data.items():
        config.data[key] = value
    return config


def task_for(config):
    from evit_jax.tasks import get_task

    task = get_task(config)
    task.check_config()
    task.check_data()
    return task


# ---------------------------------------------------------------------------- end to end (real model)
def test_smoke_trains_evaluates_and_predict_draws_boxes(tmp_path, data_dir, capsys):
    from evit_jax import predict
    from evit_jax.data.synthetic_det import CATEGORY_IDS, CLASS_NAMES
    from evit_jax.train import loop

    config = smoke_config(data_dir)
    workdir = tmp_path / "run"
    results = loop.run(config, str(workdir))
    for prefix in ("eval", "eval_ema"):
        assert results[f"{prefix}/num_examples"] == 32.0       # 32 images, eval batch 12: last batch padded
        for name in ("AP", "AP50", "AP75", "APs", "APm"):
            assert 0.0 <= results[f"{prefix}/{name}"] <= 1.0
        assert np.isnan(results[f"{prefix}/APl"])               # no box larger than 96^2 px at 64 px
    records = h.read_metrics(str(workdir))
    assert all(np.isfinite(records[s]["train/loss"]) for s in range(1, config.total_steps + 1))
    # L1 on for the last 0.25 epochs = 2 of the 6 steps (step s logs the update of batch s - 1).
    assert [records[s]["train/l1_on"] for s in range(1, 7)] == [0, 0, 0, 0, 1, 1]
    final = records[config.total_steps]
    assert final["eval/AP50"] == results["eval/AP50"] and "eval_ema/AP" in final

    image = tmp_path / "scene.png"
    pixels = np.random.default_rng(0).integers(0, 256, size=(45, 71, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    out = tmp_path / "pred" / "boxes.png"
    capsys.readouterr()
    rc = predict.run(["--checkpoint", str(workdir), "--ema", "--score_threshold", "0", "--out", str(out), str(image)])
    assert rc == 0
    drawn = np.asarray(Image.open(out))
    assert drawn.shape == (45, 71, 3) and (drawn != pixels).any()    # at the input's size, boxes drawn
    detections = json.loads(capsys.readouterr().out)
    assert 0 < len(detections) <= config.postprocess.max_detections
    names = dict(zip(CATEGORY_IDS, CLASS_NAMES))
    for d in detections:
        assert d["image"] == str(image) and names[d["category_id"]] == d["category_name"]  # the dataset's mapping
        x, y, w, hgt = d["bbox"]
        assert 0 <= x <= x + w <= 71 and 0 <= y <= y + hgt <= 45 and 0 <= d["score"] <= 1
    assert [d["score"] for d in detections] == sorted((d["score"] for d in detections), reverse=True)


def test_predict_detection_errors_are_one_line(tmp_path, capsys):
    from evit_jax import predict

    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    assert predict.run(["--checkpoint", "hub:efficientvit_det_b1", str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no EfficientViT detection weights are published" in err
    assert predict.run(["--model", "efficientvit_det_b0", "--checkpoint", str(tmp_path), "--image_size", "100",
                        str(image)]) == 2
    assert "--image_size=100 is not a positive multiple of 32" in capsys.readouterr().err


# ---------------------------------------------------------------------------- evaluation
def _perfect_records(task, size):
    """The eval split's ground truth as the eval records a perfect detector would produce (boxes in
    letterboxed input pixels, one row per object, padded to 6 rows)."""
    from evit_jax.data import coco, det_transforms

    d = task.config.data
    annotations = coco.read_annotations(d.name, d.eval_split, task.data_dir)
    n, rows = len(annotations.image_ids), 6
    records = {"boxes": np.zeros((n, rows, 4), np.float32), "scores": np.zeros((n, rows), np.float32),
               "classes": np.full((n, rows), -1, np.int32), "valid": np.zeros((n, rows), bool),
               "image_id": annotations.image_ids.astype(np.int32), "scale": np.zeros(n, np.float32),
               "orig_hw": annotations.sizes.astype(np.int32)}
    for i, ((height, width), objects) in enumerate(zip(annotations.sizes, annotations.objects)):
        scale = det_transforms.letterbox_ratio(int(height), int(width), (size, size))
        k = len(objects["label"])
        assert 0 < k <= rows
        records["scale"][i] = scale
        records["boxes"][i, :k] = np.asarray(objects["bbox"]) * scale
        records["scores"][i, :k] = np.linspace(0.9, 0.5, k)
        records["classes"][i, :k] = objects["label"]
        records["valid"][i, :k] = True
    return records


def test_ground_truth_fed_back_as_records_scores_ap_1(data_dir):
    task = task_for(smoke_config(data_dir, eval_image_size=96))   # letterbox scale 1.5
    records = _perfect_records(task, 96)
    metrics = task.finalize_eval({"count": np.int64(32)}, records)
    for name in ("AP", "AP50", "AP75", "APs", "APm"):
        assert metrics[name] == pytest.approx(1.0, abs=1e-12), name
    assert np.isnan(metrics["APl"]) and metrics["num_examples"] == 32
    assert metrics["detections_per_image"] == pytest.approx(records["valid"].sum() / 32)
    # One class's boxes dropped: that class scores 0, the others 1 (pycocotools' mean over classes).
    dropped = dict(records, valid=records["valid"] & (records["classes"] != 2))
    present = len(set(records["classes"][records["valid"]].tolist()))
    assert task.finalize_eval({"count": np.int64(32)}, dropped)["AP"] == pytest.approx((present - 1) / present)


def test_image_ids_beyond_int32_come_from_the_ground_truth(data_dir):
    task = task_for(smoke_config(data_dir))
    ground_truth, ids = task._ground_truth
    offset = 3 * 2**32 + 7                                    # ids beyond int32 (and their low bits differ)
    big = {**ground_truth, "images": [dict(im, id=im["id"] + offset) for im in ground_truth["images"]],
           "annotations": [dict(a, image_id=a["image_id"] + offset) for a in ground_truth["annotations"]]}
    task.__dict__["_ground_truth"] = (big, ids + offset)
    records = _perfect_records(task, 64)
    records["image_id"] = (ids + offset).astype(np.int32)     # what int32 eval batches carry: the low 32 bits
    assert not np.array_equal(records["image_id"], ids)
    detections = task.detections_from_records(records)
    assert set(detections.image_ids.tolist()) == set((ids + offset).tolist())
    assert task.finalize_eval({"count": np.int64(32)}, records)["AP"] == pytest.approx(1.0)
    swapped = {k: v[::-1] for k, v in records.items()}
    with pytest.raises(ValueError, match="not in the split's order"):
        task.detections_from_records(swapped)
    with pytest.raises(ValueError, match="records for 31 images"):
        task.detections_from_records({k: v[1:] for k, v in records.items()})


def test_eval_batch_contract(data_dir):
    task = task_for(smoke_config(data_dir))
    (key,) = task.eval_batch_keys()
    spec = task.eval_batch_spec(12, key)
    batch = next(iter(task.eval_iterator(12)))
    assert set(batch) == set(spec)
    for k, s in spec.items():
        assert batch[k].shape == s.shape, k
    assert batch["image"].dtype == np.uint8 and batch["scale"].dtype == np.float32
    # int64 on the host; the loop casts to the spec's int32 (ids beyond int32: the test above)
    assert np.array_equal(batch["image_id"].astype(np.int32), task._ground_truth[1][:12].astype(np.int32))


# ---------------------------------------------------------------------------- the no-augmentation phase
def test_l1_term_and_host_switch_start_at_the_same_step(data_dir):
    from evit_jax.data import pipeline
    from evit_jax.models.det import detection_grid
    from evit_jax.tasks import det_loss

    task = task_for(smoke_config(data_dir))
    # 6 steps of 8 images; the last 0.25 epochs of 64 images = 2 steps.
    assert task.no_aug_start_step() == 4
    switch = task.scheduled_train_transform()    # what train_iterator runs
    assert isinstance(switch, pipeline.SwitchAtStep) and switch.step == 4
    assert switch.before.mosaic_prob == switch.before.mixup_prob == 0.5
    assert switch.after == switch.before.without_mosaic() and switch.after.mosaic_prob == switch.after.mixup_prob == 0
    no_mixing = task_for(smoke_config(data_dir, mosaic_prob=0.0, mixup_prob=0.0))
    assert not isinstance(no_mixing.scheduled_train_transform(), pipeline.SwitchAtStep)   # nothing to switch off

    rng = np.random.default_rng(0)
    grid = detection_grid(64, 64)
    outputs = jnp.asarray(rng.normal(size=(2, len(grid), 5 + 6)).astype(np.float32))
    xy = rng.uniform(0, 40, size=(2, 3, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(8, 24, size=(2, 3, 2))], -1).astype(np.float32)
    targets = {"boxes": jnp.asarray(boxes), "classes": jnp.asarray(rng.integers(0, 6, (2, 3)), jnp.int32),
               "box_mask": jnp.asarray([[1, 1, 0], [1, 0, 0]], jnp.int32), "grid": grid}

    @jax.jit   # one compilation for everything
    def losses(outputs, targets):
        args = (outputs, grid, targets["boxes"], targets["classes"], targets["box_mask"])
        references = [det_loss.yolox_loss(*args, use_l1=l1)[0] for l1 in (False, True)]
        steps = [task.train_loss_and_metrics(outputs, targets, jnp.int32(s))[0] for s in (0, 3, 4, 5)]
        return references, steps

    (without, with_l1), steps = jax.device_get(losses(outputs, targets))
    assert with_l1 > without
    np.testing.assert_allclose(steps, [without, without, with_l1, with_l1], rtol=1e-6)


def test_switch_at_step_follows_the_batch_step_on_any_process_count():
    from evit_jax.data import pipeline

    source = [{"i": i} for i in range(10)]
    switch = pipeline.SwitchAtStep(_Tag(0), _Tag(1), step=3)

    def phases(process_count):
        its = [pipeline.make_train_iterator(source, switch, global_batch_size=4, image_sizes=8, seed=0,
                                            process_index=p, process_count=process_count) for p in range(process_count)]
        return [np.concatenate([next(it)["phase"] for it in its]).tolist() for _ in range(5)]

    expected = [[0] * 4] * 3 + [[1] * 4] * 2
    assert phases(1) == phases(2) == expected


class _Tag:
    """A train transform that only says which one it is (picklable)."""

    def __init__(self, phase):
        self.phase = phase

    def __call__(self, example, size, rng):
        return {"phase": np.int32(self.phase)}


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("override,message", [
    ({"model.name": "efficientvit_b0"}, "is a classification model; the detection task needs one of"),
    ({"data.image_sizes": (64, 80)}, "image size (80, 80) is not a positive multiple of 32"),
    ({"data.eval_image_size": 100}, "image size (100, 100) is not a positive multiple of 32"),
    ({"data.max_boxes": 0}, "config.data.max_boxes=0 must be >= 1"),
    ({"data.mosaic_prob": 1.5}, "config.data.mosaic_prob=1.5 must lie in [0, 1]"),
    ({"data.mosaic_scale": (2.0, 1.0)}, "config.data.mosaic_scale=(2.0, 1.0) must satisfy 0 < min <= max"),
    ({"data.no_aug_epochs": -1.0}, "config.data.no_aug_epochs=-1.0 must be >= 0"),
    ({"loss.assigner": "simota"}, "config.loss.assigner='simota'"),
    ({"postprocess.iou_threshold": 2.0}, "config.postprocess: iou_threshold must lie in [0, 1]"),
    ({"postprocess.max_detections": 0}, "config.postprocess: pre_nms_top_k and max_detections must be >= 1"),
])
def test_bad_config_is_one_clear_error(override, message):
    from evit_jax.tasks import get_task

    config = demo_det.get_config("smoke")
    for key, value in override.items():
        section, name = key.split(".")
        config[section][name] = value
    with pytest.raises(ValueError) as e:
        get_task(config).check_config()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_config_through_main_is_one_line_and_writes_nothing(tmp_path, data_dir):
    work = tmp_path / "w"
    result = h.run_main(str(work), data_dir, "--config.model.name=efficientvit_seg_b0_cityscapes",
                        "--config.optim.name=lamb", config="configs/demo_det.py:smoke", tiny=False, timeout=120)
    assert result.returncode == 2
    line = h.last_error_line(result)
    assert line == ("error: config.optim.name='lamb' is unknown; use one of ('adamw', 'sgd')."), line
    result = h.run_main(str(work), data_dir, "--config.model.name=efficientvit_seg_b0_cityscapes",
                        config="configs/demo_det.py:smoke", tiny=False, timeout=120)
    assert result.returncode == 2
    assert "is a segmentation model; the detection task needs one of" in h.last_error_line(result)
    assert not work.exists()


def test_classification_dataset_is_refused(data_dir):
    from evit_jax.tasks import get_task

    config = smoke_config(data_dir)
    config.data.name = "evit_shapes/tiny"
    with pytest.raises(ValueError, match="is a classification dataset, not detection"):
        get_task(config).check_data()


# ---------------------------------------------------------------------------- layouts (tiny stand-in detector)
def _overrides(*extra):
    # SGD with Nesterov momentum: the COCO recipe's optimizer (and its state across a resume). A small lr: the
    # tiny detector's first steps amplify float rounding (sums in another order on another layout) about
    # 100-fold per step at lr 1e-3, which would hide what the layout test compares.
    return (f"--config.total_steps={STEPS}", "--config.checkpoint.every_steps=3", "--config.data.no_aug_epochs=0.5",
            "--config.optim.name=sgd", "--config.optim.base_lr=1e-4", *extra)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """JAX's persistent compilation cache shared by the 1 x 4-device runs of this module: the reference,
    killed and resumed runs compile the same steps once (the same executables, so the same numbers)."""
    return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _run(workdir, data_dir, *overrides, devices=1, extra_env=None):
    return h.run_main(workdir, data_dir, *_overrides(*overrides), devices=devices, config="configs/demo_det.py:smoke",
                      tiny=h.TINY_DET, extra_env=extra_env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, compile_cache):
    """An uninterrupted run of STEPS steps on 1 process x 4 devices (its workdir)."""
    ref = str(tmp_path_factory.mktemp("ref") / "ref")
    result = _run(ref, data_dir, devices=4, extra_env=compile_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return ref


def test_resume_after_sigkill_is_exact(tmp_path, data_dir, reference, compile_cache):
    work = str(tmp_path / "killed")
    # SIGKILL once step 5 is logged (the save of step 3 complete, mosaic and mixup still on), before step 6.
    killed = _run(work, data_dir, devices=4, extra_env={**compile_cache, "EVIT_TEST_SIGKILL_AT_STEP": "5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert max(h.read_metrics(work)) == 5
    resumed = _run(work, data_dir, devices=4, extra_env=compile_cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from the checkpoint of step 3" in resumed.stderr
    h.assert_trees_equal(h.restore_raw_state(reference), h.restore_raw_state(work))   # params, BN, moments, EMA
    a, b = h.read_metrics(reference), h.read_metrics(work)
    for step in range(1, STEPS + 1):
        assert b[step]["train/loss"] == a[step]["train/loss"], step
        assert b[step]["train/l1_on"] == a[step]["train/l1_on"] == (step > STEPS - 4), step
    for key in ("eval/AP", "eval/AP50", "eval_ema/AP", "eval/detections_per_image"):
        assert b[STEPS][key] == a[STEPS][key], key


def test_two_processes_match_one_process(tmp_path, data_dir, reference):
    multi = str(tmp_path / "multi")
    proc, logs = h.run_local_processes(multi, data_dir, str(tmp_path / "logs"), *_overrides(), tiny=h.TINY_DET,
                                       config="configs/demo_det.py:smoke")
    assert proc.returncode == 0, logs
    a, b = h.read_metrics(reference), h.read_metrics(multi)
    for step in range(1, STEPS + 1):
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-6), step
        assert b[step]["train/num_fg"] == a[step]["train/num_fg"], step   # the same SimOTA assignment
    for key in ("eval/AP", "eval/AP50", "eval_ema/AP", "eval/detections_per_image", "eval/num_examples"):
        assert b[STEPS][key] == pytest.approx(a[STEPS][key], abs=1e-9), key
    sa, sb = h.restore_raw_state(reference), h.restore_raw_state(multi)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-7),
                           sa["params"], sb["params"])


def test_sharded_evaluation_equals_one_device(tmp_path, data_dir):
    """Random weights (scores spread over (0, 1)) evaluated on 1 and on 4 devices in one process
    (tests/_det_sharded_eval.py): the same records and the same COCO metrics."""
    out = tmp_path / "records"
    out.mkdir()
    result = subprocess.run([sys.executable, "-m", "tests._det_sharded_eval", data_dir, str(out)], cwd=h.REPO,
                            env=h.env_for(4), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, four = (dict(np.load(out / f"records_{n}.npz")) for n in (1, 4))
    metrics = {n: json.loads((out / f"metrics_{n}.json").read_text()) for n in (1, 4)}
    assert len(one["image_id"]) == 32 and one["valid"].sum() > 32   # every image, several detections each
    for key in ("image_id", "orig_hw", "classes", "valid"):
        np.testing.assert_array_equal(four[key], one[key], err_msg=key)
    np.testing.assert_array_equal(four["scale"], one["scale"])
    np.testing.assert_allclose(four["scores"], one["scores"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(four["boxes"], one["boxes"], rtol=1e-6, atol=1e-4)
    for key, value in metrics[1].items():
        assert metrics[4][key] == pytest.approx(value, abs=1e-12, nan_ok=True), key
    assert metrics[1]["eval/AP50"] >= 0 and metrics[1]["eval/detections_per_image"] > 1


def test_det_bench_runs_the_coco_recipe_on_random_batches_of_the_spec():
    """evit_jax/tools/det_bench.py (timed by hand, not here): its config is configs/coco.py's for the model at
    one size, and its random batches have the task's batch contract."""
    from evit_jax.tools import det_bench

    config = det_bench.bench_config("efficientvit_v1_det_b1", 4, 96, max_boxes=10)
    assert config.model.name == "efficientvit_v1_det_b1" and config.optim.name == "sgd"
    assert config.data.image_sizes == (96,) and config.data.eval_image_size == 96 and config.global_batch_size == 4
    from evit_jax.tasks import get_task

    task = get_task(config)
    task.check_config()
    task.use_published_facts()   # COCO's, as det_bench sets the loop up: nothing to read
    task.check_data()
    for batch, spec in ((det_bench.random_train_batch(4, 96, 10, 3, 80), task.train_batch_spec(4, (96, 96))),
                        (det_bench.random_eval_batch(4, 96), task.eval_batch_spec(4, (96, 96)))):
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (s.shape, s.dtype) for k, s in spec.items()}
    train = det_bench.random_train_batch(4, 96, 10, 3, 80)
    assert (train["box_mask"].sum(1) == 3).all()
    x1, y1, x2, y2 = np.moveaxis(train["boxes"], -1, 0)
    assert (x1 >= 0).all() and (x2 <= 96).all() and (x2 - x1 >= 8).all() and (y1 >= 0).all() and (y2 <= 96).all()
    with pytest.raises(ValueError, match="det_bench takes a detection model"):
        det_bench.bench_config("efficientvit_b1", 4, 96)


def test_init_from_classification_checkpoint_loads_only_the_backbone(data_dir, tmp_path):
    """`--config.init_from` an ImageNet B0 (the COCO recipe's start): only the backbone is taken, the
    neck and head keep their fresh initialisation; a detection checkpoint of this model loads whole."""
    from evit_jax.convert import save_variables
    from evit_jax.models import create_model
    from evit_jax.models.random_weights import random_variables

    def variables_of(name, **kwargs):  # structure is all that matters here: no initialiser is compiled
        return random_variables(create_model(name, **kwargs), (1, 64, 64, 3))

    task = task_for(smoke_config(data_dir))
    cls_vars = variables_of("efficientvit_b0")
    save_variables(cls_vars, tmp_path / "cls", "efficientvit_b0")
    loaded = task.load_init_variables(str(tmp_path / "cls"))
    assert set(loaded["params"]) == {"backbone"}
    assert (jax.tree_util.tree_structure(loaded["params"]["backbone"])
            == jax.tree_util.tree_structure(cls_vars["params"]["backbone"]))
    assert task.keeps_fresh_init("params/neck/x") and task.keeps_fresh_init("batch_stats/head/x")
    assert not task.keeps_fresh_init("params/backbone/x")

    det_vars = variables_of(task.model_name, num_classes=task.num_classes)
    save_variables(det_vars, tmp_path / "det", task.model_name, num_classes=task.num_classes)
    full = task.load_init_variables(str(tmp_path / "det"))
    assert set(full["params"]) == {"backbone", "neck", "head"} and not task.keeps_fresh_init("params/head/x")
