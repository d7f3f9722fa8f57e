"""Lightweight multi-scale linear attention (LiteMLA) and the EfficientViT block.

Layout: the qkv projection produces, per head, one contiguous block of channels [q(dim) k(dim) v(dim)]
(head-major, as the official code's reshape to (B, -1, 3*dim, H*W) implies). Each multi-scale
aggregation branch (depthwise s x s conv, then a grouped 1x1 conv with groups = 3*heads) produces another
3*total_dim channels, which become extra heads after concatenation.

The attention products and the normalising division always run in float32 with HIGHEST matmul precision,
whatever the compute dtype: the ReLU-kernel denominator loses all precision in bfloat16/float16
(official issues #15 and #110 are NaNs from exactly that).
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from evit_jax.models.layers import Conv2d, ConvLayer, LayerConfig, MBConv, make_residual

HIGHEST = lax.Precision.HIGHEST

# Signature of a global-context kernel: q, k, v of shape (B, N, heads, dim) in float32 -> (B, N, heads, dim).
AttentionFn = Callable[..., jax.Array]


def relu_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float) -> jax.Array:
    """Official `relu_linear_att`: ReLU kernel, O(N) cost.

    out_i = sum_j (k_j . q_i) v_j / (sum_j k_j . q_i + eps). The denominator comes, as in the official
    code, from a row of ones appended to v, so one pair of matmuls yields numerator and denominator.
    """
    q, k = jax.nn.relu(q), jax.nn.relu(k)
    v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
    vk = jnp.einsum("bnhe,bnhd->bhed", v, k, precision=HIGHEST)
    out = jnp.einsum("bhed,bnhd->bnhe", vk, q, precision=HIGHEST)
    return out[..., :-1] / (out[..., -1:] + eps)


def relu_quadratic_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float) -> jax.Array:
    """Official `relu_quadratic_att`, used when H*W <= dim: the N x N map, normalised over keys."""
    q, k = jax.nn.relu(q), jax.nn.relu(k)
    att = jnp.einsum("bkhd,bqhd->bhkq", k, q, precision=HIGHEST)
    att = att / (jnp.sum(att, axis=2, keepdims=True) + eps)
    return jnp.einsum("bkhe,bhkq->bqhe", v, att, precision=HIGHEST)


ATTENTION_KERNELS: dict[str, AttentionFn] = {
    "relu_linear": relu_linear_attention,
}


def get_attention_kernel(name: str) -> AttentionFn:
    if name not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention {name!r}; available: {sorted(ATTENTION_KERNELS)}")
    return ATTENTION_KERNELS[name]


class LiteMLA(nn.Module):
    """Lightweight multi-scale linear attention (official `LiteMLA`, older name `LiteMSA`).

    eps: 1e-15 in the official code, 1e-5 in timm's port.
    quadratic_fallback: the official code switches to the N x N form when H*W <= dim (timm never does;
      the two are the same function up to rounding).
    """

    features: int
    cfg: LayerConfig
    dim: int = 8
    heads: int | None = None
    heads_ratio: float = 1.0
    scales: Sequence[int] = (5,)
    eps: float = 1e-15
    attention: str = "relu_linear"
    quadratic_fallback: bool = True
    zero_init_last: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        batch, height, width, c_in = x.shape
        heads = self.heads or int(c_in // self.dim * self.heads_ratio)
        total_dim = heads * self.dim
        qkv = ConvLayer(3 * total_dim, 1, self.cfg, norm=False, name="qkv")(x, train)
        multi_scale = [qkv]
        for i, scale in enumerate(self.scales):
            agg = Conv2d(3 * total_dim, scale, self.cfg, groups=3 * total_dim, name=f"aggreg_{i}_0")(qkv)
            agg = Conv2d(3 * total_dim, 1, self.cfg, groups=3 * heads, name=f"aggreg_{i}_1")(agg)
            multi_scale.append(agg)
        qkv = jnp.concatenate(multi_scale, axis=-1)

        n = height * width
        qkv = qkv.reshape(batch, n, -1, 3 * self.dim).astype(jnp.float32)
        q, k, v = qkv[..., : self.dim], qkv[..., self.dim : 2 * self.dim], qkv[..., 2 * self.dim :]
        if self.attention == "relu_linear" and self.quadratic_fallback and n <= self.dim:
            out = relu_quadratic_attention(q, k, v, eps=self.eps)
        else:
            out = get_attention_kernel(self.attention)(q, k, v, eps=self.eps)
        out = out.reshape(batch, height, width, -1).astype(self.cfg.dtype)
        return ConvLayer(self.features, 1, self.cfg, zero_init_norm=self.zero_init_last, name="proj")(out, train)


class EfficientViTBlock(nn.Module):
    """x + LiteMLA(x) (`context_module`), then x + MBConv(x) (`local_module`); no pre-norm."""

    cfg: LayerConfig
    dim: int = 32
    heads_ratio: float = 1.0
    expand_ratio: float = 4
    scales: Sequence[int] = (5,)
    act: str = "hswish"
    eps: float = 1e-15
    attention: str = "relu_linear"
    quadratic_fallback: bool = True
    drop_path_rates: tuple[float, float] = (0.0, 0.0)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        x = make_residual(
            LiteMLA, True, self.drop_path_rates[0], name="context_module",
            features=c, cfg=self.cfg, dim=self.dim, heads_ratio=self.heads_ratio, scales=tuple(self.scales),
            eps=self.eps, attention=self.attention, quadratic_fallback=self.quadratic_fallback,
        )(x, train)
        return make_residual(
            MBConv, True, self.drop_path_rates[1], name="local_module",
            features=c, cfg=self.cfg, expand_ratio=self.expand_ratio, use_bias=(True, True, False),
            norm=(False, False, True), act=(self.act, self.act, None),
        )(x, train)
