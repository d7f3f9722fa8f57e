"""EfficientViT on ImageNet-1k with the official recipe (mit-han-lab/efficientvit
`applications/efficientvit_cls/configs/imagenet/{default,<model>}.yaml`).

    python -m evit_jax.main --config=configs/imagenet.py:b1 --workdir=DIR \
        --config.data.data_dir=DIR_WITH_TFDS_IMAGENET2012

Arg: b0 b1 b2 b3 l1 l2 l3. Recipe: AdamW(0.9, 0.999, eps 1e-8), wd 0.1 except norm/bias,
20 warmup + 300 cosine epochs stepped per iteration, peak lr = base_lr x global_batch / 128
(official: base_lr x #GPUs at 128 images per GPU; 2048 = the 16-GPU runs of the historical
TRAINING.md), BCE on label-smoothed (0.1) targets, gradient clipping by value 2.0, EMA
0.9998 * (1 - exp(-t/2000)), one of mixup/cutmix per step, RandomResizedCrop + flip at a
per-batch resolution from [128, 160, 192, 224], stochastic depth per model.
Not reproduced (see docs/training.md): RandAugment / RandomErasing (not in the data
pipeline), MESA of the L models, progress-scaled drop path, BN re-estimation before eval.
"""

from __future__ import annotations

from configs import common

# model: (base_lr, mix alpha, drop_path_rate, drop_path_skip, eval crop ratio, dtype)
_RECIPES = {
    # B0 has no official training config; it follows B1 without mixing or stochastic depth.
    "b0": (2.5e-4, 0.0, 0.0, 0, 0.95, "float32"),
    "b1": (2.5e-4, 0.1, 0.05, 0, 0.95, "float32"),
    "b2": (2.5e-4, 0.1, 0.05, 0, 1.0, "float32"),
    "b3": (2.5e-4, 0.3, 0.1, 0, 1.0, "float32"),
    "l1": (1.5e-4, 0.2, 0.1, 2, 1.0, "bfloat16"),
    "l2": (1.5e-4, 0.4, 0.1, 3, 1.0, "bfloat16"),
    "l3": (1.5e-4, 0.6, 0.1, 3, 1.0, "bfloat16"),
}


def get_config(arg: str = "b1"):
    variant = (arg or "b1").lower()
    if variant not in _RECIPES:
        raise ValueError(f"configs/imagenet.py takes one of {sorted(_RECIPES)}, got {arg!r}.")
    base_lr, alpha, drop_path, skip, crop, dtype = _RECIPES[variant]
    c = common.base_config("classification")
    c.model.name = f"efficientvit_{variant}"
    c.model.drop_path_rate = drop_path
    c.model.drop_path_skip = skip
    c.model.dtype = dtype
    c.data.name = "imagenet2012"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.image_sizes = [128, 160, 192, 224]
    c.data.eval_image_size = 224
    c.data.eval_crop_ratio = crop
    c.data.rrc_scale_min = 0.08
    c.data.num_workers = 8
    c.global_batch_size = 2048
    c.eval_batch_size = 1024
    c.optim.base_lr = base_lr
    c.optim.lr_reference_batch = 128
    c.optim.weight_decay = 0.1
    c.optim.grad_clip_value = 2.0
    c.num_epochs = 300
    c.warmup_epochs = 20
    c.loss.bce = True
    c.loss.label_smoothing = 0.1
    c.mix.mixup_alpha = alpha
    c.mix.cutmix_alpha = alpha
    c.ema.decay = 0.9998
    c.ema.warmup_steps = 2000.0
    c.log_every_steps = 100
    c.eval_every_steps = 3130  # ~5 epochs at 2048 images per step
    c.checkpoint.every_steps = 2000
    c.checkpoint.keep = 3
    return c
