"""Segmentation defaults shared by configs/cityscapes.py, configs/ade20k.py, configs/demo_seg.py.

The segmentation keys (documented in evit_jax/tasks/config.py) with the recipe shared by all
segmentation runs; see docs/segmentation.md for why each value was chosen.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_seg_base_config() -> ml_collections.ConfigDict:
    c = common.base_config("segmentation")
    c.model.drop_path_rate = 0.0
    c.optim.weight_decay = 0.05
    c.optim.grad_clip_value = 0.0      # no clipping in the seg recipe (see docs/segmentation.md)
    c.ema.decay = 0.9998
    c.eval_ema = True
    return c
