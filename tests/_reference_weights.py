"""Deterministic model variables and the float32 tolerance shared by the parity tests."""

from __future__ import annotations

import numpy as np

from evit_jax.models.random_weights import random_variables


def seeded_variables(model, input_shape, seed: int = 0):
    """Variables of `model` for an input of `input_shape` (evit_jax.models.random_weights)."""
    return random_variables(model, input_shape, seed)


# float32 parity against PyTorch: measured errors are ~1e-6 relative (layers, whole models at highest
# matmul precision); this leaves about 10x headroom.
PARITY_RTOL = 1e-5


def assert_close_to_torch(out, ref, rtol: float = PARITY_RTOL) -> float:
    """max|out - ref| <= rtol * max(1, max|ref|); returns the error."""
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(out - ref).max())
    assert err <= rtol * scale, f"max|jax - torch| = {err:.3g} > {rtol:g} * {scale:.3g}"
    return err
