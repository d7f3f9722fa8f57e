"""The zoo as a whole: parameter and state-dict entry counts against the official / timm figures, names and
aliases, a bit-exact conversion round trip for every model, and bfloat16 compute at 1024x1024."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

from evit_jax import convert
from evit_jax.models import create_model, get_model_spec, list_models

# Exact counts of timm 1.0.31 (`sum(p.numel() for p in timm.create_model(name).parameters())`, equal to the
# official figures: B1 9,102,024) and the state-dict entry counts of the official / timm models.
CLS_PARAMS = {"b0": 3_410_008, "b1": 9_102_024, "b2": 24_330_712, "b3": 48_646_056,
              "l1": 52_654_088, "l2": 63_707_016, "l3": 246_037_288}
CLS_ENTRIES = {"b0": 197, "b1": 272, "b2": 365, "b3": 514, "l1": 271, "l2": 353, "l3": 353}
# Official README / paper tables (millions, two decimals) - the only reference for the segmentation models.
CLS_PARAMS_M = {"b0": 3.41, "b2": 24.33, "b3": 48.65, "l1": 52.65, "l2": 63.71, "l3": 246.04}
SEG_PARAMS_M = {("b0", "cityscapes"): 0.71, ("b1", "cityscapes"): 4.80, ("b1", "ade20k"): 4.79,
                ("b2", "cityscapes"): 15.32, ("b2", "ade20k"): 15.29, ("b3", "cityscapes"): 39.60,
                ("b3", "ade20k"): 39.55, ("l1", "cityscapes"): 40.24, ("l1", "ade20k"): 40.41,
                ("l2", "cityscapes"): 52.61, ("l2", "ade20k"): 51.46}


def n_params(name: str) -> int:
    return sum(int(np.prod(s.shape)) for path, s in convert.abstract_variables(name).items() if path[0] == "params")


def released(task: str) -> list[str]:
    """The models of the released code (the zoo also holds paper-v1 designs without official weights,
    and tests may register stand-ins of their own)."""
    return [n for n in list_models(task) if n.startswith("efficientvit_") and get_model_spec(n).design == "v2"]


def test_zoo_is_complete():
    assert released("classification") == [f"efficientvit_{v}" for v in sorted(CLS_PARAMS)]
    assert [n for n in list_models() if convert.has_timm_layout(n)] == released("classification")
    assert {(get_model_spec(n).variant, get_model_spec(n).dataset) for n in released("segmentation")} == set(SEG_PARAMS_M)
    assert len(released("backbone")) == 8


@pytest.mark.parametrize("variant", sorted(CLS_PARAMS))
def test_classification_counts(variant):
    name = f"efficientvit_{variant}"
    assert n_params(name) == CLS_PARAMS[variant]
    if variant in CLS_PARAMS_M:
        assert round(n_params(name) / 1e6, 2) == CLS_PARAMS_M[variant]
    assert len(convert.key_table(name, "official")) == CLS_ENTRIES[variant]
    assert len(convert.key_table(name, "timm")) == CLS_ENTRIES[variant]


@pytest.mark.parametrize("variant,dataset", sorted(SEG_PARAMS_M))
def test_segmentation_counts(variant, dataset):
    assert round(n_params(f"efficientvit_seg_{variant}_{dataset}") / 1e6, 2) == SEG_PARAMS_M[(variant, dataset)]


@pytest.mark.parametrize("variant", ["b0", "b1", "b2", "b3", "l1", "l2", "l3"])
def test_backbone_is_the_backbone_of_the_full_models(variant):
    """The backbone model's variables are exactly the `backbone` subtree of the classification and
    segmentation models (so official backbone checkpoints and whole-model checkpoints agree)."""
    own = {p: s.shape for p, s in convert.abstract_variables(f"efficientvit_backbone_{variant}").items()}
    full = [f"efficientvit_{variant}"] + [n for n in released("segmentation") if get_model_spec(n).variant == variant]
    for name in full[:2]:
        sub = {(p[0],) + p[2:]: s.shape for p, s in convert.abstract_variables(name).items() if p[1] == "backbone"}
        assert sub == own, name


_BITS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _random_bits_state_dict(name: str, layout: str, dtype, seed: int = 0) -> dict:
    """Random bit patterns (NaNs and infinities included: every bit must survive) for every key."""
    rng = np.random.default_rng(seed)
    out = {}
    for e in convert.key_table(name, layout):
        dt = np.dtype(dtype if e.is_float else np.int64)
        bits = _BITS[dt.itemsize]
        out[e.torch_key] = rng.integers(0, np.iinfo(bits).max, e.torch_shape, dtype=bits, endpoint=True).view(dt)
    return out


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(
        a.reshape(-1).view(_BITS[a.dtype.itemsize]), b.reshape(-1).view(_BITS[b.dtype.itemsize]))


@pytest.mark.parametrize("name", list_models())
def test_every_model_round_trips_bit_exact(name):
    dtype = (np.float32, np.float16, ml_dtypes.bfloat16)[len(name) % 3]
    layouts = ("official", "timm") if convert.has_timm_layout(name) else ("official",)
    abstract = convert.abstract_variables(name)
    for layout in layouts:
        sd = _random_bits_state_dict(name, layout, dtype)
        variables = convert.torch_to_flax(sd, name, layout=layout)
        flat = traverse_util.flatten_dict(variables)
        assert {p: v.shape for p, v in flat.items()} == {p: s.shape for p, s in abstract.items()}
        back = convert.flax_to_torch(variables, name, layout=layout)
        assert list(back) == list(sd)
        for key, value in sd.items():
            assert _same_bits(back[key], value), key


ALIASES = {
    "efficientvit-b1": "efficientvit_b1",
    "efficientvit_b1.r224_in1k": "efficientvit_b1",
    "EfficientViT-B1": "efficientvit_b1",
    "efficientvit-seg-b1-cityscapes": "efficientvit_seg_b1_cityscapes",
    "efficientvit-seg-l2-ade20k": "efficientvit_seg_l2_ade20k",
    "efficientvit-backbone-l0": "efficientvit_backbone_l0",
}


@pytest.mark.parametrize("alias,name", sorted(ALIASES.items()))
def test_aliases(alias, name):
    assert get_model_spec(alias).name == name
    assert convert.key_table(alias) == convert.key_table(name)


@pytest.mark.parametrize("bad", ["efficientvit_b9", "efficientvit-seg-b0-ade20k", "resnet50", "efficientvit_l0"])
def test_unknown_names_raise_one_line(bad):
    with pytest.raises(ValueError, match=f"unknown model {bad!r}") as info:
        create_model(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="unknown model"):
        convert.key_table(bad)


def test_bfloat16_compute_at_1024(torch):
    """bfloat16 activations stay finite at 1024x1024 and within 2e-2 (of max |float32|) of float32."""
    import timm

    tm = timm.create_model("efficientvit_b0", pretrained=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in tm.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=gen) * 0.2 - 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.rand(module.bias.shape, generator=gen) * 0.2 - 0.1)
    variables = convert.torch_to_flax(tm.state_dict(), "efficientvit_b0")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 1024, 1024, 3), dtype=np.float32))
    outputs = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = create_model("efficientvit_b0", dtype=dtype)
        outputs[dtype] = np.asarray(jax.jit(model.apply)(variables, x))
    ref, low = outputs[jnp.float32], outputs[jnp.bfloat16]
    assert low.dtype == np.float32 and np.isfinite(low).all()
    scale = np.abs(ref).max()
    assert scale > 0
    assert np.abs(low - ref).max() <= 2e-2 * scale, (np.abs(low - ref).max(), scale)
