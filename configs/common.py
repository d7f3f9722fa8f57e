"""Shared start of every run config: ``base_config(task)`` (evit_jax/tasks/config.py lists and documents
every key with its default). Configs override values; the result is locked, so a misspelt key in a
config file or on the command line fails before anything runs.
"""

from __future__ import annotations

from evit_jax.tasks.config import base_config  # noqa: F401  (re-exported for the config files)
