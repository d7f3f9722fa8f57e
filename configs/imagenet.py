"""EfficientViT on ImageNet-1k with the official recipe (mit-han-lab/efficientvit
`applications/efficientvit_cls/configs/imagenet/{default,<model>}.yaml`, the trainer in
`efficientvit/apps/trainer` + `efficientvit/clscore/trainer`, the script
`applications/efficientvit_cls/train_efficientvit_cls_model.py`).

    python -m evit_jax.main --config=configs/imagenet.py:b1 --workdir=DIR \
        --config.data.data_dir=DIR_WITH_TFDS_IMAGENET2012

Arg: b0 b1 b2 b3 l1 l2 l3, or a variant trained and evaluated at a higher resolution: b1_r288
(and _r256 / _r288 of b1 b2 b3 l1 l2 l3; see VARIANTS). docs/training.md ("The ImageNet recipe")
says where every value comes from.

Common to all: AdamW(0.9, 0.999, eps 1e-8), wd 0.1 except norm/bias, 20 warmup + 300 cosine
epochs stepped per iteration, peak lr = base_lr x global_batch / 128 (official: base_lr x #GPUs
at 128 images per GPU; 2048 = the 16-GPU runs of the historical TRAINING.md), BCE on
label-smoothed (0.1) targets, gradient clipping by value 2.0, EMA 0.9998 * (1 - exp(-t/2000)),
one of mixup/cutmix per step, RandomResizedCrop + flip + timm RandAugment at a per-batch
resolution from [128, 160, 192, 224], stochastic depth scaled by training progress, BatchNorm
statistics of the EMA weights re-estimated on 16000 train images before every evaluation.
Per model (the table below): base lr, RandAugment (n, m), random erasing, mixup/cutmix alpha,
drop path (rate, first blocks exempt), MESA (threshold, ratio), eval crop ratio, compute dtype.
"""

from __future__ import annotations

from configs import common

# One ImageNet epoch at the default global batch: 1281167 / 2048 images.
STEPS_PER_EPOCH = 626

# model: base_lr, RandAugment (n, m), erasing p, mix alpha, drop path (rate, skip), MESA (thresh, ratio),
#        eval crop ratio, compute dtype. Sources: default.yaml (every model) overridden by <model>.yaml.
_RECIPES = {
    # B0 has no official training config; it follows B1 without mixing or stochastic depth.
    "b0": dict(base_lr=2.5e-4, randaugment=(1, 3), erasing=0.0, alpha=0.0, drop_path=(0.0, 0), mesa=None,
               crop=0.95, dtype="float32"),
    "b1": dict(base_lr=2.5e-4, randaugment=(1, 3), erasing=0.0, alpha=0.1, drop_path=(0.05, 0), mesa=None,
               crop=0.95, dtype="float32"),
    "b2": dict(base_lr=2.5e-4, randaugment=(1, 3), erasing=0.0, alpha=0.1, drop_path=(0.05, 0), mesa=None,
               crop=1.0, dtype="float32"),
    "b3": dict(base_lr=2.5e-4, randaugment=(2, 6), erasing=0.0, alpha=0.3, drop_path=(0.1, 0), mesa=None,
               crop=1.0, dtype="float32"),
    "l1": dict(base_lr=1.5e-4, randaugment=(2, 5), erasing=0.2, alpha=0.2, drop_path=(0.1, 2), mesa=(0.25, 2.0),
               crop=1.0, dtype="bfloat16"),
    "l2": dict(base_lr=1.5e-4, randaugment=(2, 5), erasing=0.2, alpha=0.4, drop_path=(0.1, 3), mesa=(0.25, 2.75),
               crop=1.0, dtype="bfloat16"),
    "l3": dict(base_lr=1.5e-4, randaugment=(2, 6), erasing=0.2, alpha=0.6, drop_path=(0.1, 3), mesa=(0.25, 3.5),
               crop=1.0, dtype="bfloat16"),
}
TRAIN_SIZES = (128, 160, 192, 224)
# Higher-resolution variants: the official README trains B1/B2-r288 with image sizes [128 ... 288] and
# evaluates at 288 (B2-r288 with RandAugment m5); r256 follows the same rule up to 256.
RESOLUTIONS = (256, 288)
# Per variant: the RandAugment of the README's command where it differs from the model's.
_RANDAUGMENT_OVERRIDES = {"b2_r288": (1, 5)}
VARIANTS = tuple(_RECIPES) + tuple(f"{m}_r{r}" for m in _RECIPES if m != "b0" for r in RESOLUTIONS)


def train_sizes(resolution: int) -> list[int]:
    """[128, 160, ..., resolution] in steps of 32 (the official multi-resolution lists)."""
    return list(range(TRAIN_SIZES[0], resolution + 1, 32))


def get_config(arg: str = "b1"):
    variant = (arg or "b1").lower()
    if variant not in VARIANTS:
        raise ValueError(f"configs/imagenet.py takes one of {', '.join(VARIANTS)}, got {arg!r}.")
    model, _, res = variant.partition("_r")
    resolution = int(res) if res else TRAIN_SIZES[-1]
    r = _RECIPES[model]
    c = common.base_config("classification")
    c.model.name = f"efficientvit_{model}"
    c.model.drop_path_rate, c.model.drop_path_skip = r["drop_path"]
    c.model.drop_path_scheduled = True
    c.model.dtype = r["dtype"]
    c.data.name = "imagenet2012"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.image_sizes = train_sizes(resolution)
    c.data.eval_image_size = resolution
    c.data.eval_crop_ratio = r["crop"]
    c.data.rrc_scale_min = 0.08
    c.data.randaugment = _RANDAUGMENT_OVERRIDES.get(variant, r["randaugment"])
    c.data.erasing_prob = r["erasing"]
    c.data.num_workers = 8
    c.global_batch_size = 2048
    c.eval_batch_size = 1024
    c.optim.base_lr = r["base_lr"]
    c.optim.lr_reference_batch = 128
    c.optim.weight_decay = 0.1
    c.optim.grad_clip_value = 2.0
    c.num_epochs = 300
    c.warmup_epochs = 20
    c.loss.bce = True
    c.loss.label_smoothing = 0.1
    c.mix.mixup_alpha = r["alpha"]
    c.mix.cutmix_alpha = r["alpha"]
    if r["mesa"]:
        c.mesa.threshold, c.mesa.ratio = r["mesa"]
    c.reset_bn.num_images = 16000
    c.reset_bn.global_batch_size = 1600  # 100 per GPU x 16 GPUs
    c.ema.decay = 0.9998
    c.ema.warmup_steps = 2000.0
    c.log_every_steps = 100
    c.eval_every_steps = STEPS_PER_EPOCH  # the official trainer validates after every epoch
    c.checkpoint.every_steps = 2000
    c.checkpoint.keep = 3
    return c
