"""Pure Flax EfficientViT models (no I/O). Start from `create_model(name)`; see `list_models()`.

Detection models (`efficientvit_det_b1`, ...) also need `evit_jax.models.det` for their output grid and box decoding.
"""

from evit_jax.models.zoo import (BuildOptions, ModelSpec, canonical_name, create_model, get_model_spec, list_models,
                                 register_model)

__all__ = ["BuildOptions", "ModelSpec", "canonical_name", "create_model", "get_model_spec", "list_models",
           "register_model"]
