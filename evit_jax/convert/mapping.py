"""The mechanical mapping between Flax variable paths and PyTorch state-dict keys.

Flax module names are the official key prefixes with list indices joined by "_" (`stages_2_op_list_1`
<-> `stages.2.op_list.1`), so a key maps by a rename of each path component plus a rename of the leaf:

| Flax (collection / leaf)             | PyTorch                 | array transform                    |
|--------------------------------------|-------------------------|------------------------------------|
| params .../conv/kernel (kh,kw,i,o)   | .../conv.weight         | transpose to (o, i, kh, kw)        |
| params .../linear/kernel (i, o)      | .../linear.weight       | transpose to (o, i)                |
| params .../bias                      | .../bias                | -                                  |
| params .../norm/scale                | .../norm.weight         | -                                  |
| batch_stats .../norm/mean, var       | running_mean, running_var | -                                |
| batch_stats .../num_batches_tracked  | num_batches_tracked     | int64 in PyTorch                   |

The timm layout renames the stem and head prefixes (`timm_key`).
"""

from __future__ import annotations

import re

import numpy as np

_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
    ("batch_stats", "num_batches_tracked"): "num_batches_tracked",
}


def module_to_torch(component: str) -> str:
    """`stages_2_op_list_1` -> `stages.2.op_list.1`; `aggreg_0_1` -> `aggreg.0.1`; `conv2` unchanged."""
    return re.sub(r"_(\d+)", r".\1", component).replace("_op_list", ".op_list")


def flax_to_torch_key(collection: str, path: tuple[str, ...]) -> str:
    """(collection, module path + leaf name) -> official PyTorch key."""
    *modules, leaf = path
    torch_leaf = _LEAF_TO_TORCH[(collection, leaf)]
    return ".".join([module_to_torch(m) for m in modules] + [torch_leaf])


def flax_to_torch_array(collection: str, path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """Flax array -> PyTorch layout (same dtype, except the BN counter which PyTorch keeps as int64).

    Kernels come back as transposed views (no copy); writers that need contiguous memory copy then.
    """
    value = np.asarray(value)
    leaf = path[-1]
    if collection == "params" and leaf == "kernel":
        return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    if leaf == "num_batches_tracked":
        return value.astype(np.int64)
    return value


def flax_to_torch_shape(collection: str, path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of a Flax variable (the shape `flax_to_torch_array` produces)."""
    shape = tuple(shape)
    if collection == "params" and path[-1] == "kernel":
        return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
    return shape


def torch_to_flax_array(collection: str, path: tuple[str, ...], value: np.ndarray, target_dtype=None) -> np.ndarray:
    """PyTorch array -> Flax layout (inverse of flax_to_torch_array).

    The dtype is kept (float16/bfloat16 stay as they are); only the BN counter is cast, and only when a
    `target_dtype` is given. Kernels come back as transposed views (no copy).
    """
    value = np.asarray(value)
    leaf = path[-1]
    if collection == "params" and leaf == "kernel":
        return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    if leaf == "num_batches_tracked" and target_dtype is not None:
        return value.astype(target_dtype)
    return value


# Official -> timm prefix renames (checked exact on all seven classification models against timm/models/efficientvit_mit.py).
_B_TO_TIMM = [
    (r"^backbone\.input_stem\.op_list\.0\.", "stem.in_conv."),
    (r"^backbone\.input_stem\.op_list\.(\d+)\.", lambda m: f"stem.res{int(m.group(1)) - 1}."),
    (r"^backbone\.stages\.(\d+)\.op_list\.(\d+)\.", r"stages.\1.blocks.\2."),
]
_L_TO_TIMM = [
    (r"^backbone\.stages\.0\.op_list\.0\.", "stem.in_conv."),
    (r"^backbone\.stages\.0\.op_list\.(\d+)\.", lambda m: f"stem.res{int(m.group(1)) - 1}."),
    (r"^backbone\.stages\.(\d+)\.op_list\.(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}."),
]
_HEAD_TO_TIMM = [
    (r"^head\.op_list\.0\.", "head.in_conv."),
    (r"^head\.op_list\.2\.linear\.", "head.classifier.0."),
    (r"^head\.op_list\.2\.norm\.", "head.classifier.1."),
    (r"^head\.op_list\.3\.linear\.", "head.classifier.4."),
]
def _apply_first(rules, key: str) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key, count=1)
        if n:
            return new
    return key


def timm_key(official: str, family: str) -> str:
    """Official classification key -> timm key (family "b" or "l")."""
    return _apply_first((_B_TO_TIMM if family == "b" else _L_TO_TIMM) + _HEAD_TO_TIMM, official)

