"""The model zoo: every official EfficientViT model, created by name.

Names: `efficientvit_{b0..b3,l1..l3}` (ImageNet classification), `efficientvit_seg_<v>_<dataset>`
(Cityscapes / ADE20K segmentation), `efficientvit_backbone_{b0..b3,l0..l3}` (feature dicts) and
`efficientvit[_v1]_det_{b0..b3}` (COCO detection, registered by evit_jax/models/det.py).
The official hyphenated names (`efficientvit-b1`, `efficientvit-seg-b1-cityscapes`) and timm names with a
pretrained tag (`efficientvit_b1.r224_in1k`) are accepted as aliases.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Mapping, Sequence

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
    task: str  # "classification" | "segmentation" | "detection" | "backbone" (or a test's own)
    variant: str  # "b0" ... "l3"
    num_classes: int | None = None
    dataset: str | None = None  # segmentation only
    design: str = "v2"  # "v2": released code; "v1": paper-v1 blocks (evit_jax.models.v1, no official weights)

    @property
    def family(self) -> str:
        return self.variant[0]


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """What `create_model` hands a registered builder: the shared options, already checked."""

    spec: ModelSpec
    cfg: LayerConfig  # dtype, param_dtype, BN eps, conv_impl, zero-gamma
    attention_kw: Mapping[str, Any]  # attention, attention_eps, quadratic_fallback
    num_classes: int | None  # the caller's override (None: the spec's own)
    drop_path_rate: float
    drop_path_skip: int
    dropout: float
    design: str  # "v2" | "v1"
    timm: bool  # numerics="timm"

    def drop_path_rates(self, num_blocks: int) -> tuple[float, ...]:
        """Official stochastic-depth rates of `num_blocks` identity-residual blocks (empty when off)."""
        if not self.drop_path_rate:
            return ()
        return linear_drop_path_rates(num_blocks, self.drop_path_rate, self.drop_path_skip)

    def classes(self) -> int:
        n = self.spec.num_classes if self.num_classes is None else self.num_classes
        if n is None or n < 1:
            raise ValueError(f"num_classes must be a positive integer, got {self.num_classes}")
        return n


Builder = Callable[[BuildOptions], nn.Module]
_REGISTRY: dict[str, tuple[ModelSpec, Builder]] = {}


def register_model(spec: ModelSpec, builder: Builder) -> None:
    """Adds a model to the zoo: `create_model(spec.name)` then calls `builder(options)`.

    The zoo registers every official model below; other modules (detection) and tests register their own.
    Registering a name again replaces it (a test re-registering its stand-in model is harmless).
    """
    _REGISTRY[spec.name] = (spec, builder)


def canonical_name(name: str) -> str:
    """`efficientvit-seg-b1-cityscapes`, `EfficientViT_B1`, `efficientvit_b1.r224_in1k` -> registry name."""
    return name.strip().lower().split(".")[0].replace("-", "_")


def list_models(task: str | None = None) -> list[str]:
    """Every model name (optionally only those of one task), sorted."""
    return sorted(n for n, (s, _) in _REGISTRY.items() if task is None or s.task == task)


def get_model_spec(name: str) -> ModelSpec:
    key = canonical_name(name)
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, _REGISTRY, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"unknown model {name!r}: {hint}see evit_jax.models.list_models() for all {len(_REGISTRY)} names")
    return _REGISTRY[key][0]


# ---------------------------------------------------------------------------- the official models
def build_backbone(options: BuildOptions, rates: Sequence[float] = ()) -> nn.Module:
    """The backbone of `options.spec.variant` in `options.design`, with per-block drop-path `rates`."""
    variant, cfg, attention_kw = options.spec.variant, options.cfg, options.attention_kw
    if options.design == "v1":
        b = B_BACKBONES[variant]
        return EfficientViTV1Backbone(b["widths"], b["depths"], cfg, dim=b["dim"], drop_path_rates=tuple(rates),
                                      **attention_kw)
    if variant in B_BACKBONES:
        return EfficientViTBackbone(cfg=cfg, act=FAMILY_ACT["b"], drop_path_rates=tuple(rates),
                                    **B_BACKBONES[variant], **attention_kw)
    return EfficientViTLargeBackbone(cfg=cfg, act=FAMILY_ACT["l"], drop_path_rates=tuple(rates),
                                     **L_BACKBONES[variant], **attention_kw)


def num_backbone_identity_blocks(variant: str) -> int:
    """Identity-residual blocks of a backbone (the blocks stochastic depth applies to)."""
    if variant in B_BACKBONES:
        return EfficientViTBackbone.num_identity_blocks(B_BACKBONES[variant]["depths"])
    return EfficientViTLargeBackbone.num_identity_blocks(L_BACKBONES[variant]["depths"])


def _build_backbone_model(o: BuildOptions) -> nn.Module:
    if o.num_classes is not None:
        raise ValueError(f"{o.spec.name} is a backbone and has no classes")
    return build_backbone(o, o.drop_path_rates(num_backbone_identity_blocks(o.spec.variant)))


def _build_classifier(o: BuildOptions) -> nn.Module:
    v = o.spec.variant
    head = ClsHead(CLS_HEAD_WIDTHS[v], o.classes(), o.cfg, act=FAMILY_ACT[o.spec.family], dropout=o.dropout,
                   in_conv_bn_eps=1e-5 if o.timm and o.spec.family == "l" else None)
    return EfficientViTCls(build_backbone(o, o.drop_path_rates(num_backbone_identity_blocks(v))), head)


def _build_segmenter(o: BuildOptions) -> nn.Module:
    if o.timm:
        raise ValueError("timm has no EfficientViT segmentation models; use numerics='official'")
    spec, seg = o.spec, SEG_HEADS[(o.spec.variant, o.spec.dataset)]
    n_backbone = num_backbone_identity_blocks(spec.variant)
    rates = o.drop_path_rates(n_backbone + seg["head_depth"])
    backbone = build_backbone(o, rates[:n_backbone])
    if o.design == "v1":
        head = FusionSegHead(o.classes(), o.cfg, head_width=seg["head_width"], head_depth=seg["head_depth"],
                             final_expand=seg["final_expand"], dropout=o.dropout, drop_path_rates=rates[n_backbone:])
    else:
        head = SegHead(o.classes(), o.cfg, act=FAMILY_ACT[spec.family], dropout=o.dropout,
                       drop_path_rates=rates[n_backbone:], **seg)
    return EfficientViTSeg(backbone, head)


def _register_official_models() -> None:
    for v in list(B_BACKBONES) + list(L_BACKBONES):
        register_model(ModelSpec(f"efficientvit_backbone_{v}", "backbone", v), _build_backbone_model)
    for v in CLS_HEAD_WIDTHS:
        register_model(ModelSpec(f"efficientvit_{v}", "classification", v, 1000), _build_classifier)
    for v, dataset in SEG_HEADS:
        name = f"efficientvit_seg_{v}_{dataset}"
        register_model(ModelSpec(name, "segmentation", v, SEG_NUM_CLASSES[dataset], dataset), _build_segmenter)
    # Paper-v1 designs of the B family: efficientvit_v1_b1, efficientvit_backbone_v1_b1, efficientvit_seg_v1_b1_ade20k.
    for v in B_BACKBONES:
        register_model(ModelSpec(f"efficientvit_backbone_v1_{v}", "backbone", v, design="v1"), _build_backbone_model)
        register_model(ModelSpec(f"efficientvit_v1_{v}", "classification", v, 1000, design="v1"), _build_classifier)
    for v, dataset in SEG_HEADS:
        if v in B_BACKBONES:
            name = f"efficientvit_seg_v1_{v}_{dataset}"
            register_model(ModelSpec(name, "segmentation", v, SEG_NUM_CLASSES[dataset], dataset, design="v1"),
                           _build_segmenter)


_register_official_models()


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
    fold_batch_norm: bool = False,
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
    fold_batch_norm: an inference-only model whose BatchNorms are folded into the preceding convs; it takes
      the variables of `evit_jax.models.fold.fold_batch_norm` (see `evit_jax.models.fold.folded_model`).
    """
    spec = get_model_spec(name)
    if numerics not in ("official", "timm"):
        raise ValueError(f"numerics must be 'official' or 'timm', got {numerics!r}")
    design = spec.design if block_design is None else block_design
    if design not in BLOCK_DESIGNS:
        raise ValueError(f"block_design must be one of {BLOCK_DESIGNS}, got {block_design!r}")
    if design == "v1" and spec.family != "b":
        raise ValueError(f"block_design='v1' exists only for the B family (b0..b3), not {spec.name}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes}")
    timm = numerics == "timm"
    attention = attention_spec_string(attention, attention_options, None if scales is None else tuple(scales))
    cfg = LayerConfig(dtype=dtype, param_dtype=param_dtype, bn_eps=bn_eps or FAMILY_BN_EPS.get(spec.family, 1e-5),
                      conv_impl=conv_impl, zero_last_gamma=zero_last_gamma, fold_batch_norm=fold_batch_norm)
    attention_kw = dict(
        attention=attention,
        attention_eps=attention_eps if attention_eps is not None else (TIMM_ATTENTION_EPS if timm else OFFICIAL_ATTENTION_EPS),
        quadratic_fallback=(not timm) if quadratic_fallback is None else quadratic_fallback,
    )
    options = BuildOptions(spec, cfg, attention_kw, num_classes, drop_path_rate, drop_path_skip, dropout, design, timm)
    return _REGISTRY[spec.name][1](options)

# Detection models register themselves (evit_jax/models/det.py imports this module's builders).
import evit_jax.models.det  # noqa: E402,F401
