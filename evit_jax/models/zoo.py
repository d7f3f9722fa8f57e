"""The model zoo: every official EfficientViT model, created by name.

Names: `efficientvit_{b0..b3,l1..l3}` (ImageNet classification), `efficientvit_seg_<v>_<dataset>`
(Cityscapes / ADE20K segmentation) and `efficientvit_backbone_{b0..b3,l0..l3}` (feature dicts).
The official hyphenated names (`efficientvit-b1`, `efficientvit-seg-b1-cityscapes`) and timm names with a
pretrained tag (`efficientvit_b1.r224_in1k`) are accepted as aliases.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from evit_jax.models.attention_kernels import attention_spec_string
from evit_jax.models.backbone import EfficientViTBackbone, EfficientViTLargeBackbone, linear_drop_path_rates
from evit_jax.models.cls import ClsHead, EfficientViTCls
from evit_jax.models.layers import LayerConfig
from evit_jax.models.seg import EfficientViTSeg, SegHead
from evit_jax.models.v1 import BLOCK_DESIGNS, EfficientViTV1Backbone, FusionSegHead

B_BACKBONES = {
    "b0": dict(widths=(8, 16, 32, 64, 128), depths=(1, 2, 2, 2, 2), dim=16),
    "b1": dict(widths=(16, 32, 64, 128, 256), depths=(1, 2, 3, 3, 4), dim=16),
    "b2": dict(widths=(24, 48, 96, 192, 384), depths=(1, 3, 4, 4, 6), dim=32),
    "b3": dict(widths=(32, 64, 128, 256, 512), depths=(1, 4, 6, 6, 9), dim=32),
}
L_BACKBONES = {
    "l0": dict(widths=(32, 64, 128, 256, 512), depths=(1, 1, 1, 4, 4)),
    "l1": dict(widths=(32, 64, 128, 256, 512), depths=(1, 1, 1, 6, 6)),
    "l2": dict(widths=(32, 64, 128, 256, 512), depths=(1, 2, 2, 8, 8)),
    "l3": dict(widths=(64, 128, 256, 512, 1024), depths=(1, 2, 2, 8, 8)),
}
CLS_HEAD_WIDTHS = {
    "b0": (1024, 1280), "b1": (1536, 1600), "b2": (2304, 2560), "b3": (2304, 2560),
    "l1": (3072, 3200), "l2": (3072, 3200), "l3": (6144, 6400),
}
# (variant, dataset) -> SegHead settings of the official seg zoo.
SEG_HEADS = {
    ("b0", "cityscapes"): dict(head_width=32, head_depth=1, expand_ratio=4, middle_op="mbconv", final_expand=4),
    ("b1", "cityscapes"): dict(head_width=64, head_depth=3, expand_ratio=4, middle_op="mbconv", final_expand=4),
    ("b1", "ade20k"): dict(head_width=64, head_depth=3, expand_ratio=4, middle_op="mbconv", final_expand=None),
    ("b2", "cityscapes"): dict(head_width=96, head_depth=3, expand_ratio=4, middle_op="mbconv", final_expand=4),
    ("b2", "ade20k"): dict(head_width=96, head_depth=3, expand_ratio=4, middle_op="mbconv", final_expand=None),
    ("b3", "cityscapes"): dict(head_width=128, head_depth=3, expand_ratio=4, middle_op="mbconv", final_expand=4),
    ("b3", "ade20k"): dict(head_width=128, head_depth=3, expand_ratio=4, middle_op="mbconv", final_expand=None),
    ("l1", "cityscapes"): dict(head_width=256, head_depth=3, expand_ratio=1, middle_op="fmbconv", final_expand=None),
    ("l1", "ade20k"): dict(head_width=128, head_depth=3, expand_ratio=4, middle_op="fmbconv", final_expand=8),
    ("l2", "cityscapes"): dict(head_width=256, head_depth=5, expand_ratio=1, middle_op="fmbconv", final_expand=None),
    ("l2", "ade20k"): dict(head_width=128, head_depth=3, expand_ratio=4, middle_op="fmbconv", final_expand=8),
}
SEG_NUM_CLASSES = {"cityscapes": 19, "ade20k": 150}
FAMILY_BN_EPS = {"b": 1e-5, "l": 1e-7}
FAMILY_ACT = {"b": "hswish", "l": "gelu"}
OFFICIAL_ATTENTION_EPS = 1e-15
TIMM_ATTENTION_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    task: str  # "classification" | "segmentation" | "backbone"
    variant: str  # "b0" ... "l3"
    num_classes: int | None = None
    dataset: str | None = None  # segmentation only
    design: str = "v2"  # "v2": released code; "v1": paper-v1 blocks (evit_jax.models.v1, no official weights)

    @property
    def family(self) -> str:
        return self.variant[0]

    @property
    def official_name(self) -> str:
        return self.name.replace("_", "-")


def _build_registry() -> dict[str, ModelSpec]:
    specs = {}
    for v in list(B_BACKBONES) + list(L_BACKBONES):
        specs[f"efficientvit_backbone_{v}"] = ModelSpec(f"efficientvit_backbone_{v}", "backbone", v)
    for v in CLS_HEAD_WIDTHS:
        specs[f"efficientvit_{v}"] = ModelSpec(f"efficientvit_{v}", "classification", v, 1000)
    for v, dataset in SEG_HEADS:
        name = f"efficientvit_seg_{v}_{dataset}"
        specs[name] = ModelSpec(name, "segmentation", v, SEG_NUM_CLASSES[dataset], dataset)
    # Paper-v1 designs of the B family: efficientvit_v1_b1, efficientvit_backbone_v1_b1, efficientvit_seg_v1_b1_ade20k.
    for v in B_BACKBONES:
        specs[f"efficientvit_backbone_v1_{v}"] = ModelSpec(f"efficientvit_backbone_v1_{v}", "backbone", v, design="v1")
        specs[f"efficientvit_v1_{v}"] = ModelSpec(f"efficientvit_v1_{v}", "classification", v, 1000, design="v1")
    for v, dataset in SEG_HEADS:
        if v in B_BACKBONES:
            name = f"efficientvit_seg_v1_{v}_{dataset}"
            specs[name] = ModelSpec(name, "segmentation", v, SEG_NUM_CLASSES[dataset], dataset, design="v1")
    return specs


MODEL_SPECS: dict[str, ModelSpec] = _build_registry()


def canonical_name(name: str) -> str:
    """`efficientvit-seg-b1-cityscapes`, `EfficientViT_B1`, `efficientvit_b1.r224_in1k` -> registry name."""
    return name.strip().lower().split(".")[0].replace("-", "_")


def list_models(task: str | None = None) -> list[str]:
    """Every model name (optionally only those of one task), sorted."""
    return sorted(n for n, s in MODEL_SPECS.items() if task is None or s.task == task)


def get_model_spec(name: str) -> ModelSpec:
    key = canonical_name(name)
    if key not in MODEL_SPECS:
        close = difflib.get_close_matches(key, MODEL_SPECS, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"unknown model {name!r}: {hint}see evit_jax.models.list_models() for all {len(MODEL_SPECS)} names")
    return MODEL_SPECS[key]


def _build_backbone(variant: str, cfg: LayerConfig, drop_path_rates: tuple[float, ...], design: str = "v2",
                    **attention_kw) -> nn.Module:
    if design == "v1":
        b = B_BACKBONES[variant]
        return EfficientViTV1Backbone(b["widths"], b["depths"], cfg, dim=b["dim"], drop_path_rates=drop_path_rates,
                                      **attention_kw)
    if variant in B_BACKBONES:
        return EfficientViTBackbone(cfg=cfg, act=FAMILY_ACT["b"], drop_path_rates=drop_path_rates,
                                    **B_BACKBONES[variant], **attention_kw)
    return EfficientViTLargeBackbone(cfg=cfg, act=FAMILY_ACT["l"], drop_path_rates=drop_path_rates,
                                     **L_BACKBONES[variant], **attention_kw)


def _num_identity_blocks(spec: ModelSpec) -> int:
    if spec.family == "b":
        n = EfficientViTBackbone.num_identity_blocks(B_BACKBONES[spec.variant]["depths"])
    else:
        n = EfficientViTLargeBackbone.num_identity_blocks(L_BACKBONES[spec.variant]["depths"])
    if spec.task == "segmentation":
        n += SEG_HEADS[(spec.variant, spec.dataset)]["head_depth"]
    return n


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    numerics: str = "official",
    attention: str = "relu_linear",
    attention_eps: float | None = None,
    quadratic_fallback: bool | None = None,
    bn_eps: float | None = None,
    drop_path_rate: float = 0.0,
    drop_path_skip: int = 0,
    dropout: float = 0.0,
    conv_impl: str = "auto",
    zero_last_gamma: bool = True,
    attention_options: Mapping[str, Any] | None = None,
    scales: Sequence[int] | None = None,
    block_design: str | None = None,
) -> nn.Module:
    """Build an EfficientViT model by name (see `list_models()`).

    numerics: "official" reproduces mit-han-lab/efficientvit (LiteMLA eps 1e-15, quadratic attention on
      maps with H*W <= dim); "timm" reproduces timm's port (eps 1e-5, no quadratic path, BN eps 1e-5 in
      the L classifiers' first head conv). Explicit `attention_eps` / `quadratic_fallback` win.
    drop_path_rate / drop_path_skip: official stochastic depth on identity-residual blocks, linearly
      increasing with depth, the first `drop_path_skip` blocks exempt.
    conv_impl: "auto" (fast CPU formulations on CPU, lax.conv elsewhere), "lax" or "fast".
    attention / attention_options / scales: the global-context kernel of every EfficientViT block, by name or
      spec string ("softmax", "focused(power=2)"), its options, and the multi-scale aggregation kernel sizes
      (None: the architecture's own); see evit_jax/models/attention_kernels.py and docs/ablation.md.
    block_design: "v2" (released code) or "v1" (paper-v1 blocks, B family only, evit_jax/models/v1.py);
      None: the name's own (`efficientvit_v1_b1` is v1).
    """
    spec = get_model_spec(name)
    if numerics not in ("official", "timm"):
        raise ValueError(f"numerics must be 'official' or 'timm', got {numerics!r}")
    timm = numerics == "timm"
    design = spec.design if block_design is None else block_design
    if design not in BLOCK_DESIGNS:
        raise ValueError(f"block_design must be one of {BLOCK_DESIGNS}, got {block_design!r}")
    if design == "v1" and spec.family != "b":
        raise ValueError(f"block_design='v1' exists only for the B family (b0..b3), not {spec.name}")
    attention = attention_spec_string(attention, attention_options, None if scales is None else tuple(scales))
    if timm and spec.task == "segmentation":
        raise ValueError("timm has no EfficientViT segmentation models; use numerics='official'")
    cfg = LayerConfig(dtype=dtype, param_dtype=param_dtype, bn_eps=bn_eps or FAMILY_BN_EPS[spec.family],
                      conv_impl=conv_impl, zero_last_gamma=zero_last_gamma)
    attention_kw = dict(
        attention=attention,
        attention_eps=attention_eps if attention_eps is not None else (TIMM_ATTENTION_EPS if timm else OFFICIAL_ATTENTION_EPS),
        quadratic_fallback=(not timm) if quadratic_fallback is None else quadratic_fallback,
    )
    rates = linear_drop_path_rates(_num_identity_blocks(spec), drop_path_rate, drop_path_skip) if drop_path_rate else ()
    backbone = _build_backbone(spec.variant, cfg, rates, design, **attention_kw)
    if spec.task == "backbone":
        if num_classes is not None:
            raise ValueError(f"{spec.name} is a backbone and has no classes")
        return backbone
    act = FAMILY_ACT[spec.family]
    n_classes = spec.num_classes if num_classes is None else num_classes
    if n_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes}")
    if spec.task == "classification":
        head = ClsHead(CLS_HEAD_WIDTHS[spec.variant], n_classes, cfg, act=act, dropout=dropout,
                       in_conv_bn_eps=1e-5 if timm and spec.family == "l" else None)
        return EfficientViTCls(backbone, head)
    n_backbone = len(rates) - SEG_HEADS[(spec.variant, spec.dataset)]["head_depth"] if rates else 0
    if design == "v1":
        seg = SEG_HEADS[(spec.variant, spec.dataset)]
        head = FusionSegHead(n_classes, cfg, head_width=seg["head_width"], head_depth=seg["head_depth"],
                             final_expand=seg["final_expand"], dropout=dropout, drop_path_rates=rates[n_backbone:])
        return EfficientViTSeg(backbone, head)
    head = SegHead(n_classes, cfg, act=act, dropout=dropout, drop_path_rates=rates[n_backbone:],
                   **SEG_HEADS[(spec.variant, spec.dataset)])
    return EfficientViTSeg(backbone, head)
