"""evit_jax: EfficientViT (MIT Han Lab) in JAX/Flax."""

__version__ = "0.1.0"


def load_pretrained(name: str, checkpoint_path: str):
    """Return (model, variables) for `name` from a PyTorch checkpoint or a converted Orbax directory."""
    from evit_jax.convert import load_pretrained as _load

    return _load(name, checkpoint_path)
