"""Run configs: the official ImageNet recipe per model, the demo, locking, schedule lengths."""

import math

import ml_collections
import pytest

from configs import common, demo, imagenet
from evit_jax.train import loop, optim


@pytest.mark.parametrize("variant", ["b0", "b1", "b2", "b3", "l1", "l2", "l3"])
def test_imagenet_configs_build(variant):
    c = imagenet.get_config(variant)
    assert c.model.name == f"efficientvit_{variant}"
    assert tuple(c.data.image_sizes) == (128, 160, 192, 224)
    assert (c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay) == (0.9, 0.999, 1e-8, 0.1)
    assert tuple(c.optim.no_decay_keys) == ("norm", "bias")
    assert c.optim.grad_clip_value == 2.0
    assert (c.num_epochs, c.warmup_epochs) == (300, 20)
    assert c.loss.bce and c.loss.label_smoothing == 0.1
    assert (c.ema.decay, c.ema.warmup_steps) == (0.9998, 2000.0)


def test_imagenet_per_model_values():
    b1, b3, l1, l3 = (imagenet.get_config(v) for v in ("b1", "b3", "l1", "l3"))
    assert b1.data.eval_crop_ratio == 0.95 and b3.data.eval_crop_ratio == 1.0 and l1.data.eval_crop_ratio == 1.0
    assert (b1.mix.mixup_alpha, b3.mix.mixup_alpha, l1.mix.mixup_alpha, l3.mix.cutmix_alpha) == (0.1, 0.3, 0.2, 0.6)
    assert (b1.model.drop_path_rate, b3.model.drop_path_rate, l1.model.drop_path_rate) == (0.05, 0.1, 0.1)
    assert (l1.model.drop_path_skip, l3.model.drop_path_skip) == (2, 3)
    # lr rule: base_lr x #GPUs at 128 images/GPU == base_lr x global_batch / 128.
    assert optim.peak_learning_rate(b1.optim.base_lr, b1.global_batch_size, b1.optim.lr_reference_batch) == pytest.approx(4e-3)
    assert optim.peak_learning_rate(l1.optim.base_lr, l1.global_batch_size, l1.optim.lr_reference_batch) == pytest.approx(2.4e-3)
    assert l1.model.dtype == "bfloat16" and b1.model.dtype == "float32"
    with pytest.raises(ValueError, match="b9"):
        imagenet.get_config("b9")


def test_configs_are_locked():
    for c in (imagenet.get_config("b1"), demo.get_config(), demo.get_config("smoke"), common.get_base_config()):
        with pytest.raises(AttributeError):
            c.optim.lrr = 1.0
        with pytest.raises(AttributeError):
            c.unknown_key = 1
    with pytest.raises(ValueError):
        demo.get_config("nope")


def test_schedule_lengths():
    c = imagenet.get_config("b1")
    total, warmup = loop.schedule_lengths(c, 1_281_167)
    assert total == round(320 * 1_281_167 / 2048) and warmup == round(20 * 1_281_167 / 2048)
    c.total_steps = 640  # overrides the length; warmup keeps its 20/320 share
    assert loop.schedule_lengths(c, 1_281_167) == (640, 40)
    c.warmup_steps = 5
    assert loop.schedule_lengths(c, 1_281_167) == (640, 5)
    c.warmup_steps = 700
    with pytest.raises(ValueError):
        loop.schedule_lengths(c, 1_281_167)


def test_demo_config():
    c = demo.get_config()
    assert c.model.name == "efficientvit_b0" and c.data.name == "evit_shapes"
    s = demo.get_config("smoke")
    assert s.total_steps <= 10 and s.data.name == "evit_shapes/tiny"
