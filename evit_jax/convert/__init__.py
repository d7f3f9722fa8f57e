"""Weight conversion between PyTorch checkpoints (official and timm layouts) and Flax variables.

    from evit_jax.convert import torch_to_flax, flax_to_torch, load_variables, save_variables
    variables = load_variables("efficientvit_b1_r224.pt", "efficientvit_b1")
    variables = load_variables(resolve_checkpoint("hub:efficientvit_b1"), "efficientvit_b1")  # published weights
    state_dict = flax_to_torch(variables, "efficientvit_b1", layout="timm")

Command line: `python -m evit_jax.convert to-flax|to-torch ...` (see docs/convert.md).
"""

from evit_jax.convert.core import (
    LAYOUTS,
    abstract_variables,
    check_variables,
    detect_layout,
    extract_state_dict,
    flax_to_torch,
    has_timm_layout,
    key_table,
    score_models,
    torch_to_flax,
)
from evit_jax.convert.hub import (
    PretrainedWeights,
    find_weights,
    is_hub_spec,
    list_pretrained,
    resolve_checkpoint,
)
from evit_jax.convert.io import (
    load_pretrained,
    load_variables,
    read_checkpoint,
    read_metadata,
    save_variables,
    write_torch_checkpoint,
)

__all__ = [
    "LAYOUTS",
    "PretrainedWeights",
    "abstract_variables",
    "check_variables",
    "detect_layout",
    "extract_state_dict",
    "find_weights",
    "flax_to_torch",
    "has_timm_layout",
    "is_hub_spec",
    "key_table",
    "list_pretrained",
    "load_pretrained",
    "load_variables",
    "read_checkpoint",
    "read_metadata",
    "resolve_checkpoint",
    "save_variables",
    "score_models",
    "torch_to_flax",
    "write_torch_checkpoint",
]
