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
                               seg_transforms.interpolation_matrix(n_in, n_out, "bicubic"), atol=1e-5)


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
    seg.SegmentationTask(config).check()
    for key, value, message in [
        ("model.name", "efficientvit_b0", "classification model"),
        ("model.name", "efficientvit_seg_b9_cityscapes", "unknown model"),
        ("loss.bce", True, "cross-entropy"),
        ("loss.upsample", "nearest", "upsample"),
        ("data.eval_protocol", "voc", "eval_protocol"),
        ("data.image_sizes", [48], "multiple of 32"),
        ("data.eval_split", "test", "no split"),
    ]:
        bad = smoke_config(data_dir)
        section, name = key.split(".")
        with bad.unlocked():
            bad[section][name] = value
        with pytest.raises(ValueError, match=message):
            seg.SegmentationTask(bad).check()


def test_check_reports_a_missing_dataset(tmp_path):
    config = smoke_config(str(tmp_path))
    config.data.name = "cityscapes"
    with pytest.raises(FileNotFoundError, match="prepare"):
        seg.SegmentationTask(config).check()


# ---------------------------------------------------------------------------- init_from
def test_init_from_classification_checkpoint_loads_only_the_backbone(data_dir, tmp_path):
    from evit_jax.convert import save_variables
    from evit_jax.models import create_model

    config = smoke_config(data_dir)
    task = seg.SegmentationTask(config)
    def init(name):  # structure is all that matters here: zeros of the right shapes, no compile
        model = create_model(name)
        shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 64, 64, 3)), train=False), jax.random.key(1))
        return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)

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
    results = loop.evaluate(experiment, experiment.compile_eval_step(), state, include_ema=False)
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
