"""EfficientViT segmentation on ADE20K (150 classes, 20210 train / 2000 val images).

    python -m evit_jax.main --config=configs/ade20k.py:b1 --workdir=/tmp/ade_b1 \
        --config.init_from=efficientvit_b1_r224.pt          # converted ImageNet weights: backbone only
    python -m evit_jax.main --config=configs/ade20k.py:b1 --workdir=/tmp/ade_b1_eval \
        --config.mode=eval --config.init_from=efficientvit_seg_b1_ade20k.pt

arg: b1 | b2 | b3 | l1 | l2 (there is no official B0 ADE20K model). Evaluation batches images of
equal input size together (one compiled eval step per size; see docs/segmentation.md), so every
image is evaluated at exactly its own size, as the official code does.
"""

from __future__ import annotations

import os

from configs import seg_common

VARIANTS = ("b1", "b2", "b3", "l1", "l2")


def get_config(arg: str = "b1"):
    if arg not in VARIANTS:
        raise ValueError(f"configs/ade20k.py takes one of {VARIANTS}, got {arg!r}.")
    c = seg_common.get_seg_base_config()
    c.model.name = f"efficientvit_seg_{arg}_ade20k"
    c.model.dtype = "bfloat16" if arg.startswith("l") else "float32"
    c.model.drop_path_rate = {"b1": 0.05, "b2": 0.05, "b3": 0.1, "l1": 0.1, "l2": 0.1}[arg]
    c.data.name = "ade20k"
    c.data.data_dir = os.environ.get("EVIT_DATA_DIR", "~/tensorflow_datasets")
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.image_sizes = [(512, 512)]     # train crop
    c.data.scale_range = (0.5, 2.0)
    c.data.base_size = (2048, 512)        # short side 512 (long side <= 2048), scaled 0.5x..2x
    c.data.eval_protocol = "ade20k"
    c.data.eval_crop_size = 512           # short side 512, long side rounded up to a multiple of 32
    c.data.num_workers = 8
    c.global_batch_size = 16
    c.eval_batch_size = 8
    c.optim.base_lr = 4e-4
    c.optim.lr_reference_batch = 16
    c.optim.weight_decay = 0.05
    c.num_epochs = 127                    # ~160k steps of 16 crops
    c.warmup_epochs = 2
    c.ema.decay = 0.9998
    c.ema.warmup_steps = 2000.0
    c.log_every_steps = 50
    c.eval_every_steps = 16000
    c.checkpoint.every_steps = 4000
    return c
