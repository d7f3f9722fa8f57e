"""The accelerators figures are reported against: one table, used for MFU (benchmarks) and for
memory / roofline estimates (`evit_jax.aot`).

Peaks are dense matmul TFLOP/s from the vendors' public datasheets (Cloud TPU system-architecture
pages; NVIDIA's H100/H200, A100, L4 and V100 datasheets); float32 on GPUs is TF32 tensor-core dense.
The CPU figure is a large float32 matmul measured on this project's 2-core x86 development machine
(docs/performance.md); XLA:CPU has no faster bfloat16 matmul, so it stands for bfloat16 too.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    bf16_tflops: float
    f32_tflops: float
    hbm_gib: float | None = None       # memory per chip
    hbm_gb_per_s: float | None = None  # memory bandwidth per chip

    def peak_tflops(self, dtype: str) -> float:
        return self.bf16_tflops if dtype == "bfloat16" else self.f32_tflops


CPU = Chip("cpu (2-core dev machine)", 0.38, 0.38)

# Matched against `device.device_kind.lower()` by substring, in this order.
CHIPS: dict[str, Chip] = {
    "h200": Chip("NVIDIA H200", 989.0, 494.0, 141 * 1e9 / 2**30, 4800.0),
    "h100": Chip("NVIDIA H100", 989.0, 494.0, 80 * 1e9 / 2**30, 3350.0),
    "a100": Chip("NVIDIA A100", 312.0, 156.0, 80 * 1e9 / 2**30, 2039.0),
    "l4": Chip("NVIDIA L4", 121.0, 60.0, 24 * 1e9 / 2**30, 300.0),
    "v100": Chip("NVIDIA V100", 125.0, 15.7, 32 * 1e9 / 2**30, 900.0),
    "tpu v6": Chip("TPU v6e", 918.0, 918.0, 32.0, 1640.0),
    "tpu v5p": Chip("TPU v5p", 459.0, 459.0, 95.0, 2765.0),
    "tpu v5 lite": Chip("TPU v5e", 197.0, 197.0, 16.0, 819.0),
    "tpu v5e": Chip("TPU v5e", 197.0, 197.0, 16.0, 819.0),
    "tpu v4": Chip("TPU v4", 275.0, 275.0, 32.0, 1228.0),
}


def chip_for(device_kind: str, platform: str = "") -> Chip | None:
    """The table's entry for a device (`device.device_kind`, `device.platform`), or None."""
    if platform == "cpu":
        return CPU
    kind = device_kind.lower()
    for key, chip in CHIPS.items():
        if key in kind:
            return chip
    return None
