"""evit_jax: EfficientViT (MIT Han Lab) in JAX/Flax."""

__version__ = "0.1.0"


def load_pretrained(name: str, checkpoint_path: str | None = None, **kwargs):
    """Return (model, variables) for `name`: its published weights by default
    (`load_pretrained("efficientvit_b1.r224_in1k")`, downloaded and converted once), or those of a PyTorch
    checkpoint, a converted Orbax directory or a `hub:NAME` spec. See `evit_jax.convert.load_pretrained`."""
    from evit_jax.convert import load_pretrained as _load

    return _load(name, checkpoint_path, **kwargs)
