"""Segmentation parity: the whole official seg model, rebuilt in PyTorch, against the Flax model.

timm has no segmentation models, so the reference is assembled here: the backbone is timm's (official
numerics: LiteMLA eps patched to 1e-15) and the official SegHead is written with plain torch ops
(F.conv2d, eval-mode F.batch_norm, F.interpolate bicubic, hardswish / tanh-GELU) that read their weights
from `flax_to_torch` of the Flax variables - so the converter's official seg layout is checked as well.
Random weights, randomised BatchNorm statistics; float32; tolerance max|jax - torch| <= 1e-5 * max(1, max|torch|).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evit_jax import convert
from evit_jax.convert import mapping
from evit_jax.convert.tensors import to_numpy
from evit_jax.models import create_model, get_model_spec
from tests._reference_weights import assert_close_to_torch, randomize_torch_norms

BN_EPS = {"b": 1e-5, "l": 1e-7}


def torch_backbone(torch, variant: str):
    """timm backbone of `variant` with random weights/BN statistics and the official LiteMLA eps."""
    import timm
    from timm.models.efficientvit_mit import LiteMLA

    model = timm.create_model(f"efficientvit_{variant}", pretrained=False).eval()
    randomize_torch_norms(torch, model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LiteMLA):
                module.eps = 1e-15
    return model


def official_seg_state_dict(torch, name: str, backbone) -> dict[str, np.ndarray]:
    """Official-layout seg state dict: the timm backbone's weights plus a random head."""
    spec = get_model_spec(name)
    rng = np.random.default_rng(1)
    timm_sd = {k: to_numpy(v) for k, v in backbone.state_dict().items()}
    sd = {}
    for e in convert.key_table(name):
        if e.torch_key.startswith("backbone."):  # the production official -> timm key map
            sd[e.torch_key] = timm_sd[mapping.timm_key(e.torch_key, spec.family)]
            continue
        assert e.torch_key.startswith("head."), e.torch_key
        leaf = e.torch_key.rsplit(".", 1)[1]
        if not e.is_float:
            sd[e.torch_key] = np.asarray(7, np.int64)
        elif leaf == "running_var" or (leaf == "weight" and ".norm." in e.torch_key):
            sd[e.torch_key] = rng.uniform(0.5, 1.5, e.torch_shape).astype(np.float32)
        elif leaf in ("running_mean", "bias"):
            sd[e.torch_key] = rng.uniform(-0.3, 0.3, e.torch_shape).astype(np.float32)
        else:  # conv weight, fan-in scaled
            fan_in = int(np.prod(e.torch_shape[1:]))
            sd[e.torch_key] = (rng.standard_normal(e.torch_shape) / np.sqrt(fan_in)).astype(np.float32)
    return sd


def torch_seg_head(torch, sd: dict, features: dict, family: str):
    """The official SegHead (DAGBlock, merge="add") from torch ops, weights by official key."""
    import torch.nn.functional as F

    act = {"b": F.hardswish, "l": lambda t: F.gelu(t, approximate="tanh")}[family]
    w = {k[len("head."):]: torch.from_numpy(np.asarray(v)) for k, v in sd.items() if k.startswith("head.")}

    def conv(x, prefix, activation=None):
        weight = w[f"{prefix}.conv.weight"]
        groups = x.shape[1] // weight.shape[1]
        x = F.conv2d(x, weight, w.get(f"{prefix}.conv.bias"), padding=weight.shape[-1] // 2, groups=groups)
        if f"{prefix}.norm.weight" in w:
            x = F.batch_norm(x, w[f"{prefix}.norm.running_mean"], w[f"{prefix}.norm.running_var"],
                             w[f"{prefix}.norm.weight"], w[f"{prefix}.norm.bias"], training=False, eps=BN_EPS[family])
        return activation(x) if activation is not None else x

    merged = conv(features["stage2"], "input_ops.2")
    for i, (fid, factor) in enumerate((("stage4", 4), ("stage3", 2))):
        y = conv(features[fid], f"input_ops.{i}.op_list.0")
        merged = merged + F.interpolate(y, scale_factor=factor, mode="bicubic", align_corners=False)
    x = merged
    j = 0
    while f"middle.op_list.{j}.main.point_conv.conv.weight" in w:
        block = f"middle.op_list.{j}.main"
        if f"{block}.spatial_conv.conv.weight" in w:  # FusedMBConv
            y = conv(conv(x, f"{block}.spatial_conv", act), f"{block}.point_conv")
        else:  # MBConv
            y = conv(conv(conv(x, f"{block}.inverted_conv", act), f"{block}.depth_conv", act), f"{block}.point_conv")
        x = x + y
        j += 1
    k = 0
    while f"output_ops.0.op_list.{k + 1}.conv.weight" in w:  # optional expand conv + BN + act
        x = conv(x, f"output_ops.0.op_list.{k}", act)
        k += 1
    return conv(x, f"output_ops.0.op_list.{k}")


@pytest.mark.parametrize("name,hw", [
    ("efficientvit_seg_b0_cityscapes", (96, 160)),   # mbconv middle, final expand; stage 4 map 3x5 (quadratic)
    ("efficientvit_seg_b1_ade20k", (128, 96)),       # mbconv middle, no final expand, 150 classes
    ("efficientvit_seg_l1_cityscapes", (128, 160)),  # fmbconv middle, GELU, BN eps 1e-7
])
def test_seg_parity(name, hw, torch, highest_precision):
    spec = get_model_spec(name)
    backbone = torch_backbone(torch, spec.variant)
    variables = convert.torch_to_flax(official_seg_state_dict(torch, name, backbone), name, layout="official")
    sd = convert.flax_to_torch(variables, name)  # the head reads the converted weights

    x = np.random.default_rng(0).standard_normal((1, 3) + hw, dtype=np.float32)
    with torch.no_grad():
        feats, t = {}, backbone.stem(torch.from_numpy(x))
        for i, stage in enumerate(backbone.stages):
            t = stage(t)
            feats[f"stage{i + 1}"] = t
        ref = torch_seg_head(torch, sd, feats, spec.family).numpy().transpose(0, 2, 3, 1)

    out = np.asarray(jax.jit(create_model(name).apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1))))
    assert out.shape == (1, hw[0] // 8, hw[1] // 8, spec.num_classes)
    assert float(np.abs(ref).max()) > 0.1
    assert_close_to_torch(out, ref)
