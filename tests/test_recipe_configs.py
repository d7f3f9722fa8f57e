"""configs/imagenet.py and configs/finetune.py against the official values.

The expected values are transcribed from mit-han-lab/efficientvit
`applications/efficientvit_cls/configs/imagenet/default.yaml` + `efficientvit_<model>.yaml` (a model's file
overrides default.yaml) and the README's training commands (B1/B2-r288: image sizes 128..288, eval 288,
B2-r288 RandAugment m5; `--amp bf16` for the L models).
"""

import pytest

from configs import finetune, imagenet
from evit_jax.tasks import get_task

# model: RandAugment (n, m), erasing p, mixup = cutmix alpha, drop path (rate, skip), MESA (thresh, ratio) or None,
#        test crop ratio, base lr, compute dtype
OFFICIAL = {
    "b1": ((1, 3), 0.0, 0.1, (0.05, 0), None, 0.95, 2.5e-4, "float32"),
    "b2": ((1, 3), 0.0, 0.1, (0.05, 0), None, 1.0, 2.5e-4, "float32"),
    "b3": ((2, 6), 0.0, 0.3, (0.1, 0), None, 1.0, 2.5e-4, "float32"),
    "l1": ((2, 5), 0.2, 0.2, (0.1, 2), (0.25, 2.0), 1.0, 1.5e-4, "bfloat16"),
    "l2": ((2, 5), 0.2, 0.4, (0.1, 3), (0.25, 2.75), 1.0, 1.5e-4, "bfloat16"),
    "l3": ((2, 6), 0.2, 0.6, (0.1, 3), (0.25, 3.5), 1.0, 1.5e-4, "bfloat16"),
}


@pytest.mark.parametrize("model", sorted(OFFICIAL))
def test_imagenet_config_has_every_official_value(model):
    randaug, erasing, alpha, (drop, skip), mesa, crop, base_lr, dtype = OFFICIAL[model]
    c = imagenet.get_config(model)
    assert tuple(c.data.randaugment) == randaug and c.data.erasing_prob == erasing
    assert c.mix.mixup_alpha == c.mix.cutmix_alpha == alpha
    assert (c.model.drop_path_rate, c.model.drop_path_skip, c.model.drop_path_scheduled) == (drop, skip, True)
    assert (c.mesa.threshold, c.mesa.ratio) == (mesa if mesa else (0.25, 0.0))
    assert c.data.eval_crop_ratio == crop and c.optim.base_lr == base_lr and c.model.dtype == dtype
    # default.yaml, every model
    assert list(c.data.image_sizes) == [128, 160, 192, 224] and c.data.eval_image_size == 224
    assert (c.num_epochs, c.warmup_epochs, c.optim.weight_decay, c.optim.grad_clip_value) == (300, 20, 0.1, 2.0)
    assert (c.loss.bce, c.loss.label_smoothing, c.ema.decay) == (True, 0.1, 0.9998)
    assert (c.reset_bn.num_images, c.reset_bn.global_batch_size) == (16000, 1600)  # 100 per GPU x 16
    assert tuple(c.optim.no_decay_keys) == ("norm", "bias") and c.data.rrc_scale_min == 0.08


@pytest.mark.parametrize("variant,sizes,randaug", [
    ("b1_r288", [128, 160, 192, 224, 256, 288], (1, 3)),
    ("b2_r288", [128, 160, 192, 224, 256, 288], (1, 5)),
    ("b3_r256", [128, 160, 192, 224, 256], (2, 6)),
    ("l2_r288", [128, 160, 192, 224, 256, 288], (2, 5)),
])
def test_resolution_variants(variant, sizes, randaug):
    c = imagenet.get_config(variant)
    base = imagenet.get_config(variant.split("_")[0])
    assert list(c.data.image_sizes) == sizes and c.data.eval_image_size == sizes[-1]
    assert tuple(c.data.randaugment) == randaug
    assert c.data.eval_crop_ratio == base.data.eval_crop_ratio  # B1 keeps 0.95 at every resolution
    assert c.model.name == base.model.name
    get_task(c).check_config()


def test_finetune_config():
    c = finetune.get_config("b1")
    assert c.reinit_classifier and c.model.num_classes == -1 and c.per_class_metrics
    assert c.data.name == ""  # given on the command line
    assert c.optim.base_lr == pytest.approx(imagenet.get_config("b1").optim.base_lr / 10)
    assert (c.num_epochs, c.warmup_epochs) == (30, 2)
    assert tuple(c.data.randaugment) == () and c.data.erasing_prob == 0 and c.mix.mixup_alpha == 0
    assert c.mesa.ratio == 0 and c.data.eval_crop_ratio == 0.95
    assert finetune.get_config("l2").model.drop_path_skip == 3
    with pytest.raises(ValueError, match="b9"):
        finetune.get_config("b9")
