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

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from evit_jax.models.attention_kernels import parse_attention, relu_quadratic_attention
from evit_jax.models.layers import Conv2d, ConvLayer, LayerConfig, MBConv, make_residual


class LiteMLA(nn.Module):
    """Lightweight multi-scale linear attention (official `LiteMLA`, older name `LiteMSA`), with the
    global-context kernel chosen by `attention` (see evit_jax/models/attention_kernels.py).

    attention: a kernel name or spec string ("relu_linear", "softmax", "focused(power=2, value_dwc=0)",
      "relu_linear(scales=(3, 5))"...). Every kernel uses the same qkv / aggregation / projection
      parameters, so official weights load into any variant; only `value_dwc` adds a parameter.
    scales: the architecture's multi-scale aggregation kernel sizes; a `scales` option in the spec wins.
    eps: 1e-15 in the official code, 1e-5 in timm's port.
    quadratic_fallback: the official code switches to the N x N form when H*W <= dim (timm never does;
      the two are the same function up to rounding). Only relu_linear has this fallback.
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
        spec = parse_attention(self.attention)
        scales = self.scales if spec.scales is None else spec.scales
        batch, height, width, c_in = x.shape
        heads = self.heads or int(c_in // self.dim * self.heads_ratio)
        total_dim = heads * self.dim
        qkv = ConvLayer(3 * total_dim, 1, self.cfg, norm=False, name="qkv")(x, train)
        multi_scale = [qkv]
        for i, scale in enumerate(scales):
            agg = Conv2d(3 * total_dim, scale, self.cfg, groups=3 * total_dim, name=f"aggreg_{i}_0")(qkv)
            agg = Conv2d(3 * total_dim, 1, self.cfg, groups=3 * heads, name=f"aggreg_{i}_1")(agg)
            multi_scale.append(agg)
        qkv = jnp.concatenate(multi_scale, axis=-1)

        n = height * width
        qkv = qkv.reshape(batch, n, -1, 3 * self.dim).astype(jnp.float32)
        q, k, v = jnp.split(qkv, [self.dim, 2 * self.dim], axis=-1)
        if spec.name == "relu_linear" and self.quadratic_fallback and n <= self.dim:
            out = relu_quadratic_attention(q, k, v, eps=self.eps)
        else:
            out = spec.fn(q, k, v, eps=self.eps)
        if spec.value_dwc:
            out = out + self._value_dwc(v, height, width, spec.value_dwc)
        out = out.reshape(batch, height, width, -1).astype(self.cfg.dtype)
        return ConvLayer(self.features, 1, self.cfg, zero_init_norm=self.zero_init_last, name="proj")(out, train)

    def _value_dwc(self, v: jax.Array, height: int, width: int, kernel_size: int) -> jax.Array:
        """FLatten's DWC term: one depthwise k x k conv (with bias) over each head's V map, shared by heads."""
        batch, _, heads, dim = v.shape
        maps = v.transpose(0, 2, 1, 3).reshape(batch * heads, height, width, dim)
        y = Conv2d(dim, kernel_size, self.cfg, groups=dim, use_bias=True, name="value_dwc")(maps)
        return y.astype(jnp.float32).reshape(batch, heads, height * width, dim).transpose(0, 2, 1, 3)


class EfficientViTBlock(nn.Module):
    """x + LiteMLA(x) (`context_module`), then x + MBConv(x) (`local_module`); no pre-norm.

    `attention` is passed to LiteMLA unchanged (a kernel name or spec string, see LiteMLA).
    local_kernel_size: the MBConv's depthwise kernel (3 officially; 5 in the paper-v1 design, evit_jax.models.v1).
    """

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
    local_kernel_size: int = 3

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
            features=c, cfg=self.cfg, expand_ratio=self.expand_ratio, kernel_size=self.local_kernel_size,
            use_bias=(True, True, False),
            norm=(False, False, True), act=(self.act, self.act, None),
        )(x, train)
