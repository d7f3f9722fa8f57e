"""Attention ablation: the same data, seed and recipe for every global-context variant.

    python -m evit_jax.ablation --config=configs/ablate_attention.py --workdir=/tmp/ablate
    python -m evit_jax.ablation --config=configs/ablate_attention.py:smoke --workdir=/tmp/ablate_smoke

`evit_jax.ablation` trains each entry of ``get_ablation().variants`` with the normal entry point
(``python -m evit_jax.main --config=<this file>:<arg> --workdir=WORKDIR/<variant>
--config.model.name=... --config.model.attention=...``) and writes ONE comparison table
(WORKDIR/ablation.csv and WORKDIR/ablation.md). ``get_config`` is the run config every variant
trains with; ``get_ablation`` is the sweep (read only by the runner).

Base recipe: configs/demo.py (EfficientViT-B0 on the built-in `evit_shapes` at 32 px, 1600 steps);
``:smoke`` uses demo's seconds-long `evit_shapes/tiny` recipe (6 steps, 32 px) for tests.

``get_ablation().variants``: comma-separated entries ``[model_name@]attention_spec``. The attention spec is
any string `create_model(attention=...)` accepts (see evit_jax/models/attention_kernels.py); a model
name prefix selects another model for that entry (e.g. the paper-v1 design ``efficientvit_v1_b0@...``).
Override on the command line: ``--variants='relu_linear,softmax'``.
"""

from __future__ import annotations

import ml_collections

from configs import demo

DEFAULT_VARIANTS = ",".join([
    "relu_linear",                      # the released EfficientViT (multi-scale (5,))
    "softmax",                          # quadratic softmax attention
    "elu_linear",                       # Katharopoulos et al. 2020
    "focused",                          # FLatten, p=3, with its value DWC
    "focused(value_dwc=0)",             # FLatten without the DWC term
    "cosformer",                        # Qin et al. 2022
    "relu_linear(scales=())",           # no multi-scale aggregation
    "relu_linear(scales=(3,))",
    "relu_linear(scales=(3, 5))",
    "efficientvit_v1_b0@relu_linear",   # paper-v1 block design
])


def _check_arg(arg: str) -> None:
    if arg not in ("", "smoke"):
        raise ValueError(f"configs/ablate_attention.py takes '' or 'smoke', got {arg!r}.")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """The run config every variant trains with (configs/demo.py's recipe)."""
    _check_arg(arg)
    return demo.get_config(arg)


def get_ablation(arg: str = "") -> ml_collections.ConfigDict:
    """What `evit_jax.ablation` sweeps: read by the sweep runner, never by the training task."""
    _check_arg(arg)
    c = ml_collections.ConfigDict()
    c.variants = DEFAULT_VARIANTS
    c.gmacs_resolutions = (224, 1024)  # GMACs columns of the table
    c.lock()
    return c
