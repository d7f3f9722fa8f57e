"""Attention ablation: the same data, seed and recipe for every global-context variant.

    python -m evit_jax.ablation --config=configs/ablate_attention.py --workdir=/tmp/ablate
    python -m evit_jax.ablation --config=configs/ablate_attention.py:smoke --workdir=/tmp/ablate_smoke

`evit_jax.ablation` trains each entry of ``ablation.variants`` with the normal entry point
(``python -m evit_jax.main --config=<this file>:<arg> --workdir=WORKDIR/<variant>
--config.model.name=... --config.model.attention=...``) and writes ONE comparison table
(WORKDIR/ablation.csv and WORKDIR/ablation.md). This file is also a plain run config: main ignores the
``ablation`` block.

Base recipe: configs/demo.py (EfficientViT-B0 on the built-in `evit_shapes` at 32 px, 1600 steps);
``:smoke`` uses demo's seconds-long `evit_shapes/tiny` recipe (6 steps, 32 px) for tests.

``ablation.variants``: comma-separated entries ``[model_name@]attention_spec``. The attention spec is
any string `create_model(attention=...)` accepts (see evit_jax/models/attention_kernels.py); a model
name prefix selects another model for that entry (e.g. the paper-v1 design ``efficientvit_v1_b0@...``).
Override on the command line: ``--config.ablation.variants='relu_linear,softmax'``.
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


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "smoke"):
        raise ValueError(f"configs/ablate_attention.py takes '' or 'smoke', got {arg!r}.")
    c = demo.get_config(arg)
    with c.unlocked():
        c.ablation = ml_collections.ConfigDict()
        c.ablation.variants = DEFAULT_VARIANTS
        c.ablation.gmacs_resolutions = (224, 1024)  # GMACs columns of the table
    return c
