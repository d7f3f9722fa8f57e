"""Pure Flax EfficientViT models (no I/O). Start from `create_model(name)`; see `list_models()`."""

from evit_jax.models.zoo import MODEL_SPECS, ModelSpec, canonical_name, create_model, get_model_spec, list_models

__all__ = ["MODEL_SPECS", "ModelSpec", "canonical_name", "create_model", "get_model_spec", "list_models"]
