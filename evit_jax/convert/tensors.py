"""Bit-exact moves between PyTorch tensors and numpy arrays, bfloat16 included.

numpy has no bfloat16 of its own; `ml_dtypes.bfloat16` (what JAX uses) fills the gap. torch cannot hand
such an array over directly, so bfloat16 travels as its raw 16-bit pattern (`view(int16)`), which keeps
every bit. torch is imported only when a torch tensor is actually met.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np


def is_torch_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def is_array(value: Any) -> bool:
    """True for numpy/JAX arrays and torch tensors (anything a state dict may hold)."""
    return isinstance(value, np.ndarray) or is_torch_tensor(value) or (hasattr(value, "shape") and hasattr(value, "dtype"))


def _torch():
    try:
        import torch
    except ImportError as err:  # pragma: no cover - torch is installed wherever tests run
        raise ImportError("reading or writing PyTorch .pt/.pth files needs torch: pip install torch "
                          "(or use a .safetensors file, which needs no torch)") from err
    return torch


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor, JAX array or numpy array as a numpy array with the same dtype and bits."""
    if is_torch_tensor(value):
        torch = _torch()
        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()
    return np.asarray(value)


def to_torch(array: np.ndarray):
    """A numpy array (bfloat16 included) as a CPU torch tensor with the same dtype and bits."""
    torch = _torch()
    array = np.asarray(array)
    if not array.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d counter into shape (1,))
        array = array.copy(order="C")
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)
