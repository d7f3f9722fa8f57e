"""EfficientViT segmentation on Cityscapes (19 classes, 2975 train / 500 val images).

    python -m evit_jax.main --config=configs/cityscapes.py:b1 --workdir=/tmp/city_b1 \
        --config.init_from=efficientvit_b1_r224.pt          # converted ImageNet weights: backbone only
    python -m evit_jax.main --config=configs/cityscapes.py:b1 --workdir=/tmp/city_b1_eval \
        --config.mode=eval --config.init_from=efficientvit_seg_b1_cityscapes.pt   # official eval

arg: b0 | b1 | b2 | b3 | l1 | l2. The dataset must be prepared first (the error says how).
Recipe and reasons: docs/segmentation.md.
"""

from __future__ import annotations

import os

from configs import seg_common

VARIANTS = ("b0", "b1", "b2", "b3", "l1", "l2")


def get_config(arg: str = "b1"):
    if arg not in VARIANTS:
        raise ValueError(f"configs/cityscapes.py takes one of {VARIANTS}, got {arg!r}.")
    c = seg_common.get_seg_base_config()
    c.model.name = f"efficientvit_seg_{arg}_cityscapes"
    c.model.dtype = "bfloat16" if arg.startswith("l") else "float32"
    c.model.drop_path_rate = {"b0": 0.0, "b1": 0.05, "b2": 0.05, "b3": 0.1, "l1": 0.1, "l2": 0.1}[arg]
    c.data.name = "cityscapes"
    c.data.data_dir = os.environ.get("EVIT_DATA_DIR", "~/tensorflow_datasets")
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.image_sizes = [(1024, 1024)]   # train crop
    c.data.scale_range = (0.5, 2.0)
    c.data.base_size = (2048, 1024)       # native size; scaled 0.5x..2x
    c.data.eval_protocol = "cityscapes"
    c.data.eval_crop_size = 1024          # images resized to 1024 x 2048 (native: no resize)
    c.data.num_workers = 8
    c.global_batch_size = 16
    c.eval_batch_size = 8
    c.optim.base_lr = 4e-4                # peak lr at global batch 16 (scaled linearly with the batch)
    c.optim.lr_reference_batch = 16
    c.optim.weight_decay = 0.05
    c.num_epochs = 400                    # ~74k steps of 16 crops
    c.warmup_epochs = 5
    c.ema.decay = 0.9998
    c.ema.warmup_steps = 2000.0
    c.log_every_steps = 50
    c.eval_every_steps = 10000
    c.checkpoint.every_steps = 2000
    return c
