"""Segmentation head and model (official `SegHead`, `EfficientViTSeg`).

The head projects stage4/stage3/stage2 (strides 32/16/8) to `head_width` with 1x1 conv + BN, upsamples
the coarser two to stride 8 with PyTorch-equivalent bicubic interpolation (in float32), adds them, runs
`head_depth` residual MBConv/FusedMBConv blocks and predicts logits at stride 8.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from evit_jax.models.layers import ConvLayer, FusedMBConv, LayerConfig, MBConv, make_residual
from evit_jax.models.resize import resize_bicubic


class SegHead(nn.Module):
    """Official SegHead (a DAGBlock with merge="add"). Names: `input_ops_{i}[_op_list_0]`,
    `middle_op_list_{j}`, `output_ops_0_op_list_{k}`."""

    num_classes: int
    cfg: LayerConfig
    fid_list: Sequence[str] = ("stage4", "stage3", "stage2")
    stride_list: Sequence[int] = (32, 16, 8)
    head_stride: int = 8
    head_width: int = 64
    head_depth: int = 3
    expand_ratio: float = 4
    middle_op: str = "mbconv"
    final_expand: float | None = 4
    act: str = "hswish"
    dropout: float = 0.0
    drop_path_rates: Sequence[float] = ()

    @nn.compact
    def __call__(self, features: dict[str, jax.Array], train: bool = False) -> jax.Array:
        merged = None
        target = features[self.fid_list[-1]].shape[1:3]
        for i, (fid, stride) in enumerate(zip(self.fid_list, self.stride_list)):
            factor = stride // self.head_stride
            name = f"input_ops_{i}" if factor == 1 else f"input_ops_{i}_op_list_0"
            y = ConvLayer(self.head_width, 1, self.cfg, name=name)(features[fid], train)
            if factor != 1:
                h, w = y.shape[1] * factor, y.shape[2] * factor
                y = resize_bicubic(y, (h, w)).astype(self.cfg.dtype)
            if y.shape[1:3] != target:
                raise ValueError(f"SegHead: {fid} upsampled to {y.shape[1:3]} but stride-{self.head_stride} map is "
                                 f"{target}; input height and width must be multiples of 32")
            merged = y if merged is None else merged + y

        x = merged
        for j in range(self.head_depth):
            rate = self.drop_path_rates[j] if j < len(self.drop_path_rates) else 0.0
            if self.middle_op == "mbconv":
                block, kw = MBConv, dict(act=(self.act, self.act, None))
            elif self.middle_op == "fmbconv":
                block, kw = FusedMBConv, dict(act=(self.act, None))
            else:
                raise ValueError(f"unknown middle_op {self.middle_op!r}")
            x = make_residual(block, True, rate, name=f"middle_op_list_{j}", features=self.head_width, cfg=self.cfg,
                              expand_ratio=self.expand_ratio, **kw)(x, train)

        k = 0
        if self.final_expand is not None:
            width = round(self.head_width * self.final_expand)
            x = ConvLayer(width, 1, self.cfg, act=self.act, name="output_ops_0_op_list_0")(x, train)
            k = 1
        return ConvLayer(self.num_classes, 1, self.cfg, use_bias=True, norm=False, dropout=self.dropout,
                         name=f"output_ops_0_op_list_{k}")(x, train)


class EfficientViTSeg(nn.Module):
    """backbone -> SegHead; returns float32 logits (B, H/8, W/8, num_classes)."""

    backbone: nn.Module
    head: SegHead

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self.head(self.backbone(x, train), train).astype(jnp.float32)
