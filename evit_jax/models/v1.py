"""The paper-v1 design of EfficientViT as a selectable block design (`block_design="v1"`).

Source: arXiv 2205.14756 **v1** (May 2022), "EfficientViT: Enhanced Linear Attention for
High-Resolution Low-Computation Visual Recognition" (Cai, Gan, Han). The later versions (and the
official code, which the default models reproduce) replaced it with multi-scale linear attention.
What v1 states, and how it is built here:

* global context: ReLU linear attention WITHOUT multi-scale aggregation -> `LiteMLA` with `scales=()`
  (the qkv and proj 1x1 convs are kept; any other kernel from attention_kernels can still be chosen);
* local information: a depthwise conv in the middle of the FFN ("FFN + DWConv") -> the block's
  `local_module` is an inverted bottleneck 1x1 (x4) -> depthwise 5x5 -> 1x1;
* no relative position bias (linear attention has none; nothing to add);
* an extra shortcut on every downsampling block: average pooling + 1x1 conv, added to the strided
  MBConv's output (`DownsampleWithShortcut`);
* hard swish everywhere; k = 5 for all depthwise convs except the stem; expand ratio 4;
* segmentation: a head fusing P2 and P4 in the style of Fast-SCNN's feature fusion module.

Choices the v1 text leaves open (also listed in docs/ablation.md):

1. Widths, depths and head dim per model: v1 gives no table we can rely on, so the B0..B3 settings of the
   released zoo (B_BACKBONES) are reused; only the B family exists in v1 (L variants raise ValueError).
2. "The stem": the first 3x3 stride-2 conv and the residual DSConvs after it keep k = 3 and get no
   downsampling shortcut (the stem conv is a layer, not a block).
3. Shortcut of a downsampling block: AvgPool(2x2, stride 2) -> 1x1 conv -> BatchNorm, no activation,
   added to the block output without any final activation (like the identity shortcuts).
4. Norm / bias pattern: as in the released code (stages 1-2 MBConvs fully normalised without bias;
   stage 3-4 downsampling and FFN MBConvs with bias and BN only after the last 1x1 conv).
5. Attention epsilon, quadratic fallback for tiny maps and heads = width / dim: as the default models.
6. P2 / P4 of the segmentation head: the stride-8 (`stage2`) and stride-32 (`stage4`) features, which is
   Fast-SCNN's own pairing (1/8 high-resolution branch + 1/32 global branch).
7. Fusion module: low-res branch = 1x1 conv + BN to `head_width`, bicubic x4 upsampling (the default
   head's resize), depthwise 5x5 conv + BN, 1x1 conv + BN (Fast-SCNN's dilated depthwise conv replaced
   by the model-wide k = 5 depthwise conv); high-res branch = 1x1 conv + BN; sum, then hard swish.
   Then `head_depth` residual MBConv(k = 5, expand 4) blocks and the classifier as in the default head
   (head widths/depths of the released seg zoo for the same variant and dataset).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from evit_jax.models.attention import EfficientViTBlock
from evit_jax.models.backbone import EfficientViTBackbone
from evit_jax.models.layers import ConvLayer, DSConv, LayerConfig, MBConv, make_residual
from evit_jax.models.resize import resize_bicubic

V1_KERNEL = 5
V1_EXPAND = 4
V1_ACT = "hswish"
BLOCK_DESIGNS = ("v2", "v1")  # "v2": the released code (the default); "v1": this module


class DownsampleShortcut(nn.Module):
    """AvgPool(2x2, stride 2) -> 1x1 conv -> BN: v1's extra shortcut of a downsampling block."""

    features: int
    cfg: LayerConfig

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.avg_pool(x.astype(jnp.float32), (2, 2), strides=(2, 2)).astype(self.cfg.dtype)
        return ConvLayer(self.features, 1, self.cfg, name="conv")(x, train)


class DownsampleWithShortcut(nn.Module):
    """MBConv(k=5, stride 2) (`main`) + DownsampleShortcut (`shortcut`)."""

    features: int
    cfg: LayerConfig
    fewer_norm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.shape[1] % 2 or x.shape[2] % 2:
            raise ValueError(f"v1 downsampling needs even feature maps, got {x.shape[1:3]}; "
                             "use input sizes that are multiples of 32")
        pattern = dict(use_bias=(True, True, False), norm=(False, False, True)) if self.fewer_norm else {}
        y = MBConv(self.features, self.cfg, stride=2, kernel_size=V1_KERNEL, expand_ratio=V1_EXPAND,
                   act=(V1_ACT, V1_ACT, None), name="main", **pattern)(x, train)
        return y + DownsampleShortcut(self.features, self.cfg, name="shortcut")(x, train)


class EfficientViTV1Backbone(nn.Module):
    """B-family backbone with the v1 blocks; returns the same feature dict as EfficientViTBackbone."""

    widths: Sequence[int]
    depths: Sequence[int]
    cfg: LayerConfig
    dim: int = 32
    attention_eps: float = 1e-15
    attention: str = "relu_linear"
    quadratic_fallback: bool = True
    drop_path_rates: Sequence[float] = ()

    # Same stage layout as the released B backbone: the same identity-residual blocks in `stages`.
    num_identity_blocks = staticmethod(EfficientViTBackbone.num_identity_blocks)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        cfg, act = self.cfg, V1_ACT
        rates = iter(tuple(self.drop_path_rates) + (0.0,) * self.num_identity_blocks(self.depths))
        features = {}
        x = ConvLayer(self.widths[0], 3, cfg, stride=2, act=act, name="input_stem_op_list_0")(x, train)
        for i in range(self.depths[0]):  # the stem keeps k = 3 (open choice 2); never dropped (not in `stages`)
            x = make_residual(DSConv, True, 0.0, name=f"input_stem_op_list_{i + 1}",
                              features=self.widths[0], cfg=cfg, act=(act, None))(x, train)
        features["stage0"] = x

        for s in (1, 2):
            x = DownsampleWithShortcut(self.widths[s], cfg, name=f"stages_{s - 1}_op_list_0")(x, train)
            for i in range(1, self.depths[s]):
                x = make_residual(MBConv, True, next(rates), name=f"stages_{s - 1}_op_list_{i}",
                                  features=self.widths[s], cfg=cfg, kernel_size=V1_KERNEL, expand_ratio=V1_EXPAND,
                                  act=(act, act, None))(x, train)
            features[f"stage{s}"] = x

        for s in (3, 4):
            x = DownsampleWithShortcut(self.widths[s], cfg, fewer_norm=True, name=f"stages_{s - 1}_op_list_0")(x, train)
            for i in range(self.depths[s]):
                x = EfficientViTBlock(
                    cfg, dim=self.dim, expand_ratio=V1_EXPAND, scales=(), act=act, eps=self.attention_eps,
                    attention=self.attention, quadratic_fallback=self.quadratic_fallback,
                    drop_path_rates=(next(rates), next(rates)), local_kernel_size=V1_KERNEL,
                    name=f"stages_{s - 1}_op_list_{i + 1}",
                )(x, train)
            features[f"stage{s}"] = x
        features["stage_final"] = x
        return features


class FusionSegHead(nn.Module):
    """v1 segmentation head: Fast-SCNN-style fusion of P2 (stride 8) and P4 (stride 32), then
    `head_depth` residual MBConvs (k = 5) and a 1x1 classifier; logits at stride 8 (open choices 6, 7)."""

    num_classes: int
    cfg: LayerConfig
    head_width: int = 64
    head_depth: int = 3
    final_expand: float | None = 4
    dropout: float = 0.0
    drop_path_rates: Sequence[float] = ()

    @nn.compact
    def __call__(self, features: dict[str, jax.Array], train: bool = False) -> jax.Array:
        cfg, act = self.cfg, V1_ACT
        high, low = features["stage2"], features["stage4"]
        if (low.shape[1] * 4, low.shape[2] * 4) != high.shape[1:3]:
            raise ValueError(f"FusionSegHead: stage4 {low.shape[1:3]} x4 != stage2 {high.shape[1:3]}; "
                             "input height and width must be multiples of 32")
        low = ConvLayer(self.head_width, 1, cfg, name="low_proj")(low, train)
        low = resize_bicubic(low, tuple(high.shape[1:3])).astype(cfg.dtype)
        low = DSConv(self.head_width, cfg, kernel_size=V1_KERNEL, act=(None, None), name="low_fuse")(low, train)
        high = ConvLayer(self.head_width, 1, cfg, name="high_proj")(high, train)
        x = jax.nn.hard_swish(low + high)
        for j in range(self.head_depth):
            rate = self.drop_path_rates[j] if j < len(self.drop_path_rates) else 0.0
            x = make_residual(MBConv, True, rate, name=f"middle_op_list_{j}", features=self.head_width, cfg=cfg,
                              kernel_size=V1_KERNEL, expand_ratio=V1_EXPAND, act=(act, act, None))(x, train)
        k = 0
        if self.final_expand is not None:
            x = ConvLayer(round(self.head_width * self.final_expand), 1, cfg, act=act, name="output_ops_0_op_list_0")(x, train)
            k = 1
        return ConvLayer(self.num_classes, 1, cfg, use_bias=True, norm=False, dropout=self.dropout,
                         name=f"output_ops_0_op_list_{k}")(x, train)
