"""Convolutional building blocks of EfficientViT (NHWC, Flax linen).

Module and parameter names mirror the official PyTorch code (`efficientvit/models/nn/ops.py`) so that
weight conversion is a mechanical rename: `conv`/`norm` inside ConvLayer, `depth_conv`/`point_conv`
inside DSConv, `inverted_conv`/`depth_conv`/`point_conv` inside MBConv, `spatial_conv`/`point_conv`
inside FusedMBConv, `conv1`/`conv2` inside ResBlock, and `main` inside a residual wrapper.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from evit_jax.models import ops

Dtype = Any

# The official training script (`--rand_init trunc_normal@0.02`, apps/utils/init.py `init_modules`) draws every
# conv/linear weight with torch's `trunc_normal_(std=0.02)`, whose bounds a=-2, b=2 are ABSOLUTE values, i.e.
# +-100 standard deviations: N(0, 0.02^2) in effect. (Flax's default bounds are +-2 standard deviations, which
# would shrink the std to 0.88 x 0.02 and cut the tails.) Biases start at zero, norm scales at one.
INIT_STD = 0.02
kernel_init = nn.initializers.truncated_normal(stddev=INIT_STD, lower=-2.0 / INIT_STD, upper=2.0 / INIT_STD)

# Scheduled stochastic depth (official `DropPathResidualBlock`, `scheduled=True`): the drop probability of
# every DropPath is its rate x the training progress in [0, 1]. A train step passes the progress as the
# variable collection `schedule_variables(progress)` beside params/batch_stats in `model.apply`; any model
# built from DropPath takes it, with no change to its `__call__`. Without it, rates apply unscaled; with
# train=False it is ignored.
SCHEDULE_COLLECTION = "schedule"
PROGRESS = "progress"

# BatchNorm re-estimation (official `reset_bn`): `model.apply(variables, x, train=False,
# mutable=[BN_MOMENTS_COLLECTION])` runs every BatchNorm on the statistics of the batch it sees (as in
# training; over the global batch under jit) with everything else in eval mode, and records each
# BatchNorm's batch mean and biased variance under its path in this collection.
BN_MOMENTS_COLLECTION = "bn_moments"


def schedule_variables(progress) -> dict:
    """The variable collection that scales every DropPath's rate by the training ``progress`` (a scalar,
    traced or not; clipped to [0, 1]): add it to the variables of a training ``model.apply``."""
    return {SCHEDULE_COLLECTION: {PROGRESS: jnp.asarray(progress, jnp.float32)}}


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """Settings shared by every layer of a model.

    dtype: compute dtype (float32 or bfloat16); param_dtype: storage dtype of parameters.
    bn_eps: BatchNorm/LayerNorm epsilon (1e-5 for B models, 1e-7 for L models in the official zoo).
    conv_impl: "auto" | "lax" | "fast" (see ops.conv2d).
    zero_last_gamma: initialise the last BN scale of every identity-residual block to zero
      (official `--last_gamma 0`).
    fold_batch_norm: build every ConvLayer's conv -> BatchNorm as one conv with a bias, for inference
      with variables made by `evit_jax.models.fold.fold_batch_norm` (no `norm` parameters, no batch_stats).
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn_eps: float = 1e-5
    bn_momentum: float = 0.9  # Flax convention: PyTorch momentum 0.1
    conv_impl: str = "auto"
    zero_last_gamma: bool = True
    fold_batch_norm: bool = False


def _triple(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


class BatchNorm(nn.Module):
    """BatchNorm2d with PyTorch semantics over the last axis.

    Batch statistics are taken over every axis but the last; under `jax.jit` with a sharded batch the
    mean is global (synchronised BN). Running variance uses the unbiased estimate, like PyTorch, and
    `num_batches_tracked` is kept so that PyTorch checkpoints round-trip exactly. With train=False and
    the `BN_MOMENTS_COLLECTION` mutable (BN re-estimation), it normalises with the batch's statistics
    and records them (mean, biased variance) instead of using the running ones.
    """

    cfg: LayerConfig
    eps: float | None = None
    zero_init: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        eps = self.cfg.bn_eps if self.eps is None else self.eps
        scale_init = nn.initializers.zeros if self.zero_init else nn.initializers.ones
        scale = self.param("scale", scale_init, (features,), self.cfg.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.cfg.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        tracked = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))

        reestimating = not train and not self.is_initializing() and self.is_mutable_collection(BN_MOMENTS_COLLECTION)
        if train or reestimating:
            xf = x.astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axes)
            var = jnp.mean(jnp.square(xf - mean), axes)
            if reestimating:
                self.put_variable(BN_MOMENTS_COLLECTION, "mean", mean)
                self.put_variable(BN_MOMENTS_COLLECTION, "var", var)
            elif not self.is_initializing():
                n = x.size // features
                m = self.cfg.bn_momentum
                unbiased = var * (n / max(n - 1, 1))
                ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
                ra_var.value = m * ra_var.value + (1.0 - m) * unbiased
                tracked.value = tracked.value + 1
        else:
            mean, var = ra_mean.value.astype(jnp.float32), ra_var.value.astype(jnp.float32)
        # Fold the normalisation into one multiply-add in float32, then return the compute dtype.
        mul = scale.astype(jnp.float32) * jax.lax.rsqrt(var + eps)
        add = bias.astype(jnp.float32) - mean * mul
        return (x.astype(jnp.float32) * mul + add).astype(self.cfg.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, computed in float32; parameters `scale`/`bias` (PyTorch weight/bias)."""

    cfg: LayerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), self.cfg.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.cfg.param_dtype)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.cfg.bn_eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.cfg.dtype)


class Conv2d(nn.Module):
    """torch.nn.Conv2d in NHWC: kernel (kh, kw, C_in/groups, C_out), symmetric padding k//2."""

    features: int
    kernel_size: int
    cfg: LayerConfig
    stride: int = 1
    groups: int = 1
    use_bias: bool = False
    bias_init: Callable[..., jax.Array] = nn.initializers.zeros  # YOLOX's prediction convs start at a prior

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c_in = x.shape[-1]
        if c_in % self.groups or self.features % self.groups:
            raise ValueError(f"Conv2d {self.name}: channels {c_in}->{self.features} not divisible by groups {self.groups}")
        k = self.kernel_size
        kernel = self.param("kernel", kernel_init, (k, k, c_in // self.groups, self.features), self.cfg.param_dtype)
        y = ops.conv2d(
            x.astype(self.cfg.dtype),
            kernel.astype(self.cfg.dtype),
            stride=self.stride,
            padding=k // 2,
            groups=self.groups,
            conv_impl=self.cfg.conv_impl,
        )
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.cfg.param_dtype)
            y = y + bias.astype(self.cfg.dtype)
        return y


class ConvLayer(nn.Module):
    """Conv2d -> optional BatchNorm -> optional activation (official `ConvLayer`).

    With `cfg.fold_batch_norm` the BatchNorm is already folded into the conv's kernel and bias
    (evit_jax/models/fold.py): the layer is Conv2d(use_bias=True) -> activation, inference only.
    """

    features: int
    kernel_size: int
    cfg: LayerConfig
    stride: int = 1
    groups: int = 1
    use_bias: bool = False
    norm: bool = True
    act: str | None = None
    zero_init_norm: bool = False
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.dropout > 0:
            # Dropout2d: whole channels are dropped.
            x = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(x)
        folded = self.norm and self.cfg.fold_batch_norm
        if folded and train:
            raise ValueError(f"ConvLayer {self.name}: a model with folded BatchNorm is inference-only (train=False)")
        x = Conv2d(
            self.features,
            self.kernel_size,
            self.cfg,
            stride=self.stride,
            groups=self.groups,
            use_bias=self.use_bias or folded,
            name="conv",
        )(x)
        if self.norm and not folded:
            x = BatchNorm(self.cfg, zero_init=self.zero_init_norm, name="norm")(x, train)
        act = ops.get_activation(self.act)
        return act(x) if act is not None else x


class LinearLayer(nn.Module):
    """Linear -> optional LayerNorm -> optional activation (official `LinearLayer`)."""

    features: int
    cfg: LayerConfig
    use_bias: bool = True
    norm: bool = False
    act: str | None = None
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        if self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Dense(
            self.features,
            use_bias=self.use_bias,
            dtype=self.cfg.dtype,
            param_dtype=self.cfg.param_dtype,
            kernel_init=kernel_init,
            name="linear",
        )(x)
        if self.norm:
            x = LayerNorm(self.cfg, name="norm")(x)
        act = ops.get_activation(self.act)
        return act(x) if act is not None else x


class DSConv(nn.Module):
    """Depthwise-separable conv: depthwise k x k (carries the stride) -> pointwise 1x1."""

    features: int
    cfg: LayerConfig
    stride: int = 1
    kernel_size: int = 3
    use_bias: Sequence[bool] | bool = False
    norm: Sequence[bool] | bool = True
    act: Sequence[str | None] = ("hswish", None)
    zero_init_last: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        use_bias, norm, act = _triple(self.use_bias, 2), _triple(self.norm, 2), _triple(self.act, 2)
        c_in = x.shape[-1]
        x = ConvLayer(c_in, self.kernel_size, self.cfg, stride=self.stride, groups=c_in, use_bias=use_bias[0],
                      norm=norm[0], act=act[0], name="depth_conv")(x, train)
        return ConvLayer(self.features, 1, self.cfg, use_bias=use_bias[1], norm=norm[1], act=act[1],
                         zero_init_norm=self.zero_init_last, name="point_conv")(x, train)


class MBConv(nn.Module):
    """Inverted bottleneck: 1x1 expand -> depthwise k x k (carries the stride) -> 1x1 project."""

    features: int
    cfg: LayerConfig
    stride: int = 1
    kernel_size: int = 3
    expand_ratio: float = 6
    mid_channels: int | None = None
    use_bias: Sequence[bool] | bool = False
    norm: Sequence[bool] | bool = True
    act: Sequence[str | None] = ("hswish", "hswish", None)
    zero_init_last: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        use_bias, norm, act = _triple(self.use_bias, 3), _triple(self.norm, 3), _triple(self.act, 3)
        mid = self.mid_channels or round(x.shape[-1] * self.expand_ratio)
        x = ConvLayer(mid, 1, self.cfg, use_bias=use_bias[0], norm=norm[0], act=act[0], name="inverted_conv")(x, train)
        x = ConvLayer(mid, self.kernel_size, self.cfg, stride=self.stride, groups=mid, use_bias=use_bias[1],
                      norm=norm[1], act=act[1], name="depth_conv")(x, train)
        return ConvLayer(self.features, 1, self.cfg, use_bias=use_bias[2], norm=norm[2], act=act[2],
                         zero_init_norm=self.zero_init_last, name="point_conv")(x, train)


class FusedMBConv(nn.Module):
    """Fused inverted bottleneck: full k x k expand conv (carries the stride) -> 1x1 project."""

    features: int
    cfg: LayerConfig
    stride: int = 1
    kernel_size: int = 3
    expand_ratio: float = 6
    mid_channels: int | None = None
    groups: int = 1
    use_bias: Sequence[bool] | bool = False
    norm: Sequence[bool] | bool = True
    act: Sequence[str | None] = ("hswish", None)
    zero_init_last: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        use_bias, norm, act = _triple(self.use_bias, 2), _triple(self.norm, 2), _triple(self.act, 2)
        mid = self.mid_channels or round(x.shape[-1] * self.expand_ratio)
        x = ConvLayer(mid, self.kernel_size, self.cfg, stride=self.stride, groups=self.groups, use_bias=use_bias[0],
                      norm=norm[0], act=act[0], name="spatial_conv")(x, train)
        return ConvLayer(self.features, 1, self.cfg, use_bias=use_bias[1], norm=norm[1], act=act[1],
                         zero_init_norm=self.zero_init_last, name="point_conv")(x, train)


class ResBlock(nn.Module):
    """Two k x k convs (the first carries the stride)."""

    features: int
    cfg: LayerConfig
    stride: int = 1
    kernel_size: int = 3
    expand_ratio: float = 1
    mid_channels: int | None = None
    use_bias: Sequence[bool] | bool = False
    norm: Sequence[bool] | bool = True
    act: Sequence[str | None] = ("hswish", None)
    zero_init_last: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        use_bias, norm, act = _triple(self.use_bias, 2), _triple(self.norm, 2), _triple(self.act, 2)
        mid = self.mid_channels or round(x.shape[-1] * self.expand_ratio)
        x = ConvLayer(mid, self.kernel_size, self.cfg, stride=self.stride, use_bias=use_bias[0], norm=norm[0],
                      act=act[0], name="conv1")(x, train)
        return ConvLayer(self.features, self.kernel_size, self.cfg, use_bias=use_bias[1], norm=norm[1], act=act[1],
                         zero_init_norm=self.zero_init_last, name="conv2")(x, train)


class DropPath(nn.Module):
    """Stochastic depth on the residual branch (per-sample), using the "dropout" RNG stream.

    Each sample's branch is dropped with probability ``rate`` (x ``progress`` when the apply's variables
    carry :func:`schedule_variables`) and the kept ones are scaled by 1 / keep probability.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        # The progress is one scalar for the whole model: it lives at the root of its collection.
        progress = self.scope.root.get_variable(SCHEDULE_COLLECTION, PROGRESS)
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        if progress is None:
            keep = 1.0 - self.rate
            mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
            return jnp.where(mask, x / keep, jnp.zeros_like(x))
        keep = 1.0 - self.rate * jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


class Residual(nn.Module):
    """Official `ResidualBlock`: the wrapped block is the child `main`.

    shortcut=True gives `main(x) + x` (with stochastic depth at `drop_path_rate`); shortcut=False gives
    `main(x)` (downsampling blocks).
    """

    block: type[nn.Module]
    block_kwargs: tuple[tuple[str, Any], ...]
    shortcut: bool = True
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kwargs = dict(self.block_kwargs)
        if self.shortcut and "zero_init_last" in [f.name for f in dataclasses.fields(self.block)]:
            kwargs.setdefault("zero_init_last", kwargs["cfg"].zero_last_gamma)
        y = self.block(**kwargs, name="main")(x, train)
        if not self.shortcut:
            return y
        if self.drop_path_rate > 0:
            y = DropPath(self.drop_path_rate, name="drop_path")(y, train)
        return y + x


def make_residual(block: type[nn.Module], shortcut: bool = True, drop_path_rate: float = 0.0, *, name: str,
                  **block_kwargs) -> Residual:
    """Residual(block(**block_kwargs)) named like the official `op_list.<i>` entry."""
    return Residual(block, tuple(sorted(block_kwargs.items())), shortcut, drop_path_rate, name=name)
