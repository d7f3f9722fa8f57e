"""Serving exports (evit_jax/export): every format reloaded in its own runtime and compared with JAX.

References: the unfolded JAX model with its default convolutions on the same weights (random weights with
random BatchNorm statistics), torch/timm for the PyTorch -> Flax -> ONNX chain, PIL and the host-side
eval transforms for the baked-in preprocessing. Tolerance for float32 outputs: 1e-4 x max |reference|
(what `python -m evit_jax.export --check` uses; measured ~1e-6). Small inputs (64-128 px) keep it fast.
"""

from __future__ import annotations

import collections
import json
import os

# TensorFlow must not be loaded before triton (which timm and torch.compile import): both carry LLVM, and
# triton's library crashes the process when TensorFlow's is already there. Loading timm first (as the
# PyTorch-chain test needs anyway) makes the order safe for this pytest worker and every later test file.
import timm  # noqa: F401  isort: skip

import jax
import numpy as np
import onnx
import pytest
from PIL import Image

from evit_jax.convert import torch_to_flax
from evit_jax.data import seg_transforms, transforms
from evit_jax.export import ExportError, ExportSpec, check, export, read_metadata
from evit_jax.export import formats, preprocess
from evit_jax.export.__main__ import main as export_main
from evit_jax.export.api import compare, random_inputs
from evit_jax.export.onnx_graph import dynamic_shape_nodes
from evit_jax.export.serving import load_variables, serving_function
from evit_jax.tasks.classification import IMAGENET_MEAN, IMAGENET_STD

TOLERANCE = 1e-4
CASES = {  # name: (model, height, width)
    "b0": ("efficientvit_b0", 64, 64),
    "b1": ("efficientvit_b1", 64, 64),
    "seg_b0_64": ("efficientvit_seg_b0_cityscapes", 64, 64),
    "seg_b0_96x128": ("efficientvit_seg_b0_cityscapes", 96, 128),
}
_REFERENCES: dict = {}


def _reference(case: str, layout: str = "nhwc"):
    """(spec template, weights, input of batch 5, JAX output) of a case, computed once per module."""
    key = (case, layout)
    if key not in _REFERENCES:
        model, h, w = CASES[case]
        spec = ExportSpec(model, "stablehlo", h, w, layout=layout).validate()
        variables = load_variables(spec)  # random weights, random BN statistics (seed 0)
        x = random_inputs(spec, 5)
        # lax.conv: the quickest to compile; the CPU formulations equal it (tests/test_ops.py).
        reference = np.asarray(jax.jit(serving_function(spec, variables, export=False, conv_impl="lax"))(x))
        _REFERENCES[key] = (spec, variables, x, reference)
    return _REFERENCES[key]


@pytest.mark.parametrize("fmt", ["stablehlo", "onnx", "savedmodel", "tflite"])
@pytest.mark.parametrize("case", list(CASES))
def test_format_matches_jax_at_batch_1_and_5(case, fmt, tmp_path):
    template, variables, x, reference = _reference(case)
    spec = ExportSpec(template.model, fmt, template.height, template.width)  # dynamic batch
    out = export(spec, tmp_path / f"{case}.{fmt}", variables=variables)
    run = formats.LOADERS[fmt](out, read_metadata(out))
    for batch in (1, 5):
        y = run(x[:batch])
        assert y.shape == reference[:batch].shape
        assert compare(y, reference[:batch]) < TOLERANCE, (case, fmt, batch)
    if fmt == "onnx":
        graph = onnx.load(str(out))
        assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        assert dynamic_shape_nodes(graph) == []  # no Shape ops, every Reshape/Pad/Expand target a constant
        assert "BatchNormalization" not in {n.op_type for n in graph.graph.node}


def test_static_batch_and_nchw_layout(tmp_path):
    """NCHW in and out (PyTorch serving stacks), fixed batch 2: the TFLite default is a fixed batch."""
    template, variables, x, reference = _reference("seg_b0_96x128", layout="nchw")
    assert x.shape == (5, 3, 96, 128) and reference.shape == (5, 19, 12, 16)
    for fmt in ("onnx", "tflite"):
        spec = ExportSpec(template.model, fmt, 96, 128, batch=2, layout="nchw")
        out = export(spec, tmp_path / f"seg.{fmt}", variables=variables)
        run = formats.LOADERS[fmt](out, read_metadata(out))
        assert compare(run(x[:2]), reference[:2]) < TOLERANCE
        with pytest.raises(Exception, match="batch|dimension|Got: 3"):  # onnxruntime / our TFLite runner refuse
            run(x[:3])


def test_onnx_of_a_timm_model_equals_torch(torch, tmp_path):
    """timm efficientvit_b0 (random weights) -> state dict -> torch_to_flax -> ONNX (NCHW) -> onnxruntime vs torch."""
    torch.manual_seed(0)
    net = timm.create_model("efficientvit_b0", pretrained=False).eval()
    with torch.no_grad():  # non-trivial BN statistics, as after training
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    variables = torch_to_flax(state, "efficientvit_b0")
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    spec = ExportSpec("efficientvit_b0", "onnx", 64, 64, layout="nchw", numerics="timm")
    out = export(spec, tmp_path / "timm_b0.onnx", variables=variables)
    got = formats.LOADERS["onnx"](out, read_metadata(out))(x)
    assert compare(got, expected) < TOLERANCE


def test_pil_bicubic_matrix_equals_pil():
    """The antialiased bicubic of the classification preprocessing is PIL's (float mode: no uint8 rounding)."""
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (37, 53)).astype(np.float32)
    for out_h, out_w in [(20, 29), (64, 91), (37, 53)]:
        expected = np.asarray(Image.fromarray(image, mode="F").resize((out_w, out_h), Image.BICUBIC))
        got = preprocess.pil_bicubic_matrix(37, out_h) @ image @ preprocess.pil_bicubic_matrix(53, out_w).T
        np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-5)


def test_preprocessing_in_the_graph_matches_the_host_transforms():
    """uint8 -> model input in the graph vs evit_jax/data (PIL for classification): equal up to PIL's
    fixed-point weights (one level at most, rarely)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(image).resize((100, 80), Image.BILINEAR))  # some spatial correlation
    cls = preprocess.classification_inputs(image[None], (64, 64), 0.95)
    host = transforms.resize_center_crop(image, 64, 0.95)
    pixels = np.asarray(cls[0]) * IMAGENET_STD + IMAGENET_MEAN
    assert np.abs(pixels - host).max() <= 1.0 + 1e-3 and np.abs(pixels - host).mean() < 0.01
    seg = preprocess.segmentation_inputs(image[None], (64, 96))
    host = seg_transforms.resize_image(image, (64, 96), "bicubic")
    pixels = np.asarray(seg[0]) * IMAGENET_STD + IMAGENET_MEAN
    assert np.abs(pixels - host).max() <= 1.0 + 1e-3 and np.abs(pixels - host).mean() < 0.01


@pytest.mark.parametrize("model, fmt", [("efficientvit_b0", "onnx"), ("efficientvit_seg_b0_cityscapes", "stablehlo")])
def test_preprocess_artifacts_check_against_jax(model, fmt, tmp_path):
    """--preprocess: uint8 images of 80x100 in; logits (classification) or the label map at 80x100."""
    spec = ExportSpec(model, fmt, 64, 64, preprocess=True, input_height=80, input_width=100)
    out = export(spec, tmp_path / f"pre.{fmt}")
    meta = read_metadata(out)
    assert (meta.input_height, meta.input_width) == (80, 100)
    results = check(out)
    assert [r.input for r in results] == ["random batch 1", "random batch 5"] and all(r.ok for r in results)
    labels = formats.LOADERS[fmt](out, meta)(random_inputs(meta, 2))
    if model.startswith("efficientvit_seg"):
        assert labels.shape == (2, 80, 100) and labels.dtype in (np.int32, np.int64)
        assert results[0].tolerance == 1e-3  # share of pixels whose classes tie within rounding
    else:
        assert labels.shape == (2, 1000)


def test_half_precision_onnx_keeps_attention_division_in_float32(tmp_path):
    template, variables, x, _ = _reference("b0")
    spec = ExportSpec("efficientvit_b0", "onnx", 64, 64, dtype="float16")
    out = export(spec, tmp_path / "b0_fp16.onnx", variables=variables)
    reference = np.asarray(jax.jit(serving_function(read_metadata(out), variables, export=False))(x))
    got = formats.LOADERS["onnx"](out, read_metadata(out))(x)
    assert np.isfinite(got).all() and compare(got, reference) < 2e-2
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(out)))
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.graph.value_info) + list(graph.graph.output)}
    divisions = collections.Counter(types.get(n.output[0]) for n in graph.graph.node if n.op_type == "Div")
    assert divisions[onnx.TensorProto.FLOAT] >= 4  # the 4 LiteMLA blocks of B0 divide in float32
    assert any(n.op_type == "Conv" for n in graph.graph.node)
    kernels = [t for t in graph.graph.initializer if len(t.dims) == 4]
    assert kernels and all(t.data_type == onnx.TensorProto.FLOAT16 for t in kernels)


def test_cli_export_then_check_with_an_image(tmp_path, capsys):
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "b0.stablehlo"
    assert export_main(["--model", "efficientvit-b0", "--format", "stablehlo", "--res", "64", "--out", str(out),
                        "--no-check"]) == 0
    meta = json.loads((tmp_path / "b0.stablehlo.json").read_text())
    assert meta["model"] == "efficientvit_b0" and meta["batch"] is None and meta["checkpoint"] is None
    assert export_main(["--check", str(out), str(image)]) == 0
    printed = capsys.readouterr().out
    assert f"{image}: max relative difference" in printed and printed.rstrip().endswith("OK")
    # The artifact needs no evit_jax code: jax.export alone runs it.
    exported = jax.export.deserialize(bytearray(out.read_bytes()))
    assert exported.in_avals[0].shape[1:] == (64, 64, 3) and "cpu" in exported.platforms


def _refused(argv, capsys) -> str:
    assert export_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("evit_jax.export: error:")
    return err


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, torch):
    out = tmp_path / "x.onnx"
    base = ["--model", "efficientvit_b0", "--out", str(out)]
    assert "unknown format 'pt'" in _refused(base + ["--format", "pt"], capsys)
    assert "multiples of 32" in _refused(base + ["--format", "onnx", "--res", "100"], capsys)
    assert "unknown model" in _refused(["--model", "efficientvit_b9", "--format", "onnx", "--out", str(out)], capsys)
    assert "float16" in _refused(base + ["--format", "tflite", "--dtype", "bfloat16"], capsys)
    # A checkpoint of another model: the converter names the model it most likely belongs to.
    b1 = timm.create_model("efficientvit_b1", pretrained=False)
    ckpt = tmp_path / "b1.pth"
    torch.save(b1.state_dict(), ckpt)
    assert "efficientvit_b1" in _refused(base + ["--format", "onnx", "--checkpoint", str(ckpt)], capsys)
    assert "no export description" in _refused(["--check", str(ckpt)], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b1.pth"]
    # An existing --out is kept unless --overwrite.
    out.write_text("keep me")
    assert "already exists" in _refused(base + ["--format", "onnx", "--res", "64"], capsys)
    assert out.read_text() == "keep me"
    with pytest.raises(ExportError, match="add --preprocess"):
        ExportSpec("efficientvit_b0", "onnx", input_height=80).validate()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert os.path.exists(ckpt)
