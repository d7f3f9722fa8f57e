"""Layer-by-layer parity with timm's EfficientViT modules (`timm.models.efficientvit_mit`), float32.

Each timm module gets random weights and randomised BatchNorm/LayerNorm statistics and affine parameters;
its state dict is mapped onto the Flax module with `evit_jax.convert.mapping` (the same per-key rules the
whole-model converter uses). Also: the bicubic resize against `F.interpolate(mode="bicubic")`.
Tolerance: max|jax - torch| <= 1e-5 * max(1, max|torch|) (`assert_close_to_torch`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from evit_jax.convert import mapping
from evit_jax.convert.tensors import to_numpy
from evit_jax.models.attention import EfficientViTBlock, LiteMLA
from evit_jax.models.cls import ClsHead
from evit_jax.models.layers import ConvLayer, DSConv, FusedMBConv, LayerConfig, MBConv, ResBlock
from evit_jax.models.resize import resize_bicubic
from tests._reference_weights import assert_close_to_torch, randomize_torch

CFG = LayerConfig(bn_eps=1e-5)


@pytest.fixture(scope="module")
def tvit():
    """timm's EfficientViT module file."""
    from timm.models import efficientvit_mit

    return efficientvit_mit


def _act(torch, name):
    from timm.layers import GELUTanh

    return {None: None, "hswish": torch.nn.Hardswish, "gelu": GELUTanh}[name]


def variables_from_torch(flax_module, x_nhwc, torch_module, rename=lambda key: key):
    """Map every variable of the Flax module onto the torch module's state dict; all keys must be used."""
    abstract = jax.eval_shape(lambda: flax_module.init(jax.random.key(0), x_nhwc))
    state = {k: to_numpy(v) for k, v in torch_module.state_dict().items()}
    flat = {}
    for path, sds in traverse_util.flatten_dict(abstract).items():
        collection, rest = path[0], path[1:]
        key = rename(mapping.flax_to_torch_key(collection, rest))
        value = mapping.torch_to_flax_array(collection, rest, state.pop(key))
        assert value.shape == sds.shape, (key, value.shape, sds.shape)
        flat[path] = value
    assert not state, f"torch keys left unused: {sorted(state)}"
    return traverse_util.unflatten_dict(flat)


def check(torch, flax_module, torch_module, shape, *, rename=lambda key: key, seed=0, nchw_out=True):
    """Run both modules on the same random NCHW input and compare."""
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
    variables = variables_from_torch(flax_module, x_nhwc, torch_module, rename)
    with torch.no_grad():
        ref = torch_module(torch.from_numpy(x)).numpy()
    if nchw_out:
        ref = ref.transpose(0, 2, 3, 1)
    out = np.asarray(jax.jit(flax_module.apply)(variables, x_nhwc))
    assert_close_to_torch(out, ref)
    return ref


# --------------------------------------------------------------------------------- conv blocks


@pytest.mark.parametrize("kernel,stride,groups,bias,norm,act", [
    (3, 1, 1, False, True, "hswish"),
    (3, 2, 1, False, True, "gelu"),
    (3, 2, "dw", True, False, None),
    (1, 1, 1, True, True, None),
    (5, 2, "dw", False, True, "hswish"),
])
def test_conv_norm_act(tvit, torch, highest_precision, kernel, stride, groups, bias, norm, act):
    c_in, c_out = 16, (16 if groups == "dw" else 24)
    g = c_in if groups == "dw" else groups
    tm = randomize_torch(torch, tvit.ConvNormAct(c_in, c_out, kernel, stride, groups=g, bias=bias,
                                           norm_layer=torch.nn.BatchNorm2d if norm else None, act_layer=_act(torch, act)))
    fm = ConvLayer(c_out, kernel, CFG, stride=stride, groups=g, use_bias=bias, norm=norm, act=act)
    check(torch, fm, tm, (2, c_in, 10, 14))


@pytest.mark.parametrize("stride,fewer_norm", [(1, False), (2, True)])
def test_dsconv(tvit, torch, highest_precision, stride, fewer_norm):
    pattern = dict(use_bias=(True, False), norm_layer=(None, torch.nn.BatchNorm2d)) if fewer_norm else {}
    tm = randomize_torch(torch, tvit.DSConv(16, 24, stride=stride, act_layer=(torch.nn.Hardswish, None), **pattern))
    flax_pattern = dict(use_bias=(True, False), norm=(False, True)) if fewer_norm else {}
    fm = DSConv(24, CFG, stride=stride, act=("hswish", None), **flax_pattern)
    check(torch, fm, tm, (2, 16, 12, 10))


@pytest.mark.parametrize("stride,expand,fewer_norm,act", [(1, 4, False, "hswish"), (2, 6, True, "gelu"),
                                                          (2, 16, False, "hswish")])
def test_mbconv(tvit, torch, highest_precision, stride, expand, fewer_norm, act):
    pattern = dict(use_bias=(True, True, False), norm_layer=(None, None, torch.nn.BatchNorm2d)) if fewer_norm else {}
    tm = randomize_torch(torch, tvit.MBConv(16, 24, stride=stride, expand_ratio=expand,
                                      act_layer=(_act(torch, act), _act(torch, act), None), **pattern))
    flax_pattern = dict(use_bias=(True, True, False), norm=(False, False, True)) if fewer_norm else {}
    fm = MBConv(24, CFG, stride=stride, expand_ratio=expand, act=(act, act, None), **flax_pattern)
    check(torch, fm, tm, (2, 16, 12, 12))


@pytest.mark.parametrize("stride,expand", [(1, 4), (2, 16)])
def test_fused_mbconv(tvit, torch, highest_precision, stride, expand):
    tm = randomize_torch(torch, tvit.FusedMBConv(16, 16, stride=stride, expand_ratio=expand,
                                           act_layer=(_act(torch, "gelu"), None)))
    fm = FusedMBConv(16, CFG, stride=stride, expand_ratio=expand, act=("gelu", None))
    check(torch, fm, tm, (2, 16, 10, 12))


@pytest.mark.parametrize("stride", [1, 2])
def test_resblock(tvit, torch, highest_precision, stride):
    tm = randomize_torch(torch, tvit.ConvBlock(16, 16, stride=stride, act_layer=(_act(torch, "gelu"), None)))
    fm = ResBlock(16, CFG, stride=stride, act=("gelu", None))
    check(torch, fm, tm, (2, 16, 10, 10))


# ------------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("c,dim,heads,heads_ratio,scales,hw,eps", [
    # linear path (H*W > dim), timm's eps and the official eps
    (64, 16, None, 1.0, (5,), (8, 8), 1e-5),
    (64, 16, None, 1.0, (5,), (6, 10), 1e-15),
    (96, 32, None, 1.0, (3, 5), (7, 7), 1e-15),
    (64, 8, 4, 1.0, (3,), (5, 7), 1e-5),
    (64, 16, None, 2.0, (5,), (6, 6), 1e-15),
    # quadratic path (H*W <= dim): official fallback vs timm's linear form, same function
    (64, 16, None, 1.0, (5,), (4, 4), 1e-15),
    (96, 32, None, 1.0, (3, 5), (2, 3), 1e-15),
    (128, 32, 2, 1.0, (5,), (1, 1), 1e-15),
])
def test_lite_mla(tvit, torch, highest_precision, c, dim, heads, heads_ratio, scales, hw, eps):
    tm = randomize_torch(torch, tvit.LiteMLA(c, c, heads=heads, heads_ratio=heads_ratio, dim=dim, scales=scales, eps=eps))
    fm = LiteMLA(c, CFG, dim=dim, heads=heads, heads_ratio=heads_ratio, scales=scales, eps=eps, quadratic_fallback=True)
    check(torch, fm, tm, (2, c) + hw)


@pytest.mark.parametrize("act,dim,expand,hw", [("hswish", 16, 4, (8, 8)), ("hswish", 16, 4, (4, 4)),
                                               ("gelu", 32, 6, (7, 9)), ("gelu", 32, 6, (4, 6))])
def test_efficientvit_block(tvit, torch, highest_precision, act, dim, expand, hw):
    tm = randomize_torch(torch, tvit.EfficientVitBlock(64, head_dim=dim, expand_ratio=expand, act_layer=_act(torch, act)))
    tm.context_module.main.eps = 1e-15  # official eps; tiny maps then take the official quadratic path
    fm = EfficientViTBlock(CFG, dim=dim, expand_ratio=expand, act=act, eps=1e-15)
    check(torch, fm, tm, (2, 64) + hw)


@pytest.mark.parametrize("act", ["hswish", "gelu"])
def test_classifier_head(tvit, torch, highest_precision, act):
    tm = randomize_torch(torch, tvit.ClassifierHead(64, [96, 128], num_classes=10, act_layer=_act(torch, act)))
    fm = ClsHead((96, 128), 10, CFG, act=act)
    check(torch, fm, tm, (2, 64, 7, 5), rename=lambda k: mapping.timm_key("head." + k, "b")[len("head."):],
          nchw_out=False)


# --------------------------------------------------------------------------------------- resize


@pytest.mark.parametrize("src,dst", [
    ((7, 7), (14, 14)),    # x2
    ((4, 5), (16, 20)),    # x4
    ((1, 3), (4, 12)),     # x4 from a single row
    ((7, 9), (13, 20)),    # arbitrary up
    ((20, 17), (9, 5)),    # arbitrary down
    ((12, 6), (5, 16)),    # down in H, up in W
])
def test_resize_bicubic_matches_torch(torch, src, dst):
    import torch.nn.functional as F

    x = np.random.default_rng(0).standard_normal((2, 3) + src, dtype=np.float32) * 10
    ref = F.interpolate(torch.from_numpy(x), size=dst, mode="bicubic", align_corners=False).numpy()
    out = np.asarray(resize_bicubic(jnp.asarray(x.transpose(0, 2, 3, 1)), dst)).transpose(0, 3, 1, 2)
    assert out.dtype == np.float32
    assert_close_to_torch(out, ref)
    if dst[0] % src[0] == 0 and dst[1] % src[1] == 0 and dst != src:  # the SegHead calls it with scale_factor
        factor = (dst[0] // src[0], dst[1] // src[1])
        by_factor = F.interpolate(torch.from_numpy(x), scale_factor=factor, mode="bicubic", align_corners=False).numpy()
        assert_close_to_torch(out, by_factor)
