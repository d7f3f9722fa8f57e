"""Segmentation defaults shared by configs/cityscapes.py, configs/ade20k.py, configs/demo_seg.py.

Adds the keys of :class:`evit_jax.tasks.segmentation.SegmentationTask` to the common base
(every key documented here) and sets the recipe shared by all segmentation runs; see
docs/segmentation.md for why each value was chosen.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_seg_base_config() -> ml_collections.ConfigDict:
    c = common.get_base_config()
    with c.unlocked():  # the base is locked; these are the segmentation keys
        c.task = "segmentation"
        c.data.eval_split = "validation"
        # Train: per-batch crop (h, w) drawn from data.image_sizes (an int is square).
        c.data.scale_range = (0.5, 2.0)    # random rescale factor of the (base-fitted) image
        c.data.base_size = (2048, 1024)    # (long, short) box the image is fitted into before scaling; () = own size
        c.data.hflip = True
        c.data.photometric = True          # brightness/contrast/saturation/hue jitter (mmseg ranges)
        # Eval (official protocol, evit_jax.data.seg_transforms.eval_input_size).
        c.data.eval_protocol = "cityscapes"  # "cityscapes" (crop x 2crop) | "ade20k" (short side crop, long ceil32) | "none"
        c.data.eval_crop_size = 1024
        c.data.rrc_scale_min = 0.0         # unused by segmentation
        c.data.eval_crop_ratio = 1.0       # unused by segmentation

        c.loss.bce = False                 # per-pixel softmax cross-entropy, ignore_index excluded
        c.loss.label_smoothing = 0.0       # unused by segmentation
        c.loss.upsample = "bilinear"       # logits -> crop size for the loss: "bilinear" | "bicubic"

        c.model.drop_path_rate = 0.0
        c.optim.weight_decay = 0.05
        c.optim.grad_clip_value = 0.0      # no clipping in the seg recipe (see docs/segmentation.md)
        c.ema.decay = 0.9998
        c.eval_ema = True
    return c
