"""End-to-end parity with timm's EfficientViT for the seven classification models.

Random weights with randomised BatchNorm statistics and affine parameters (so that every norm matters),
converted with `evit_jax.convert`, float32 logits compared at two resolutions:
- `numerics="timm"` against timm as it is (LiteMLA eps 1e-5, no quadratic attention);
- `numerics="official"` (eps 1e-15, quadratic attention when H*W <= dim, L head BN eps 1e-7) against timm
  with its LiteMLA eps patched to 1e-15 and the L head's BN eps set to the official 1e-7. At 64 px every
  attention map is tiny (stage 4: 2x2, stage 3: 4x4 <= dim), so the official quadratic path runs; at 224 px
  the linear path runs. timm has no quadratic path: the two are the same function up to rounding.
Tolerance: max|jax - torch| <= 1e-5 * max(1, max|torch|) (`assert_close_to_torch`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evit_jax import convert
from evit_jax.models import create_model
from tests._reference_weights import assert_close_to_torch, randomize_torch_norms

VARIANTS = ["b0", "b1", "b2", "b3", "l1", "l2", "l3"]
# The official numerics at 224 (linear attention, eps 1e-15, L head BN eps 1e-7) are checked on L1.
OFFICIAL_224 = {"l1"}


def set_official_eps(torch, model, family: str) -> None:
    """timm -> official numerics: LiteMLA eps 1e-15, and (L models) head BN eps 1e-7."""
    from timm.models.efficientvit_mit import LiteMLA

    for module in model.modules():
        if isinstance(module, LiteMLA):
            module.eps = 1e-15
    if family == "l":
        assert model.head.in_conv.norm.eps == 1e-5
        model.head.in_conv.norm.eps = 1e-7


def compare(torch, timm_model, flax_model, variables, batch: int, res: int, seed: int) -> float:
    x = np.random.default_rng(seed).standard_normal((batch, 3, res, res), dtype=np.float32)
    with torch.no_grad():
        ref = timm_model(torch.from_numpy(x)).numpy()
    out = np.asarray(jax.jit(flax_model.apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1))))
    assert_close_to_torch(out, ref)
    return float(np.abs(ref).max())


@pytest.mark.parametrize("variant", VARIANTS)
def test_classification_parity_with_timm(variant, torch, highest_precision):
    import timm

    name = f"efficientvit_{variant}"
    family = variant[0]
    tm = timm.create_model(name, pretrained=False).eval()
    randomize_torch_norms(torch, tm)
    flat = convert.abstract_variables(name)
    assert sum(p.numel() for p in tm.parameters()) == sum(int(np.prod(s.shape)) for k, s in flat.items() if k[0] == "params")
    variables = convert.torch_to_flax(tm.state_dict(), name)  # timm layout, detected
    batch = 1 if variant == "l3" else 2

    timm_numerics = create_model(name, numerics="timm")
    for res in (224, 64):
        magnitude = compare(torch, tm, timm_numerics, variables, batch, res, seed=res)
        assert magnitude > 0.1  # the logits carry signal, so the tolerance is not trivially met

    set_official_eps(torch, tm, family)
    official = create_model(name)
    for res in (64, 224) if variant in OFFICIAL_224 else (64,):
        compare(torch, tm, official, variables, batch, res, seed=res + 1)

