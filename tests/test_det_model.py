"""EfficientViT-Det models (evit_jax/models/det.py): zoo entries, YOLOX's structure and parameter counts, the
output layout and its grid, YOLOX's prior bias, a jitted train-mode forward + grad, bad input.

The neck and head were compared once with YOLOX's own PyTorch modules on the same weights (outputs equal
within 1.2e-7; docs/detection.md, "Comparison with YOLOX"); the counts below are those modules' counts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evit_jax import convert
from evit_jax.models import create_model, det, get_model_spec, list_models
from evit_jax.models.layers import LayerConfig
from evit_jax.models.random_weights import random_variables

VARIANTS = ("b0", "b1", "b2", "b3")
# Parameters of YOLOX 0.3.0's YOLOPAFPN (without its backbone) and YOLOXHead (80 classes), counted on the
# PyTorch modules: Nano (width 0.25, depthwise), Tiny (0.375), S (0.5), all depth 0.33.
YOLOX_NECK_HEAD_PARAMS = {"b1": (347_424, 104_767), "b2": (1_596_096, 1_087_455), "b3": (2_834_688, 1_920_895)}
NECK_MODULES = ["C3_n3", "C3_n4", "C3_p3", "C3_p4", "bu_conv1", "bu_conv2", "lateral_conv0", "reduce_conv1"]


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _params(name: str, **kw) -> dict:
    flat = convert.abstract_variables(name, **kw)
    tree: dict = {}
    for path, value in flat.items():
        if path[0] == "params":
            node = tree
            for key in path[1:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
    return tree


def test_zoo_lists_the_detectors():
    names = [f"efficientvit_det_{v}" for v in VARIANTS] + [f"efficientvit_v1_det_{v}" for v in VARIANTS]
    # (other tests may register stand-in detectors under other names)
    assert [n for n in list_models("detection") if n.startswith("efficientvit_")] == sorted(names)
    spec = get_model_spec("efficientvit-v1-det-b1")
    assert (spec.task, spec.variant, spec.num_classes, spec.dataset, spec.design) == (
        "detection", "b1", 80, "coco", "v1")
    assert get_model_spec("efficientvit_det_b2").design == "v2"


@pytest.mark.parametrize("variant", sorted(YOLOX_NECK_HEAD_PARAMS))
def test_neck_and_head_have_yoloxs_modules_and_counts(variant):
    params = _params(f"efficientvit_det_{variant}")
    assert sorted(params) == ["backbone", "head", "neck"]
    assert sorted(params["neck"]) == NECK_MODULES
    assert (_count(params["neck"]), _count(params["head"])) == YOLOX_NECK_HEAD_PARAMS[variant]
    head = params["head"]
    for k in range(3):
        assert {f"stems_{k}", f"cls_convs_{k}_0", f"cls_convs_{k}_1", f"reg_convs_{k}_0", f"reg_convs_{k}_1",
                f"cls_preds_{k}", f"reg_preds_{k}", f"obj_preds_{k}"} <= set(head)
    assert head["cls_preds_0"]["kernel"].shape[-1] == 80 and head["obj_preds_2"]["bias"].shape == (1,)
    assert sorted(params["neck"]["C3_p4"]) == ["conv1", "conv2", "conv3", "m_0"]
    # the backbone subtree is the backbone model's own (ImageNet checkpoints load into it)
    assert jax.tree_util.tree_map(lambda x: x.shape, params["backbone"]) == jax.tree_util.tree_map(
        lambda x: x.shape, _params(f"efficientvit_backbone_{variant}"))


def test_torch_keys_read_like_yoloxs():
    keys = {e.torch_key for e in convert.key_table("efficientvit_det_b1")}
    assert {"neck.C3_p4.m.0.conv1.conv.weight", "neck.bu_conv2.depth_conv.conv.weight", "head.stems.0.norm.bias",
            "head.cls_convs.2.1.point_conv.conv.weight", "head.cls_preds.1.weight", "head.obj_preds.0.bias"} <= keys


@pytest.mark.parametrize("name", sorted(list_models("detection")))
def test_every_detector_builds_at_640(name):
    model = create_model(name, num_classes=3, dtype=jnp.bfloat16)  # bfloat16 compute, float32 output
    out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0],
                         jax.ShapeDtypeStruct((2, 640, 640, 3), jnp.float32))
    assert out.shape == (2, 80 * 80 + 40 * 40 + 20 * 20, 4 + 1 + 3) and out.dtype == jnp.float32


def test_jitted_train_forward_and_grad():
    """One compile (the neck and head are the same code for every variant; docs/detection.md records the same
    check run once for all eight detectors)."""
    model = create_model("efficientvit_det_b0", num_classes=5, conv_impl="lax", drop_path_rate=0.1)
    variables = random_variables(model, (2, 64, 64, 3))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)

    def loss(params, stats):
        y, updates = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"],
                                 rngs={"dropout": jax.random.key(1)})
        return jnp.mean(jnp.square(y)), (y, updates)

    (value, (y, updates)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables["params"], variables["batch_stats"])
    assert y.shape == (2, len(det.detection_grid(64, 64)), 10) and np.isfinite(float(value))
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves) and sum(float(jnp.abs(g).sum()) for g in leaves) > 0
    assert grads["head"]["cls_preds_2"]["bias"].shape == (5,) and float(jnp.abs(grads["neck"]["C3_n4"]["conv3"]
                                                                              ["conv"]["kernel"]).sum()) > 0
    moved = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"], variables["batch_stats"])
    assert any(jax.tree_util.tree_leaves(moved["neck"])) and any(jax.tree_util.tree_leaves(moved["head"]))


def test_prior_bias_and_yolox_batchnorm():
    head = det.YOLOXHead(3, 8, det.yolox_config(LayerConfig(conv_impl="lax")))
    levels = [jnp.zeros((1, 8 // s, 8 // s, 8)) for s in (1, 2, 4)]
    params = jax.jit(head.init)(jax.random.key(0), levels)["params"]
    prior = -math.log((1 - 0.01) / 0.01)
    for k in range(3):
        np.testing.assert_allclose(params[f"cls_preds_{k}"]["bias"], [prior] * 3, rtol=1e-6)
        np.testing.assert_allclose(params[f"obj_preds_{k}"]["bias"], [prior], rtol=1e-6)
        assert not np.asarray(params[f"reg_preds_{k}"]["bias"]).any()
    cfg = det.yolox_config(LayerConfig(bn_eps=1e-5, bn_momentum=0.9))
    assert (cfg.bn_eps, cfg.bn_momentum) == (1e-3, 0.97)  # PyTorch momentum 0.03


def test_grid_and_decoding():
    grid = det.detection_grid(64, 96)
    assert grid.shape == (8 * 12 + 4 * 6 + 2 * 3, 3) and grid.dtype == np.float32
    # row-major per level (index = y * width + x), levels by stride: the head's flattening order
    np.testing.assert_array_equal(grid[[0, 1, 12, 13, 95, 96, 97, 120, 125]],
                                  [[0, 0, 8], [1, 0, 8], [0, 1, 8], [1, 1, 8], [11, 7, 8], [0, 0, 16], [1, 0, 16],
                                   [0, 0, 32], [2, 1, 32]])
    raw = jnp.array([[[0.5, 0.25, 0.0, math.log(2.0)]] * 2])
    boxes = det.decode_boxes(raw, jnp.asarray(grid[[13, 125]]))
    np.testing.assert_allclose(boxes[0], [[12.0, 10.0, 8.0, 16.0], [80.0, 40.0, 32.0, 64.0]], rtol=1e-6)
    corners = det.cxcywh_to_xyxy(boxes)
    np.testing.assert_allclose(corners[0, 0], [8.0, 2.0, 16.0, 18.0])
    np.testing.assert_allclose(det.xyxy_to_cxcywh(corners), boxes, rtol=1e-6)


def test_bad_input_is_one_clear_error():
    model = create_model("efficientvit_det_b0")
    with pytest.raises(ValueError, match="multiples of 32"):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jax.ShapeDtypeStruct((1, 48, 64, 3), jnp.float32))
    with pytest.raises(ValueError, match="timm has no EfficientViT detection"):
        create_model("efficientvit_det_b0", numerics="timm")
    with pytest.raises(ValueError, match="no dropout"):
        create_model("efficientvit_det_b0", dropout=0.1)
