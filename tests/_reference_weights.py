"""Deterministic model variables and the float32 tolerance shared by the parity tests."""

from __future__ import annotations

import numpy as np

from evit_jax.models.random_weights import random_variables


def seeded_variables(model, input_shape, seed: int = 0):
    """Variables of `model` for an input of `input_shape` (evit_jax.models.random_weights)."""
    return random_variables(model, input_shape, seed)


def randomize_torch_norms(torch, model, seed: int = 0) -> None:
    """Random running statistics and affine parameters in every BatchNorm and LayerNorm of a torch
    model (fresh ones are identities, which would hide a wrong eps or a swapped mean/var)."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                uniform(module.weight, 0.5, 1.5)
                uniform(module.bias, -0.2, 0.2)
            if isinstance(module, torch.nn.BatchNorm2d):
                uniform(module.running_mean, -0.5, 0.5)
                uniform(module.running_var, 0.5, 1.5)
                module.num_batches_tracked.fill_(int(torch.randint(0, 10_000, (), generator=gen)))


def randomize_torch(torch, model, seed: int = 0):
    """Every weight of a torch model random (fan-in scaled, so activations stay O(1)) and its norms
    randomised as :func:`randomize_torch_norms`; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / np.sqrt(fan_in))
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.5)
    randomize_torch_norms(torch, model, seed)
    return model.eval()


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
