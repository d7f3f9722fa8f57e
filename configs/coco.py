"""EfficientViT-Det on COCO 2017 with YOLOX's recipe (80 classes, 118,287 train / 5,000 val images).

    python -m evit_jax.data.prepare coco --src ~/downloads/coco --data_dir DATA      # once
    python -m evit_jax.main --config=configs/coco.py:b1 --workdir=runs/coco_b1 \
        --config.data.data_dir=DATA [--config.init_from=hub:efficientvit_b1]

arg: b0 | b1 | b2 | b3 (released backbones) or v1_b0 ... v1_b3 (the paper-v1 designs;
``v1_b1`` is the paper's 4.4 GMACs detector). Recipe and reasons: docs/detection.md
("Training and evaluation").
"""

from __future__ import annotations

import os

from configs import common

VARIANTS = ("b0", "b1", "b2", "b3", "v1_b0", "v1_b1", "v1_b2", "v1_b3")


def get_config(arg: str = "b1"):
    if arg not in VARIANTS:
        raise ValueError(f"configs/coco.py takes one of {VARIANTS}, got {arg!r}.")
    c = common.base_config("detection")
    c.model.name = f"efficientvit_v1_det_{arg[3:]}" if arg.startswith("v1_") else f"efficientvit_det_{arg}"
    c.data.name = "coco"
    c.data.data_dir = os.environ.get("EVIT_DATA_DIR", "~/tensorflow_datasets")
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    # YOLOX (arXiv 2107.08430, Sec. 2.1): 640 px, multi-scale training from 448 to 832 in steps of 32.
    c.data.image_sizes = tuple(range(448, 833, 32))
    c.data.eval_image_size = 640
    c.data.max_boxes = 120
    c.data.mosaic_prob = 1.0               # YOLOX's COCO augmentation (yolox/exp/yolox_base.py)
    c.data.mixup_prob = 1.0
    c.data.hsv_prob = 1.0
    c.data.hflip = True
    c.data.degrees = 10.0
    c.data.translate = 0.1
    c.data.shear = 2.0
    c.data.mosaic_scale = (0.1, 2.0)
    c.data.mixup_scale = (0.5, 1.5)
    c.data.no_aug_epochs = 15.0            # last 15 epochs: no mosaic / mixup, L1 term on
    c.data.num_workers = 8
    c.global_batch_size = 128              # YOLOX: 128 over 8 GPUs
    c.eval_batch_size = 64
    # SGD as YOLOX (its lr, weight decay and schedule were tuned with it): lr 0.01 per 64 images,
    # momentum 0.9, Nesterov, weight decay 5e-4 on conv/linear weights only (not BN, not biases).
    c.optim.name = "sgd"
    c.optim.base_lr = 0.01
    c.optim.lr_reference_batch = 64
    c.optim.momentum = 0.9
    c.optim.nesterov = True
    c.optim.weight_decay = 5e-4
    c.optim.grad_clip_value = 0.0          # YOLOX does not clip
    c.num_epochs = 295                     # 5 warmup + 295 cosine = YOLOX's 300 epochs
    c.warmup_epochs = 5
    c.ema.decay = 0.9998                   # YOLOX's ModelEMA: 0.9998 * (1 - exp(-updates / 2000))
    c.ema.warmup_steps = 2000.0
    c.postprocess.score_threshold = 0.01   # YOLOX's COCO evaluation (test_conf, nmsthre)
    c.postprocess.iou_threshold = 0.65
    c.postprocess.max_detections = 100
    c.log_every_steps = 100
    c.eval_every_steps = 9240              # every 10 epochs at batch 128 (YOLOX's eval_interval)
    c.checkpoint.every_steps = 2000
    return c
