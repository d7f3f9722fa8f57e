"""EfficientViT-Det-B0 on the built-in synthetic `evit_det_shapes` (128x128 scenes, 6 shape classes).

    python -m evit_jax.main --config=configs/demo_det.py --workdir=/tmp/evit_det_demo

Trained from scratch; reaches AP50 0.865 (AP 0.621) on the 300 held-out scenes; the whole command took
6 min 45 s on the otherwise idle 2-core CPU dev machine (dataset build included; 12-17 min on the machine
shared with other jobs; measured figures and conditions: docs/detection.md, "Demo"). ``configs/demo_det.py:smoke`` is a seconds-long variant on the 64-px
`evit_det_shapes/tiny` used by the tests.
"""

from __future__ import annotations

import os

from configs import common


def get_config(arg: str = ""):
    c = common.base_config("detection")
    c.model.name = "efficientvit_det_b0"
    c.data.name = "evit_det_shapes"
    c.data.data_dir = os.environ.get("EVIT_DATA_DIR", "~/tensorflow_datasets")
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.image_sizes = (128,)            # one size: every extra size is one more compiled train step
    c.data.eval_image_size = 128
    c.data.max_boxes = 8                   # scenes hold at most 4 objects
    # No mosaic / mixup: at 128 px they shrink the objects, and a short run learns faster without.
    c.data.mosaic_prob = 0.0
    c.data.mixup_prob = 0.0
    c.data.hsv_prob = 1.0
    c.data.scale_range = (0.75, 1.25)      # scale jitter of the letterbox instead
    c.data.no_aug_epochs = 2.0             # the last 150 steps with YOLOX's L1 box term
    c.data.num_workers = 0
    c.global_batch_size = 32
    c.eval_batch_size = 100
    c.optim.name = "adamw"                 # from scratch in ~1000 steps: AdamW converges faster than SGD
    c.optim.base_lr = 3e-3
    c.optim.lr_reference_batch = 32
    c.optim.weight_decay = 5e-4
    c.optim.grad_clip_value = 0.0
    c.num_epochs = 0
    c.warmup_epochs = 0
    c.total_steps = 900
    c.warmup_steps = 100
    c.ema.decay = 0.998
    c.ema.warmup_steps = 100.0
    c.postprocess.score_threshold = 0.001  # AP integrates over the whole precision-recall curve
    c.log_every_steps = 50
    c.eval_every_steps = 450
    c.checkpoint.every_steps = 450
    c.checkpoint.keep = 2

    if arg == "smoke":
        c.data.name = "evit_det_shapes/tiny"
        c.model.conv_impl = "lax"          # faster to compile; speed does not matter here
        c.data.image_sizes = (64,)
        c.data.eval_image_size = 64
        c.data.mosaic_prob = 0.5           # exercise every path of the recipe
        c.data.mixup_prob = 0.5
        c.data.no_aug_epochs = 0.25        # 16 images: the last 2 of 6 steps
        c.global_batch_size = 8
        c.eval_batch_size = 12             # 32 validation images: the last batch is padded
        c.total_steps = 6
        c.warmup_steps = 2
        c.log_every_steps = 1
        c.eval_every_steps = 0
        c.checkpoint.every_steps = 3
        c.ema.warmup_steps = 2.0
        c.tensorboard = False
    elif arg:
        raise ValueError(f"configs/demo_det.py takes '' or 'smoke', got {arg!r}.")
    return c
