"""EfficientViT-Det: an EfficientViT backbone with YOLOX's PAFPN neck and decoupled head (arXiv 2205.14756 v1).

The paper's first version feeds the backbone's P2, P3, P4 (`stage2`, `stage3`, `stage4`: strides 8, 16, 32)
to a YOLOX detector; no detection code was released. The neck and head follow Megvii-BaseDetection/YOLOX
(`yolox/models/yolo_pafpn.py`, `yolo_head.py`, `network_blocks.py`) with its module names, so that
`neck/C3_p4/m_0/conv2/...` or `head/cls_convs_0_1/...` convert to the keys a YOLOX reader expects
(`neck.C3_p4.m.0.conv2`, `head.cls_convs.0.1`; our conv layers call their BatchNorm `norm`, YOLOX `bn`).
Depth, depthwise convs and activation are chosen per variant in `DET_NECKS`, widths follow the backbone, and
the neck and head use YOLOX's BatchNorm settings (reasons in docs/detection.md, section "Model").

Output: raw per-point predictions of every level, flattened row-major per level and concatenated in stride
order, (B, N, 4 + 1 + C) float32 = (x offset, y offset, log w, log h, objectness logit, class logits): the
layout of YOLOX's training outputs. `detection_grid` gives the matching (N, 3) grid (x, y, stride) and
`decode_boxes` turns predictions into (cx, cy, w, h) pixel boxes: xy = (offset + grid) * stride,
wh = exp(log wh) * stride. The box geometry the loss and the post-processing share (format conversions, IoUs)
lives here too.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from evit_jax.models.layers import Conv2d, ConvLayer, DSConv, LayerConfig
from evit_jax.models.zoo import (B_BACKBONES, BuildOptions, ModelSpec, build_backbone, num_backbone_identity_blocks,
                                 register_model)

DET_STRIDES = (8, 16, 32)
DET_FEATURES = ("stage2", "stage3", "stage4")
DET_NUM_CLASSES = 80  # COCO
PRIOR_PROB = 0.01  # YOLOX: objectness and class biases start at logit(0.01)
# YOLOX sets every BatchNorm to eps 1e-3 and PyTorch momentum 0.03 (Flax convention: 0.97); the neck and head
# use them, the backbone keeps its own (ImageNet-pretrained) settings.
YOLOX_BN_EPS = 1e-3
YOLOX_BN_MOMENTUM = 0.97


@dataclasses.dataclass(frozen=True)
class NeckSettings:
    """PAFPN and head of one variant: the neck's widths are the backbone's P2-P4 channels (YOLOX's `width`
    multiplier applied to its base [256, 512, 1024]); the head width is the P2 width (YOLOX: 256 x width);
    `csp_depth` bottlenecks per CSP layer (YOLOX: round(3 x depth)); `depthwise` as YOLOX-Nano."""

    csp_depth: int
    depthwise: bool
    act: str = "hswish"


# B1, B2, B3's P2-P4 widths are exactly those of YOLOX-Nano (width 0.25), -Tiny (0.375) and -S (0.5), whose
# depth multiplier 0.33 gives one bottleneck per CSP layer; each variant takes that model's neck and head
# (Nano's depthwise convs included). B0 halves Nano's widths and keeps its design.
DET_NECKS = {
    "b0": NeckSettings(csp_depth=1, depthwise=True),  # YOLOX width 0.125 (no official model)
    "b1": NeckSettings(csp_depth=1, depthwise=True),  # YOLOX-Nano
    "b2": NeckSettings(csp_depth=1, depthwise=False),  # YOLOX-Tiny
    "b3": NeckSettings(csp_depth=1, depthwise=False),  # YOLOX-S
}


def yolox_config(cfg: LayerConfig) -> LayerConfig:
    """The model's layer settings with YOLOX's BatchNorm epsilon and momentum."""
    return dataclasses.replace(cfg, bn_eps=YOLOX_BN_EPS, bn_momentum=YOLOX_BN_MOMENTUM)


def _conv(features: int, kernel_size: int, cfg: LayerConfig, act: str, name: str, stride: int = 1,
          depthwise: bool = False) -> nn.Module:
    """YOLOX's `BaseConv` (conv + BN + act) or, with `depthwise`, its `DWConv` (depthwise k x k + BN + act, then
    1x1 + BN + act: the project's DSConv with both activations; YOLOX names the two `dconv`/`pconv`)."""
    if depthwise:
        return DSConv(features, cfg, stride=stride, kernel_size=kernel_size, act=(act, act), name=name)
    return ConvLayer(features, kernel_size, cfg, stride=stride, act=act, name=name)


class Bottleneck(nn.Module):
    """YOLOX's `Bottleneck` without shortcut (as in every PAFPN CSP layer): 1x1 then 3x3, same width."""

    features: int
    cfg: LayerConfig
    depthwise: bool = False
    act: str = "hswish"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = ConvLayer(self.features, 1, self.cfg, act=self.act, name="conv1")(x, train)
        return _conv(self.features, 3, self.cfg, self.act, "conv2", depthwise=self.depthwise)(x, train)


class CSPLayer(nn.Module):
    """YOLOX's `CSPLayer` (YOLOv5's C3): two 1x1 branches of half width, `depth` bottlenecks (1x1 then 3x3,
    no shortcut inside the PAFPN) on the first, concatenation, 1x1 to `features`."""

    features: int
    depth: int
    cfg: LayerConfig
    depthwise: bool = False
    act: str = "hswish"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        hidden = self.features // 2
        a = ConvLayer(hidden, 1, self.cfg, act=self.act, name="conv1")(x, train)
        b = ConvLayer(hidden, 1, self.cfg, act=self.act, name="conv2")(x, train)
        for i in range(self.depth):
            a = Bottleneck(hidden, self.cfg, self.depthwise, self.act, name=f"m_{i}")(a, train)
        return ConvLayer(self.features, 1, self.cfg, act=self.act, name="conv3")(jnp.concatenate([a, b], -1), train)


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    """nn.Upsample(scale_factor=2, mode="nearest") in NHWC."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class YOLOPAFPN(nn.Module):
    """YOLOX's PAFPN on (P2, P3, P4) with channels `widths`: top-down (lateral_conv0, C3_p4, reduce_conv1,
    C3_p3) then bottom-up (bu_conv2, C3_n3, bu_conv1, C3_n4) paths. Returns the three levels, finest first."""

    widths: Sequence[int]  # channels of P2, P3, P4 (and of the outputs)
    depth: int
    cfg: LayerConfig
    depthwise: bool = False
    act: str = "hswish"

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg, act, dw = self.cfg, self.act, self.depthwise
        c2, c3, c4 = self.widths
        x2, x1, x0 = features
        for fine, coarse in ((x2, x1), (x1, x0)):
            if fine.shape[1:3] != (2 * coarse.shape[1], 2 * coarse.shape[2]):
                raise ValueError(f"detection neck: feature maps {fine.shape[1:3]} and {coarse.shape[1:3]} are not "
                                 "2x apart; input height and width must be multiples of 32")
        csp = lambda width, name: CSPLayer(width, self.depth, cfg, dw, act, name=name)  # noqa: E731

        fpn_out0 = ConvLayer(c3, 1, cfg, act=act, name="lateral_conv0")(x0, train)
        f_out0 = csp(c3, "C3_p4")(jnp.concatenate([upsample_nearest_2x(fpn_out0), x1], -1), train)
        fpn_out1 = ConvLayer(c2, 1, cfg, act=act, name="reduce_conv1")(f_out0, train)
        pan_out2 = csp(c2, "C3_p3")(jnp.concatenate([upsample_nearest_2x(fpn_out1), x2], -1), train)

        p_out1 = _conv(c2, 3, cfg, act, "bu_conv2", stride=2, depthwise=dw)(pan_out2, train)
        pan_out1 = csp(c3, "C3_n3")(jnp.concatenate([p_out1, fpn_out1], -1), train)
        p_out0 = _conv(c3, 3, cfg, act, "bu_conv1", stride=2, depthwise=dw)(pan_out1, train)
        pan_out0 = csp(c4, "C3_n4")(jnp.concatenate([p_out0, fpn_out0], -1), train)
        return pan_out2, pan_out1, pan_out0


class YOLOXHead(nn.Module):
    """YOLOX's decoupled head, per level: 1x1 stem, two 3x3 convs for classification and two for regression,
    then 1x1 predictions (4 box, 1 objectness from the regression branch, C classes). Objectness and class
    biases start at -log((1 - 0.01) / 0.01). Returns (B, N, 5 + C) in the compute dtype."""

    num_classes: int
    width: int
    cfg: LayerConfig
    depthwise: bool = False
    act: str = "hswish"
    prior_prob: float = PRIOR_PROB

    @nn.compact
    def __call__(self, levels: Sequence[jax.Array], train: bool = False) -> jax.Array:
        cfg, act, dw = self.cfg, self.act, self.depthwise
        prior = nn.initializers.constant(-math.log((1 - self.prior_prob) / self.prior_prob))
        outputs = []
        for k, x in enumerate(levels):
            x = ConvLayer(self.width, 1, cfg, act=act, name=f"stems_{k}")(x, train)
            cls_x, reg_x = x, x
            for j in range(2):
                cls_x = _conv(self.width, 3, cfg, act, f"cls_convs_{k}_{j}", depthwise=dw)(cls_x, train)
                reg_x = _conv(self.width, 3, cfg, act, f"reg_convs_{k}_{j}", depthwise=dw)(reg_x, train)
            reg = Conv2d(4, 1, cfg, use_bias=True, name=f"reg_preds_{k}")(reg_x)
            obj = Conv2d(1, 1, cfg, use_bias=True, bias_init=prior, name=f"obj_preds_{k}")(reg_x)
            cls = Conv2d(self.num_classes, 1, cfg, use_bias=True, bias_init=prior, name=f"cls_preds_{k}")(cls_x)
            out = jnp.concatenate([reg, obj, cls], -1)
            outputs.append(out.reshape(out.shape[0], -1, out.shape[-1]))
        return jnp.concatenate(outputs, 1)


class EfficientViTDet(nn.Module):
    """backbone -> PAFPN on stage2/3/4 -> YOLOX head; returns raw predictions (B, N, 5 + C) float32."""

    backbone: nn.Module
    neck: YOLOPAFPN
    head: YOLOXHead

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.shape[1] % 32 or x.shape[2] % 32:
            raise ValueError(f"EfficientViT-Det input {x.shape[1]}x{x.shape[2]}: height and width must be "
                             "multiples of 32")
        features = self.backbone(x, train)
        levels = self.neck([features[f] for f in DET_FEATURES], train)
        return self.head(levels, train).astype(jnp.float32)


# ---------------------------------------------------------------------------- grid, decoding, box geometry
def detection_grid(height: int, width: int, strides: Sequence[int] = DET_STRIDES) -> np.ndarray:
    """(N, 3) float32 rows (x, y, stride) of every prediction point of a height x width input, in the
    model's output order (levels by stride, each row-major). Static: a numpy constant under jit."""
    rows = []
    for s in strides:
        ys, xs = np.meshgrid(np.arange(height // s), np.arange(width // s), indexing="ij")
        rows.append(np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, s)], 1))
    return np.concatenate(rows, 0).astype(np.float32)


def decode_boxes(raw_boxes: jax.Array, grid: jax.Array) -> jax.Array:
    """Raw (..., N, 4) (x offset, y offset, log w, log h) -> (..., N, 4) (cx, cy, w, h) in input pixels."""
    stride = grid[:, 2:3]
    xy = (raw_boxes[..., :2] + grid[:, :2]) * stride
    wh = jnp.exp(raw_boxes[..., 2:4]) * stride
    return jnp.concatenate([xy, wh], -1)


def xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
    """(..., 4) corners (x1, y1, x2, y2) -> (cx, cy, w, h)."""
    xy1, xy2 = boxes[..., :2], boxes[..., 2:4]
    return jnp.concatenate([(xy1 + xy2) * 0.5, xy2 - xy1], -1)


def cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
    """(..., 4) (cx, cy, w, h) -> corners (x1, y1, x2, y2), as YOLOX's post-processing computes them."""
    c, half = boxes[..., :2], boxes[..., 2:4] / 2
    return jnp.concatenate([c - half, c + half], -1)


def box_iou_cxcywh(a: jax.Array, b: jax.Array, eps: float = 0.0) -> jax.Array:
    """IoU of (cx, cy, w, h) boxes, broadcasting over leading axes: YOLOX's `bboxes_iou(xyxy=False)` (eps 0)
    and `IOUloss` (eps 1e-16 in the denominator)."""
    tl = jnp.maximum(a[..., :2] - a[..., 2:] / 2, b[..., :2] - b[..., 2:] / 2)
    br = jnp.minimum(a[..., :2] + a[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2)
    area_a = a[..., 2] * a[..., 3]
    area_b = b[..., 2] * b[..., 3]
    overlap = jnp.all(tl < br, -1)
    area_i = jnp.where(overlap, (br - tl)[..., 0] * (br - tl)[..., 1], 0.0)
    return area_i / (area_a + area_b - area_i + eps)


def box_iou_xyxy(a: jax.Array, b: jax.Array) -> jax.Array:
    """Pairwise IoU (K, L) of corner boxes (K, 4) and (L, 4), torchvision's `box_iou` formula."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = jnp.maximum(a[:, None, :2], b[None, :, :2])
    rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = jnp.clip(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


# ---------------------------------------------------------------------------- the zoo
def build_detector(o: BuildOptions) -> nn.Module:
    """An EfficientViT-Det of `o.spec.variant` (builder registered for `efficientvit[_v1]_det_<v>`)."""
    if o.timm:
        raise ValueError("timm has no EfficientViT detection models; use numerics='official'")
    if o.dropout:
        raise ValueError(f"{o.spec.name} has no dropout (YOLOX's head has none); leave dropout at 0")
    variant = o.spec.variant
    settings = DET_NECKS[variant]
    widths = tuple(B_BACKBONES[variant]["widths"][2:5])
    backbone = build_backbone(o, o.drop_path_rates(num_backbone_identity_blocks(variant)))
    cfg = yolox_config(o.cfg)
    neck = YOLOPAFPN(widths, settings.csp_depth, cfg, settings.depthwise, settings.act)
    head = YOLOXHead(o.classes(), widths[0], cfg, settings.depthwise, settings.act)
    return EfficientViTDet(backbone, neck, head)


def _register_detectors() -> None:
    for v in DET_NECKS:
        register_model(ModelSpec(f"efficientvit_det_{v}", "detection", v, DET_NUM_CLASSES, "coco"), build_detector)
        register_model(ModelSpec(f"efficientvit_v1_det_{v}", "detection", v, DET_NUM_CLASSES, "coco", design="v1"),
                       build_detector)


_register_detectors()
