"""Classification head and model (official `ClsHead`, `EfficientViTCls`)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from evit_jax.models.layers import ConvLayer, LayerConfig, LinearLayer


class ClsHead(nn.Module):
    """1x1 conv + BN + act -> global average pool -> linear + LayerNorm + act -> (dropout) linear.

    Names mirror the official `head.op_list.{0,2,3}` (index 1 is the parameter-free pooling).
    in_conv_bn_eps: timm keeps 1e-5 in this BN for L models where the official zoo uses 1e-7.
    """

    widths: Sequence[int]
    num_classes: int
    cfg: LayerConfig
    act: str = "hswish"
    dropout: float = 0.0
    in_conv_bn_eps: float | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        in_cfg = self.cfg if self.in_conv_bn_eps is None else dataclasses.replace(self.cfg, bn_eps=self.in_conv_bn_eps)
        x = ConvLayer(self.widths[0], 1, in_cfg, act=self.act, name="op_list_0")(x, train)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.cfg.dtype)
        x = LinearLayer(self.widths[1], self.cfg, use_bias=False, norm=True, act=self.act, name="op_list_2")(x, train)
        return LinearLayer(self.num_classes, self.cfg, use_bias=True, dropout=self.dropout, name="op_list_3")(x, train)


class EfficientViTCls(nn.Module):
    """backbone -> ClsHead on `stage_final`; returns logits (B, num_classes) in float32."""

    backbone: nn.Module
    head: ClsHead

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        features = self.backbone(x, train)
        return self.head(features["stage_final"], train).astype(jnp.float32)
