"""Fine-tuning on your own images, through the README commands (subprocesses):

    python -m evit_jax.data.prepare image_folder --name NAME --src DIR --data_dir D
    python -m evit_jax.main --config=configs/finetune.py:b0 --config.data.name=NAME \
        --config.init_from=weights.pt --workdir=W
    python -m evit_jax.predict --checkpoint W image.jpg

from a PyTorch checkpoint (official layout) of EfficientViT-B0 fine-tuned to 7 classes to a generated
3-class folder (small resolution, a few steps): the body is taken from the checkpoint, the classifier
is fresh and as wide as the folder has classes, top-1 is reported per class (metrics.jsonl and the
log), predict prints the folder's class names. Bad input on the main side: one line, exit code 2,
nothing written.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests import _train_helpers as h

CLASSES = ("apple", "banana split", "cherry")  # one name with a space: metric keys keep it
NAME = "mini_fruit"
FAST = ("--config.data.image_sizes=(32,)", "--config.data.eval_image_size=32", "--config.total_steps=3",
        "--config.global_batch_size=8", "--config.eval_batch_size=8", "--config.reset_bn.global_batch_size=8",
        "--config.model.conv_impl=lax", "--config.checkpoint.every_steps=0", "--config.tensorboard=False")


def _write_folder(root):
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        os.makedirs(os.path.join(root, name))
        for i in range(8):
            pixels = np.clip(rng.normal(60 + 70 * c, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, name, f"{i}.jpg"), quality=92)


def _random_weights(model_name, seed, num_classes=None):
    from evit_jax.models import create_model
    from evit_jax.models.random_weights import random_variables

    return random_variables(create_model(model_name, num_classes=num_classes), (1, 32, 32, 3), seed=seed)


def _save_pt(torch, path, variables, model_name, num_classes=None):
    from evit_jax import convert

    state = convert.flax_to_torch(variables, model_name, layout="official", num_classes=num_classes)
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in state.items()}}, path)


def _cli(*args, devices=1, timeout=600):
    return subprocess.run([sys.executable, "-m", *args], cwd=h.REPO, env=h.env_for(devices), capture_output=True,
                          text=True, timeout=timeout)


def _main(workdir, data_dir, *overrides, arg="b0"):
    return _cli("evit_jax.main", f"--config=configs/finetune.py:{arg}", f"--workdir={workdir}",
                f"--config.data.data_dir={data_dir}", *overrides)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, torch):
    root = tmp_path_factory.mktemp("finetune")
    src, data_dir = str(root / "images"), str(root / "tfds")
    _write_folder(src)
    result = _cli("evit_jax.data.prepare", "image_folder", f"--name={NAME}", f"--src={src}", f"--data_dir={data_dir}",
                  "--val_fraction=0.25")
    assert result.returncode == 0, result.stderr[-3000:]
    pretrained = _random_weights("efficientvit_b0", seed=1, num_classes=7)  # another class count
    weights = str(root / "efficientvit_b0_7_classes.pt")
    _save_pt(torch, weights, pretrained, "efficientvit_b0", num_classes=7)
    return root, src, data_dir, weights, pretrained


@pytest.fixture(scope="module")
def finetuned(prepared):
    root, src, data_dir, weights, _ = prepared
    workdir = str(root / "run")
    result = _main(workdir, data_dir, f"--config.data.name={NAME}", f"--config.init_from={weights}", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_finetune_takes_the_body_and_a_fresh_classifier_of_the_folder_width(prepared, finetuned):
    _, _, _, _, pretrained = prepared
    workdir, result = finetuned
    assert "Kept the fresh initialisation of 2 variables" in result.stderr  # the classifier's kernel and bias
    state = h.restore_raw_state(workdir)
    head = state["params"]["head"]["op_list_3"]["linear"]
    assert head["kernel"].shape == (1280, len(CLASSES)) and head["bias"].shape == (len(CLASSES),)
    # Three steps at a fine-tuning learning rate leave the body next to the checkpoint's weights.
    body = state["params"]["backbone"]["stages_3_op_list_1"]["context_module"]["main"]["qkv"]["conv"]["kernel"]
    loaded = np.asarray(pretrained["params"]["backbone"]["stages_3_op_list_1"]["context_module"]["main"]["qkv"]["conv"]["kernel"])
    assert np.abs(body - loaded).max() < 1e-3 < np.abs(loaded).max()


def test_finetune_reports_top1_per_class(finetuned):
    workdir, result = finetuned
    metrics = h.read_metrics(workdir)[3]
    for prefix in ("eval", "eval_ema"):
        per_class = {k.split("/", 2)[2]: v for k, v in metrics.items() if k.startswith(f"{prefix}/top1/")}
        assert set(per_class) == set(CLASSES)
        assert all(0.0 <= v <= 100.0 for v in per_class.values())
        # 2 validation images per class: the overall top-1 is the mean of the per-class ones.
        assert metrics[f"{prefix}/top1"] == pytest.approx(np.mean(list(per_class.values())))
    table = result.stderr[result.stderr.rindex("top1  "):]
    assert all(name in table for name in CLASSES)
    final = [line for line in result.stdout.splitlines() if line.startswith("FINAL ")]
    assert final and "/top1/" not in final[0]  # the summary line keeps the overall metrics
    config = json.load(open(os.path.join(workdir, "run_info.json")))["config"]
    assert config["reinit_classifier"] and config["model"]["num_classes"] == -1


def test_predict_prints_the_folder_class_names(prepared, finetuned):
    _, src, _, _, _ = prepared
    workdir, _ = finetuned
    image = os.path.join(src, "cherry", "0.jpg")
    result = _cli("evit_jax.predict", "--checkpoint", workdir, image)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == f"{image}:"
    assert sorted(line.split(". ", 1)[1].split(" (class")[0] for line in lines[1:]) == sorted(CLASSES)


# ---------------------------------------------------------------------------- bad input
def _assert_one_line_nothing_written(result, workdir, *fragments):
    assert result.returncode == 2, result.stderr[-3000:]
    line = h.last_error_line(result)
    assert line.startswith("error: ") and all(f in line for f in fragments), line
    assert not os.path.exists(workdir)


def test_dataset_not_prepared_or_not_named(prepared, tmp_path):
    _, _, data_dir, weights, _ = prepared
    workdir = str(tmp_path / "w")
    result = _main(workdir, data_dir, "--config.data.name=no_such_folder", f"--config.init_from={weights}", *FAST)
    _assert_one_line_nothing_written(result, workdir, "no_such_folder", "evit_jax.data.prepare image_folder")
    result = _main(workdir, data_dir, f"--config.init_from={weights}", *FAST)
    _assert_one_line_nothing_written(result, workdir, "config.data.name is empty", "--config.data.name=NAME")


def test_checkpoint_of_another_variant(prepared, tmp_path, torch):
    root, _, data_dir, _, _ = prepared
    other = str(root / "efficientvit_b1_r224.pt")
    _save_pt(torch, other, _random_weights("efficientvit_b1", seed=2), "efficientvit_b1")
    workdir = str(tmp_path / "w")
    result = _main(workdir, data_dir, f"--config.data.name={NAME}", f"--config.init_from={other}", *FAST)
    _assert_one_line_nothing_written(result, workdir, "efficientvit_b1", "efficientvit_b0")
    result = _main(workdir, data_dir, f"--config.data.name={NAME}", "--config.init_from=hub:efficientvit_b2", *FAST)
    _assert_one_line_nothing_written(result, workdir, "hub:efficientvit_b2", "efficientvit_b2 weights",
                                     "efficientvit_b0")
