"""Measurement tools: programs that print figures and change nothing (big_vision keeps its tools
the same way, apart from the library they measure).

- `benchmark`: forward-pass speed, params, MACs and MFU of a model, optionally against timm
  (`python -m evit_jax.tools.benchmark`); `--sweep-resolution` hands over to `cost_sweep`.
- `train_bench`: the train step's images/s against timm's (`python -m evit_jax.tools.train_bench`).
- `cost_sweep`: attention cost (latency, memory, FLOPs) against resolution.
- `pipeline_bench`: input-pipeline images/s (`python -m evit_jax.tools.pipeline_bench`), the official
  recipe on ImageNet-like JPEGs against timm's DataLoader (`--jpeg_folder ... --compare-timm`).
- `chips`: peak FLOP/s, memory and bandwidth of the accelerators the figures are reported against.

Commands that are steps of a user's workflow and produce something (`main`, `predict`, `convert`,
`export`, `aot`, `ablation`) stay at the package's top level.
"""
