"""Paper-v1 block design: structure (no multi-scale, k=5 FFN DWConv, downsampling shortcuts, hswish),
selection by name and by block_design, the Fast-SCNN-style seg head, and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evit_jax.models import create_model, get_model_spec, list_models


def _shapes(model, res=64):
    x = jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32)
    v = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
    return jax.tree_util.tree_map(lambda a: a.shape, v["params"])


def test_v1_structure():
    p = _shapes(create_model("efficientvit_backbone_v1_b1"))
    block = p["stages_3_op_list_1"]
    assert sorted(block["context_module"]["main"]) == ["proj", "qkv"]  # no multi-scale aggregation
    assert block["local_module"]["main"]["depth_conv"]["conv"]["kernel"] == (5, 5, 1, 1024)  # FFN DWConv k5, e=4
    for s in range(4):  # every downsampling block has the avgpool + 1x1 shortcut and a k5 depthwise conv
        down = p[f"stages_{s}_op_list_0"]
        assert down["shortcut"]["conv"]["conv"]["kernel"][:2] == (1, 1)
        assert down["main"]["depth_conv"]["conv"]["kernel"][:2] == (5, 5)
    assert p["stages_0_op_list_1"]["main"]["depth_conv"]["conv"]["kernel"][:2] == (5, 5)
    # the stem keeps k = 3
    assert p["input_stem_op_list_0"]["conv"]["kernel"][:2] == (3, 3)
    assert p["input_stem_op_list_1"]["main"]["depth_conv"]["conv"]["kernel"][:2] == (3, 3)


def test_v1_selection_by_name_and_keyword():
    assert get_model_spec("efficientvit-v1-b1").design == "v1"
    assert get_model_spec("efficientvit_b1").design == "v2"
    assert {"efficientvit_v1_b0", "efficientvit_seg_v1_b1_cityscapes", "efficientvit_backbone_v1_b3"} <= set(list_models())
    assert _shapes(create_model("efficientvit_b0", block_design="v1")) == _shapes(create_model("efficientvit_v1_b0"))
    assert _shapes(create_model("efficientvit_v1_b0", block_design="v2")) == _shapes(create_model("efficientvit_b0"))


def test_v1_forward_and_seg_head():
    model = create_model("efficientvit_seg_v1_b0_cityscapes", conv_impl="lax")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 64, 96, 3)), jnp.float32)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(x)
    assert sorted(k for k in variables["params"]["head"] if "proj" in k or "fuse" in k) == [
        "high_proj", "low_fuse", "low_proj"]
    y, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    assert y.shape == (1, 8, 12, 19) and bool(jnp.all(jnp.isfinite(y)))


def test_v1_with_another_attention_and_scales():
    p = _shapes(create_model("efficientvit_v1_b0", attention="softmax", scales=(3,)))
    assert "aggreg_0_0" in p["backbone"]["stages_3_op_list_1"]["context_module"]["main"]


def test_v1_bad_input():
    with pytest.raises(ValueError, match="B family"):
        create_model("efficientvit_l1", block_design="v1")
    with pytest.raises(ValueError, match="block_design"):
        create_model("efficientvit_b1", block_design="v9")
    model = create_model("efficientvit_backbone_v1_b0")
    with pytest.raises(ValueError, match="multiples of 32"):
        jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                       jax.ShapeDtypeStruct((1, 48, 48, 3), jnp.float32))
