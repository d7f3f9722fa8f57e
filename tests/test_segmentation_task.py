"""SegmentationTask: exact bicubic-to-label-size in padded batches, ignore-aware loss, eval
statistics with padding, backbone-only init, config checks, and sharded == single-device eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evit_jax import interpolation
from evit_jax.data import seg_transforms
from evit_jax.models.resize import bicubic_matrix, resize_bicubic
from evit_jax.tasks import segmentation as seg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from evit_jax.data import sources

    path = str(tmp_path_factory.mktemp("seg_data"))
    sources.get_info("evit_seg_shapes/tiny", path)  # builds the 64-px variant once (a few seconds)
    return path


def smoke_config(data_dir):
    sys.path.insert(0, REPO)
    from configs import demo_seg

    config = demo_seg.get_config("smoke")
    config.data.data_dir = data_dir
    return config


# ---------------------------------------------------------------------------- device math
@pytest.mark.parametrize("n_in,n_out", [(16, 64), (5, 37), (12, 12), (40, 7), (1, 9)])
def test_bicubic_matrices_match_torch_equivalent_resize(n_in, n_out):
    padded_in, padded_out = n_in + 3, n_out + 5
    m = np.asarray(seg.bicubic_matrices(jnp.array([n_in, 0]), jnp.array([n_out, 0]), padded_in, padded_out))
    np.testing.assert_allclose(m[0, :n_out, :n_in], bicubic_matrix(n_in, n_out), atol=1e-5)
    assert not m[0, n_out:].any() and not m[0, :, n_in:].any()   # padding never leaks
    assert not m[1].any()                                         # a padding example gives zeros
    np.testing.assert_allclose(m[0, :n_out, :n_in],
                               interpolation.interpolation_matrix(n_in, n_out, "bicubic"), atol=1e-5)


def test_upsampled_argmax_equals_resize_of_the_valid_region():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 8, 12, 5)).astype(np.float32)          # stride 8 of a 64x96 canvas
    image_hw = np.array([[64, 96], [40, 56]], np.int32)                 # example 1 is padded
    label_hw = np.array([[70, 90], [33, 61]], np.int32)
    pred = np.asarray(seg.upsampled_argmax(jnp.asarray(logits), jnp.asarray(image_hw), jnp.asarray(label_hw),
                                           (72, 96), row_chunk=16))
    for b in range(2):
        (ih, iw), (lh, lw) = image_hw[b] // 8, label_hw[b]
        ref = np.argmax(np.asarray(resize_bicubic(jnp.asarray(logits[b:b + 1, :ih, :iw]), (lh, lw)))[0], -1)
        np.testing.assert_array_equal(pred[b, :lh, :lw], ref)


def test_loss_ignores_255_pixels():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 4, 4, 3)).astype(np.float32))
    labels = rng.integers(0, 3, size=(2, 4, 4)).astype(np.int32)
    labels[0, :2] = 255
    labels[1, :, 3] = 255
    loss, count = seg.pixel_cross_entropy(logits, jnp.asarray(labels), 255)
    valid = labels != 255
    logp = jax.nn.log_softmax(logits, -1)
    expected = -np.mean(np.take_along_axis(np.asarray(logp), np.where(valid, labels, 0)[..., None], -1)[..., 0][valid])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    assert int(count) == valid.sum()
    grad = jax.grad(lambda x: seg.pixel_cross_entropy(x, jnp.asarray(labels), 255)[0])(logits)
    assert not np.asarray(grad)[~valid].any()      # ignored pixels get no gradient
    assert np.abs(np.asarray(grad)[valid]).sum() > 0


def test_train_loss_upsamples_logits_to_the_crop(data_dir):
    config = smoke_config(data_dir)
    task = seg.SegmentationTask(config)
    logits = jnp.zeros((1, 8, 8, task.num_classes)).at[..., 2].set(5.0)
    labels = jnp.full((1, 64, 64), 2, jnp.int32).at[0, :10].set(255)
    loss, metrics = task.loss_and_metrics(logits, labels)
    assert float(metrics["pixel_acc"]) == 100.0
    assert float(loss) < 0.05
    all_ignored = jnp.full((1, 64, 64), 255, jnp.int32)
    assert float(task.loss_and_metrics(logits, all_ignored)[0]) == 0.0


def test_eval_statistics_skip_padding_examples_and_ignored_pixels(data_dir):
    task = seg.SegmentationTask(smoke_config(data_dir))
    c = task.num_classes
    logits = jnp.zeros((2, 8, 8, c)).at[..., 1].set(3.0)                 # predicts class 1 everywhere
    labels = jnp.full((2, 64, 64), 1, jnp.int32).at[0, :32].set(255)
    targets = {"label": labels, "image_hw": jnp.array([[64, 64], [0, 0]], jnp.int32),
               "label_hw": jnp.array([[64, 64], [0, 0]], jnp.int32)}
    stats = jax.device_get(task.eval_statistics(logits, targets, jnp.array([1, 0], jnp.int32)))
    assert int(stats["count"]) == 1
    assert int(stats["intersection"][1]) == 32 * 64 and int(stats["union"][1]) == 32 * 64
    assert int(np.sum(stats["union"])) == 32 * 64
    metrics = task.finalize_eval({k: np.asarray(v, np.int64) for k, v in stats.items()})
    assert metrics["miou"] == 1.0 and metrics["iou/disc"] == 1.0 and np.isnan(metrics["iou/background"])


# ---------------------------------------------------------------------------- config checks
def test_check_rejects_bad_configs(data_dir):
    config = smoke_config(data_dir)
    task = seg.SegmentationTask(config)
    task.check_config()
    task.check_data()
    for key, value, message in [
        ("model.name", "efficientvit_b0", "classification model"),
        ("model.name", "efficientvit_seg_b9_cityscapes", "unknown model"),
        ("loss.upsample", "nearest", "upsample"),
        ("data.eval_protocol", "voc", "eval_protocol"),
        ("data.image_sizes", [48], "multiple of 32"),
    ]:
        bad = smoke_config(data_dir)
        section, name = key.split(".")
        with bad.unlocked():
            bad[section][name] = value
        with pytest.raises(ValueError, match=message):
            seg.SegmentationTask(bad).check_config()
    bad = smoke_config(data_dir)
    bad.data.eval_split = "test"
    with pytest.raises(ValueError, match="no split"):
        seg.SegmentationTask(bad).check_data()


def test_keys_the_task_does_not_read_are_rejected(data_dir):
    """A classification-only key (the task would silently ignore it) is one clear error, as is a
    config built for another task."""
    from evit_jax.tasks.config import base_config

    bad = smoke_config(data_dir)
    with bad.unlocked():
        bad.data.rrc_scale_min = 0.5
    with pytest.raises(ValueError, match="data.rrc_scale_min are not read by the segmentation task"):
        seg.SegmentationTask(bad).check_config()
    cls_config = base_config("classification")
    with cls_config.unlocked():
        cls_config.task = "segmentation"
    with pytest.raises(ValueError, match="not read by the segmentation task"):
        seg.SegmentationTask(cls_config).check_config()


def test_check_reports_a_missing_dataset(tmp_path):
    config = smoke_config(str(tmp_path))
    config.data.name = "cityscapes"
    with pytest.raises(FileNotFoundError, match="prepare"):
        seg.SegmentationTask(config).check_data()


# ---------------------------------------------------------------------------- init_from
def test_init_from_classification_checkpoint_loads_only_the_backbone(data_dir, tmp_path):
    from evit_jax.convert import save_variables
    from evit_jax.models import create_model
    from evit_jax.models.random_weights import random_variables

    config = smoke_config(data_dir)
    task = seg.SegmentationTask(config)

    def init(name):  # structure is all that matters here: no initialiser is compiled
        return random_variables(create_model(name), (1, 64, 64, 3))

    cls_vars = init("efficientvit_b0")
    save_variables(cls_vars, tmp_path / "cls", "efficientvit_b0")
    loaded = task.load_init_variables(str(tmp_path / "cls"))
    assert set(loaded["params"]) == {"backbone"}
    leaves = jax.tree_util.tree_leaves(loaded["params"]["backbone"])
    assert len(leaves) == len(jax.tree_util.tree_leaves(cls_vars["params"]["backbone"]))
    assert task.keeps_fresh_init("params/head/middle_op_list_0/x") and not task.keeps_fresh_init("params/backbone/x")

    seg_vars = init("efficientvit_seg_b0_cityscapes")
    save_variables(seg_vars, tmp_path / "seg", "efficientvit_seg_b0_cityscapes")
    with pytest.raises(ValueError, match="reinit_classifier"):   # 19 Cityscapes classes, the task has 7
        task.load_init_variables(str(tmp_path / "seg"))
    with config.unlocked():
        config.reinit_classifier = True
    full = task.load_init_variables(str(tmp_path / "seg"))
    assert set(full["params"]) == {"backbone", "head"} and not task.keeps_fresh_init("params/head/x")
    assert task.is_classifier_param("head/output_ops_0_op_list_1/conv/bias")

    other = init("efficientvit_b1")
    save_variables(other, tmp_path / "b1", "efficientvit_b1")
    with pytest.raises(ValueError, match="fits neither"):
        task.load_init_variables(str(tmp_path / "b1"))


# ---------------------------------------------------------------------------- sharded eval
_EVAL_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {repo!r})
    import numpy as np
    from configs import demo_seg
    from evit_jax.train import loop
    config = demo_seg.get_config("smoke")
    config.data.data_dir = {data_dir!r}
    config.eval_batch_size = 12          # 32 validation images: 3 batches, the last one padded
    config.tensorboard = False
    experiment = loop.setup_experiment(config)
    state = experiment.init_state()
    results = loop.evaluate(experiment, state, include_ema=False)
    print("RESULT " + json.dumps(results))
""")


def _sharded_eval(devices: int, data_dir: str) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _EVAL_SCRIPT.format(repo=REPO, data_dir=data_dir)],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_eval_on_4_devices_equals_one_device(data_dir):
    one = _sharded_eval(1, data_dir)
    four = _sharded_eval(4, data_dir)
    assert one["eval/num_examples"] == four["eval/num_examples"] == 32
    assert set(one) == set(four)
    for key in one:
        np.testing.assert_allclose(four[key], one[key], rtol=0, atol=1e-12, err_msg=key)


# ---------------------------------------------------------------------------- exact ADE20K eval
# (height, width) of the tiny ADE20K validation images. Under the ADE20K protocol with a 64-px
# short side they need four model input sizes: 64x64 (1 image), 64x96 (4 images with three
# different label sizes), 96x64 (1) and 128x64 (1).
ADE_VAL_SIZES = [(40, 56), (56, 40), (40, 60), (48, 48), (40, 56), (64, 40), (40, 52)]
ADE_INPUTS = [(64, 64), (64, 96), (64, 96), (96, 64), (128, 64)]   # of the 5 eval batches of 2


@pytest.fixture(scope="module")
def ade_data_dir(tmp_path_factory):
    from PIL import Image

    from evit_jax.data import prepare

    root = tmp_path_factory.mktemp("ade")
    src = root / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    for split, prefix, sizes in (("training", "train", [(48, 64)]), ("validation", "val", ADE_VAL_SIZES)):
        for k, (h, w) in enumerate(sizes):
            stem = f"ADE_{prefix}_{k + 1:08d}"
            # Smooth images (a gradient plus noise) so that the model's outputs vary over the image.
            yy, xx = np.mgrid[0:h, 0:w]
            image = (np.stack([yy * 255 // h, xx * 255 // w, (yy + xx) % 256], -1)
                     + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)
            raw = rng.integers(0, 151, (h, w), dtype=np.uint8)
            for folder, array, ext in (("images", image, "jpg"), ("annotations", raw, "png")):
                path = src / folder / split / f"{stem}.{ext}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path)
    data_dir = str(root / "data")
    prepare.prepare("ade20k", data_dir, str(src))
    return data_dir


def ade_config(data_dir):
    sys.path.insert(0, REPO)
    from configs import ade20k

    config = ade20k.get_config("b1")
    config.model.name = "efficientvit_seg_b0_cityscapes"   # the smallest seg model, with ADE's 150 classes
    config.model.dtype = "float32"
    config.model.drop_path_rate = 0.0
    config.data.data_dir = data_dir
    config.data.image_sizes = [(64, 64)]
    config.data.eval_crop_size = 64        # short side 64, long side rounded up to a multiple of 32
    config.data.num_workers = 0
    config.eval_batch_size = 2
    config.tensorboard = False
    return config


def test_image_sizes_come_from_the_headers(ade_data_dir):
    from evit_jax.data import sources

    sizes = sources.image_sizes("ade20k", "validation", ade_data_dir)
    source = sources.get_source("ade20k", "validation", ade_data_dir)
    assert sizes.shape == (len(ADE_VAL_SIZES), 2)
    assert [tuple(s) for s in sizes] == [source[i]["image"].shape[:2] for i in range(len(source))]
    assert sorted(map(tuple, sizes)) == sorted(ADE_VAL_SIZES)


def test_ade20k_eval_batches_hold_one_input_size_and_no_image_padding(ade_data_dir):
    from evit_jax.tasks import get_task

    task = get_task(ade_config(ade_data_dir))
    batches = list(task.eval_iterator(2))
    assert [task.eval_batch_key(b)[0] for b in batches] == ADE_INPUTS
    assert sum(int(b["mask"].sum()) for b in batches) == len(ADE_VAL_SIZES)
    seen = []
    for b in batches:
        (h, w), (lh, lw) = task.eval_batch_key(b)
        for k in np.flatnonzero(b["mask"]):
            assert tuple(b["image_hw"][k]) == (h, w)        # the model sees the whole input, unpadded
            th, tw = b["label_hw"][k]
            assert th <= lh and tw <= lw and (b["label"][k, th:] == 255).all() and (b["label"][k, :, tw:] == 255).all()
            assert seg_transforms.ade20k_eval_size(int(th), int(tw), 64) == (h, w)
            seen.append((int(th), int(tw)))
    assert sorted(seen) == sorted(ADE_VAL_SIZES)
    # The label canvas of the 64x96 bucket is its largest label, 40x60.
    assert {task.eval_batch_key(b) for b in batches if task.eval_batch_key(b)[0] == (64, 96)} == {((64, 96), (40, 60))}


def test_ade20k_eval_equals_the_official_batch_one_protocol(ade_data_dir, torch):
    """loop.evaluate (bucketed batches of 2, one executable per input size) gives the same mIoU as
    running every image alone at its own size, upsampling with torch's bicubic and counting in numpy."""
    from evit_jax.data import sources
    from evit_jax.tasks import seg_metrics
    from evit_jax.data.transforms import normalize_images
    from evit_jax.train import loop
    from evit_jax.train.state import model_variables

    config = ade_config(ade_data_dir)
    experiment = loop.setup_experiment(config)
    state = experiment.init_state()
    # The fresh head predicts almost nothing (zero-initialised output); perturbed weights give
    # logits that vary over each image, and that padding the image would change (for about 40%
    # of the pixels here, through the global attention and the border convolutions).
    leaves, treedef = jax.tree_util.tree_flatten(state.params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    state = state.replace(params=jax.tree_util.tree_unflatten(
        treedef, [p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]))
    results = loop.evaluate(experiment, state, include_ema=False)
    assert len(experiment.eval_executables) == 4
    assert results["eval/num_examples"] == len(ADE_VAL_SIZES)

    variables = model_variables(state)
    forward = jax.jit(lambda v, x: experiment.model.apply(v, x, train=False))
    source = sources.get_source("ade20k", "validation", ade_data_dir)
    stats = {k: np.zeros(150, np.int64) for k in seg_metrics.STAT_KEYS}
    predicted_classes = set()
    for i in range(len(source)):
        record = source[i]
        example = seg_transforms.eval_transform(record["image"], record["segmentation_mask"], "ade20k", 64)
        logits = np.asarray(forward(variables, normalize_images(example["image"][None])))
        upsampled = torch.nn.functional.interpolate(torch.from_numpy(logits.copy()).permute(0, 3, 1, 2),
                                                    size=example["label"].shape, mode="bicubic",
                                                    align_corners=False)
        pred = upsampled.argmax(1)[0].numpy()
        predicted_classes.update(np.unique(pred).tolist())
        label = example["label"]
        valid = label != 255
        for c in range(150):
            p, t = (pred == c) & valid, (label == c) & valid
            stats["intersection"][c] += np.sum(p & t)
            stats["union"][c] += np.sum(p | t)
            stats["label_area"][c] += np.sum(t)
            stats["pred_area"][c] += np.sum(p)
    assert len(predicted_classes) >= 2
    want = seg_metrics.segmentation_metrics(stats)
    for key, value in want.items():
        np.testing.assert_allclose(results[f"eval/{key}"], value, rtol=0, atol=1e-12, err_msg=key)
