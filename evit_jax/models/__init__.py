"""Pure Flax EfficientViT models (no I/O). Start from `create_model(name)`; see `list_models()`."""

from evit_jax.models.zoo import (BuildOptions, ModelSpec, canonical_name, create_model, get_model_spec, list_models,
                                 register_model)

__all__ = ["BuildOptions", "ModelSpec", "canonical_name", "create_model", "get_model_spec", "list_models",
           "register_model"]
