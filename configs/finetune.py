"""Fine-tune ImageNet-pretrained EfficientViT weights on your own classification dataset.

    python -m evit_jax.data.prepare image_folder --name NAME --src DIR --data_dir D
    python -m evit_jax.main --config=configs/finetune.py:b1 --config.data.name=NAME \
        --config.data.data_dir=D --config.init_from=efficientvit_b1_r224.pt --workdir=WORKDIR

Arg: b0 b1 b2 b3 l1 l2 l3 (the model; VARIANTS). ``init_from`` takes the pretrained weights: an
official/timm file, a directory converted by ``evit_jax.convert``, or ``hub:efficientvit_b1``. The
classifier is always fresh, as wide as the dataset has classes (``reinit_classifier`` is set);
everything else starts from the weights.

The recipe (docs/training.md, "Fine-tuning on your own images", says why and where from): the
official ImageNet recipe's optimizer, loss, clipping, EMA and BatchNorm re-estimation, with
a tenth of its learning rate per image (base_lr 2.5e-5 per 128 images, GFNet's transfer
setting), a short schedule (30 epochs after 2 of warmup, DeiT's fine-tuning length), one
resolution (224) and light augmentation (RandomResizedCrop + flip, label smoothing 0.1; no
RandAugment, erasing, mixup/cutmix or MESA); stochastic depth at the model's official rate,
scaled by training progress. Top-1 is reported overall and per class.
"""

from __future__ import annotations

from configs import common

VARIANTS = ("b0", "b1", "b2", "b3", "l1", "l2", "l3")
# The official eval crop ratio (B0/B1 0.95, others 1.0), drop path (rate, first blocks exempt) and
# compute dtype of each model.
_MODELS = {
    "b0": (0.95, (0.0, 0), "float32"),
    "b1": (0.95, (0.05, 0), "float32"),
    "b2": (1.0, (0.05, 0), "float32"),
    "b3": (1.0, (0.1, 0), "float32"),
    "l1": (1.0, (0.1, 2), "bfloat16"),
    "l2": (1.0, (0.1, 3), "bfloat16"),
    "l3": (1.0, (0.1, 3), "bfloat16"),
}


def get_config(arg: str = "b1"):
    variant = (arg or "b1").lower()
    if variant not in _MODELS:
        raise ValueError(f"configs/finetune.py takes one of {', '.join(VARIANTS)}, got {arg!r}.")
    crop, (drop_path, skip), dtype = _MODELS[variant]
    c = common.base_config("classification")
    c.model.name = f"efficientvit_{variant}"
    c.model.drop_path_rate = drop_path
    c.model.drop_path_skip = skip
    c.model.drop_path_scheduled = True
    c.model.dtype = dtype
    c.reinit_classifier = True         # a fresh classifier as wide as the dataset has classes
    c.data.name = ""                   # required: --config.data.name=NAME (evit_jax.data.prepare image_folder)
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.image_sizes = [224]
    c.data.eval_image_size = 224
    c.data.eval_crop_ratio = crop
    c.data.rrc_scale_min = 0.08
    c.data.randaugment = ()
    c.data.erasing_prob = 0.0
    c.global_batch_size = 128
    c.eval_batch_size = 128
    c.optim.base_lr = 2.5e-5
    c.optim.lr_reference_batch = 128
    c.optim.weight_decay = 0.1
    c.optim.grad_clip_value = 2.0
    c.num_epochs = 30
    c.warmup_epochs = 2
    c.loss.bce = True
    c.loss.label_smoothing = 0.1
    c.mix.mixup_alpha = 0.0
    c.mix.cutmix_alpha = 0.0
    c.reset_bn.num_images = 16000      # capped at the training split
    c.reset_bn.global_batch_size = 64
    c.per_class_metrics = True
    c.ema.decay = 0.9998
    c.ema.warmup_steps = 2000.0
    c.log_every_steps = 10
    c.eval_every_steps = 500
    c.checkpoint.every_steps = 500
    c.checkpoint.keep = 2
    return c
