"""`python -m tests._train_main ...` = `python -m evit_jax.main ...` with the tiny test model
registered (see tests/_train_helpers.py)."""

from tests._train_helpers import register_tiny_model

if __name__ == "__main__":
    register_tiny_model()
    from evit_jax import main

    main.run()
