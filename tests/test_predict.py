"""evit_jax.predict: outputs at the input's size for odd sizes (seg and cls models with random
weights written by the converter), palettes, and one-line errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from evit_jax import predict
from evit_jax.convert import flax_to_torch, save_variables, write_torch_checkpoint
from evit_jax.models import create_model


def _init(name: str) -> dict:
    model = create_model(name)
    return jax.jit(lambda key: model.init(key, jnp.zeros((1, 64, 64, 3)), train=False))(jax.random.key(0))


@pytest.fixture(scope="module")
def odd_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "odd.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory):
    variables = _init("efficientvit_seg_b0_cityscapes")
    return save_variables(variables, tmp_path_factory.mktemp("ckpt") / "seg_b0", "efficientvit_seg_b0_cityscapes")


@pytest.fixture(scope="module")
def cls_variables():
    return _init("efficientvit_b0")


@pytest.fixture(scope="module")
def cls_checkpoint(tmp_path_factory, cls_variables):
    path = tmp_path_factory.mktemp("ckpt") / "b0.pt"
    return write_torch_checkpoint(flax_to_torch(cls_variables, "efficientvit_b0"), path)


@pytest.mark.parametrize("short_side", [0, 64])
def test_segmentation_writes_mask_and_overlay_at_the_input_size(odd_image, seg_checkpoint, tmp_path, capsys,
                                                               short_side):
    out = tmp_path / "mask.png"
    rc = predict.run(["--model", "efficientvit-seg-b0-cityscapes", "--checkpoint", str(seg_checkpoint),
                      "--short_side", str(short_side), "--out", str(out), str(odd_image)])
    assert rc == 0
    mask = np.asarray(Image.open(out))
    overlay = np.asarray(Image.open(tmp_path / "mask_overlay.png"))
    assert mask.shape == (37, 53, 3) and overlay.shape == (37, 53, 3)
    palette = {tuple(c) for c in predict.CITYSCAPES_PALETTE}
    assert {tuple(c) for c in mask.reshape(-1, 3)} <= palette      # every pixel is a class colour
    printed = capsys.readouterr().out
    assert "37x53" in printed and "%" in printed


def test_classification_prints_top5(odd_image, cls_checkpoint, capsys):
    rc = predict.run(["--model", "efficientvit_b0", "--checkpoint", str(cls_checkpoint),
                      "--image_size", "64", str(odd_image)])
    assert rc == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if "class" in l]
    assert len(lines) == 5
    probs = [float(l.split("p=")[1]) for l in lines]
    assert probs == sorted(probs, reverse=True)  # the values: test_classification_top5_equals_timm_...


def test_input_size_rules():
    assert predict.seg_input_size(37, 53, 0) == (32, 64)
    assert predict.seg_input_size(512, 683, 512) == (512, 704)     # official ADE20K rule
    assert predict.seg_input_size(683, 512, 512) == (704, 512)
    assert predict.seg_input_size(1024, 2048, 1024) == (1024, 2048)
    assert predict.seg_input_size(10, 10, 0) == (32, 32)


def test_generated_palette_is_distinct():
    palette = predict.generated_palette(150)
    assert len({tuple(c) for c in palette}) == 150


@pytest.mark.parametrize("args,message", [
    (["--model", "efficientvit_b9", "--checkpoint", "x.pt"], "unknown model"),
    (["--model", "efficientvit_b0", "--checkpoint", "/nonexistent/x.pt"], "does not exist"),
    (["--model", "efficientvit_backbone_b0", "--checkpoint", "x.pt"], "backbone"),
])
def test_errors_are_one_line(odd_image, capsys, args, message):
    rc = predict.run(args + [str(odd_image)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1


def test_missing_image_is_reported_before_loading(cls_checkpoint, capsys, tmp_path):
    rc = predict.run(["--model", "efficientvit_b0", "--checkpoint", str(cls_checkpoint), str(tmp_path / "no.jpg")])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err


# ---------------------------------------------------------------------------- compile once per shape
# jax.monitoring reports this event once per XLA executable built (jit cache hits report
# nothing); it is jax's public instrumentation hook, unlike the size of a jit's private cache.
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _compilations(fn) -> list[str]:
    """Names of the functions XLA compiled while ``fn()`` ran."""
    compiled = []

    def listener(event, duration, **kwargs):
        if event == _BACKEND_COMPILE_EVENT:
            compiled.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return compiled


def _images(*sizes):
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]


def test_segmentation_compiles_once_per_input_size():
    import flax.linen as nn

    class TinySeg(nn.Module):  # logits at stride 8, like the segmentation heads
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Conv(3, (8, 8), strides=8)(x)

    model = TinySeg()
    variables = jax.jit(lambda key: model.init(key, jnp.zeros((1, 32, 32, 3))))(jax.random.key(0))
    images = _images((37, 53), (64, 40), (37, 53))  # the first and last share their size
    masks = []
    compiled = _compilations(lambda: masks.extend(predict.predict_segmentation(model, variables, im, 0)
                                                  for im in images))
    assert len(compiled) == 2, compiled
    assert [m.shape for m in masks] == [(37, 53), (64, 40), (37, 53)]
    # A new model object with the same definition reuses the compiled function too.
    assert _compilations(lambda: predict.predict_segmentation(TinySeg(), variables, images[0], 0)) == []


def test_classification_compiles_once():
    import flax.linen as nn

    class TinyCls(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(4)(nn.Conv(8, (3, 3), strides=2)(x).mean(axis=(1, 2)))

    model = TinyCls()
    variables = jax.jit(lambda key: model.init(key, jnp.zeros((1, 32, 32, 3))))(jax.random.key(0))
    probs = []
    # Any image size: every image is resized and cropped to the same 32x32 input.
    compiled = _compilations(lambda: probs.extend(predict.predict_classification(model, variables, im, 32, 1.0)
                                                  for im in _images((37, 53), (64, 40), (50, 50))))
    assert len(compiled) == 1, compiled
    for p in probs:
        assert p.shape == (4,) and abs(float(p.sum()) - 1) < 1e-5


def test_classification_top5_equals_timm_on_the_same_checkpoint(odd_image, cls_checkpoint, cls_variables, capsys,
                                                               torch):
    """The printed top-5 (classes and probabilities) equal timm's EfficientViT-B0 holding the same
    weights (the checkpoint's variables in timm's layout), on torchvision's Resize(ceil(64 / 0.9)) + CenterCrop(64) of the same image (the
    official evaluation transform). Tolerance: the printed 4 decimals (5e-5) plus 1e-5 of float32."""
    import math

    import timm
    from torchvision import transforms as T

    rc = predict.run(["--model", "efficientvit_b0", "--checkpoint", str(cls_checkpoint),
                      "--image_size", "64", "--crop_ratio", "0.9", str(odd_image)])
    assert rc == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if "p=" in l]
    printed = [(int(l.split("class ")[1].split(")")[0].split()[0]), float(l.split("p=")[1])) for l in lines]

    model = timm.create_model("efficientvit_b0", pretrained=False).eval()
    model.load_state_dict({k: torch.from_numpy(np.array(v))
                           for k, v in flax_to_torch(cls_variables, "efficientvit_b0", layout="timm").items()})
    preprocess = T.Compose([T.Resize(math.ceil(64 / 0.9), interpolation=T.InterpolationMode.BICUBIC),
                            T.CenterCrop(64), T.ToTensor(),
                            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    with torch.no_grad():
        probs = torch.softmax(model(preprocess(Image.open(odd_image).convert("RGB"))[None]), -1)[0].numpy()
    top = np.argsort(-probs)[:5]
    assert [c for c, _ in printed] == top.tolist()
    np.testing.assert_allclose([p for _, p in printed], probs[top], atol=5e-5 + 1e-5)
