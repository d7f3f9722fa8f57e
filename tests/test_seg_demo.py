"""End to end: the segmentation smoke config trains through the generic loop, evaluates mIoU
into metrics.jsonl, and predict reads the resulting workdir. Also: every seg config parses."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import cityscapes, demo_seg  # noqa: E402


def test_seg_smoke_trains_and_evaluates_through_the_loop(tmp_path, capsys):
    from evit_jax import predict
    from evit_jax.train import loop

    config = demo_seg.get_config("smoke")
    config.data.data_dir = str(tmp_path / "data")
    workdir = tmp_path / "run"
    results = loop.run(config, str(workdir))

    assert results["eval/num_examples"] == 32.0            # 32 images, eval batch 12: last batch padded
    for prefix in ("eval", "eval_ema"):
        # mIoU is the mean IoU of the classes present in the split (absent ones are NaN).
        ious = [v for k, v in results.items() if k.startswith(f"{prefix}/iou/")]
        assert len(ious) == 7 and f"{prefix}/iou/background" in results
        assert results[f"{prefix}/miou"] == pytest.approx(float(np.nanmean(ious)))
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert train and all(np.isfinite(r["train/loss"]) for r in train)
    final = [r for r in records if "eval/miou" in r]
    assert final and final[-1]["step"] == config.total_steps

    image = tmp_path / "scene.png"
    Image.fromarray(np.full((45, 71, 3), 128, np.uint8)).save(image)
    out = tmp_path / "pred" / "m.png"
    rc = predict.run(["--model", config.model.name, "--checkpoint", str(workdir), "--ema",
                      "--out", str(out), str(image)])
    assert rc == 0
    assert np.asarray(Image.open(out)).shape == (45, 71, 3)
    printed = capsys.readouterr().out
    from evit_jax.data.synthetic_seg import CLASS_NAMES
    assert "45x71" in printed
    assert any(f"{name}:" in printed for name in CLASS_NAMES)  # class names from the workdir's dataset


def test_real_dataset_missing_is_one_clear_error(tmp_path):
    from evit_jax.train import loop

    config = cityscapes.get_config("b0")
    config.data.data_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="prepare it with"):
        loop.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()                  # nothing written before the error


def test_loop_starts_a_seg_model_from_a_classification_backbone(tmp_path):
    """init_from an ImageNet-style checkpoint: the loop takes the backbone, the head keeps its fresh init."""
    import jax
    from evit_jax.convert import save_variables
    from evit_jax.models import create_model
    from evit_jax.train import loop

    config = demo_seg.get_config("smoke")
    config.data.data_dir = str(tmp_path / "data")
    cls_model = create_model("efficientvit_b0")
    cls_vars = jax.jit(lambda k: cls_model.init(k, np.zeros((1, 32, 32, 3), np.float32), train=False))(jax.random.key(7))
    save_variables(jax.device_get(cls_vars), tmp_path / "cls", "efficientvit_b0")
    config.init_from = str(tmp_path / "cls")

    experiment = loop.setup_experiment(config)
    fresh = experiment.init_state()
    fresh_head = jax.device_get(fresh.params["head"])
    loaded = loop._load_variables(config, experiment.task)
    state = experiment.state_from_variables(fresh, loaded)

    for got, want in zip(jax.tree_util.tree_leaves(jax.device_get(state.params["backbone"])),
                         jax.tree_util.tree_leaves(cls_vars["params"]["backbone"])):
        np.testing.assert_array_equal(got, np.asarray(want))
    for got, want in zip(jax.tree_util.tree_leaves(jax.device_get(state.params["head"])),
                         jax.tree_util.tree_leaves(fresh_head)):
        np.testing.assert_array_equal(got, want)
