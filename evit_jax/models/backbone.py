"""EfficientViT backbones: the B series (`EfficientViTBackbone`) and the L series (`EfficientViTLargeBackbone`).

Both return the feature dict of the official code: `stage0` (stride 2) ... `stage4` (stride 32) and
`stage_final`. Submodule names are the official state-dict key prefixes with "." replaced by "_" inside one Flax name:
`input_stem.op_list.1` -> `input_stem_op_list_1`, `stages.2.op_list.0` -> `stages_2_op_list_0`
(evit_jax.convert maps them back mechanically).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from evit_jax.models.attention import EfficientViTBlock
from evit_jax.models.layers import ConvLayer, DSConv, FusedMBConv, LayerConfig, MBConv, ResBlock, make_residual


def linear_drop_path_rates(num_blocks: int, rate: float, skip: int = 0) -> tuple[float, ...]:
    """Official `apply_droppath`: the first `skip` identity-residual blocks are never dropped, the rest get
    rate * (i + 1) / n, linearly increasing with depth.

    The official training script applies it to `backbone.stages` only: the identity-residual blocks of
    every stage in depth order (the L series' stage 0 included), not the B series' `input_stem`, nor the
    head. `num_identity_blocks` of the backbones counts exactly those blocks."""
    n = num_blocks - skip
    return (0.0,) * min(skip, num_blocks) + tuple(rate * (i + 1) / n for i in range(max(n, 0)))


def _local_block(kind: str, fewer_norm: bool, act: str) -> tuple[type[nn.Module], dict]:
    """Official `build_local_block`: the block class and its bias/norm/act pattern."""
    if kind == "mb":
        block = MBConv
        pattern = dict(use_bias=(True, True, False), norm=(False, False, True)) if fewer_norm else {}
        return block, dict(pattern, act=(act, act, None))
    block = {"ds": DSConv, "res": ResBlock, "fmb": FusedMBConv}[kind]
    pattern = dict(use_bias=(True, False), norm=(False, True)) if fewer_norm else {}
    return block, dict(pattern, act=(act, None))


class _RateCursor:
    """Hands out per-block drop-path rates in the official module order."""

    def __init__(self, rates: Sequence[float]):
        self._rates, self._i = tuple(rates), 0

    def next(self) -> float:
        rate = self._rates[self._i] if self._i < len(self._rates) else 0.0
        self._i += 1
        return rate


class EfficientViTBackbone(nn.Module):
    """B series: stem (conv s2 + residual DSConvs), two MBConv stages, two EfficientViT stages."""

    widths: Sequence[int]
    depths: Sequence[int]
    cfg: LayerConfig
    dim: int = 32
    expand_ratio: float = 4
    act: str = "hswish"
    attention_eps: float = 1e-15
    attention: str = "relu_linear"
    quadratic_fallback: bool = True
    drop_path_rates: Sequence[float] = ()

    @staticmethod
    def num_identity_blocks(depths: Sequence[int]) -> int:
        """Identity-residual blocks of `stages` (stochastic depth applies to them; not to the input stem)."""
        return (depths[1] - 1) + (depths[2] - 1) + 2 * depths[3] + 2 * depths[4]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        cfg, act, rates = self.cfg, self.act, _RateCursor(self.drop_path_rates)
        features = {}

        x = ConvLayer(self.widths[0], 3, cfg, stride=2, act=act, name="input_stem_op_list_0")(x, train)
        for i in range(self.depths[0]):  # the input stem is not in `stages`: never dropped
            block, kw = _local_block("ds", False, act)
            x = make_residual(block, True, 0.0, name=f"input_stem_op_list_{i + 1}",
                              features=self.widths[0], cfg=cfg, **kw)(x, train)
        features["stage0"] = x

        for s in (1, 2):
            for i in range(self.depths[s]):
                block, kw = _local_block("mb", False, act)
                x = make_residual(block, i > 0, rates.next() if i > 0 else 0.0, name=f"stages_{s - 1}_op_list_{i}",
                                  features=self.widths[s], cfg=cfg, stride=2 if i == 0 else 1,
                                  expand_ratio=self.expand_ratio, **kw)(x, train)
            features[f"stage{s}"] = x

        for s in (3, 4):
            block, kw = _local_block("mb", True, act)
            x = make_residual(block, False, name=f"stages_{s - 1}_op_list_0", features=self.widths[s], cfg=cfg,
                              stride=2, expand_ratio=self.expand_ratio, **kw)(x, train)
            for i in range(self.depths[s]):
                x = EfficientViTBlock(
                    cfg, dim=self.dim, expand_ratio=self.expand_ratio, scales=(5,), act=act, eps=self.attention_eps,
                    attention=self.attention, quadratic_fallback=self.quadratic_fallback,
                    drop_path_rates=(rates.next(), rates.next()), name=f"stages_{s - 1}_op_list_{i + 1}",
                )(x, train)
            features[f"stage{s}"] = x
        features["stage_final"] = x
        return features


class EfficientViTLargeBackbone(nn.Module):
    """L series: stage 0 (conv s2 + ResBlocks), FusedMBConv stages 1-2, MBConv stage 3, EfficientViT stage 4.

    Each stage i >= 1 starts with a downsampling block of expand 4 * expand_list[i] and no shortcut.
    """

    widths: Sequence[int]
    depths: Sequence[int]
    cfg: LayerConfig
    block_list: Sequence[str] = ("res", "fmb", "fmb", "mb", "att")
    expand_list: Sequence[float] = (1, 4, 4, 4, 6)
    fewer_norm_list: Sequence[bool] = (False, False, False, True, True)
    qkv_dim: int = 32
    act: str = "gelu"
    attention_eps: float = 1e-15
    attention: str = "relu_linear"
    quadratic_fallback: bool = True
    drop_path_rates: Sequence[float] = ()

    @staticmethod
    def num_identity_blocks(depths: Sequence[int], block_list: Sequence[str] = ("res", "fmb", "fmb", "mb", "att")) -> int:
        """Identity-residual blocks of `stages` (all of them; stage 0 is the L series' stem)."""
        return sum(d * (2 if kind.startswith("att") else 1) for d, kind in zip(depths, block_list))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        cfg, act, rates = self.cfg, self.act, _RateCursor(self.drop_path_rates)
        features = {}
        x = ConvLayer(self.widths[0], 3, cfg, stride=2, act=act, name="stages_0_op_list_0")(x, train)
        for i in range(self.depths[0]):
            block, kw = _local_block(self.block_list[0], self.fewer_norm_list[0], act)
            x = make_residual(block, True, rates.next(), name=f"stages_0_op_list_{i + 1}", features=self.widths[0],
                              cfg=cfg, expand_ratio=self.expand_list[0], **kw)(x, train)
        features["stage0"] = x

        for s in range(1, len(self.widths)):
            kind = self.block_list[s]
            down_kind = kind if kind in ("mb", "fmb") else "mb"
            block, kw = _local_block(down_kind, self.fewer_norm_list[s], act)
            x = make_residual(block, False, name=f"stages_{s}_op_list_0", features=self.widths[s], cfg=cfg, stride=2,
                              expand_ratio=self.expand_list[s] * 4, **kw)(x, train)
            for i in range(self.depths[s]):
                name = f"stages_{s}_op_list_{i + 1}"
                if kind.startswith("att"):
                    x = EfficientViTBlock(
                        cfg, dim=self.qkv_dim, expand_ratio=self.expand_list[s], scales=(3,) if kind == "att@3" else (5,),
                        act=act, eps=self.attention_eps, attention=self.attention,
                        quadratic_fallback=self.quadratic_fallback, drop_path_rates=(rates.next(), rates.next()),
                        name=name,
                    )(x, train)
                else:
                    block, kw = _local_block(kind, self.fewer_norm_list[s], act)
                    x = make_residual(block, True, rates.next(), name=name, features=self.widths[s], cfg=cfg,
                                      expand_ratio=self.expand_list[s], **kw)(x, train)
            features[f"stage{s}"] = x
        features["stage_final"] = x
        return features
