"""The accelerators figures are reported against: one table, used for MFU (benchmarks) and for
memory / roofline estimates (`evit_jax.aot`).

Peaks are dense matmul TFLOP/s from the vendors' public datasheets (Cloud TPU system-architecture
pages; NVIDIA's H100/H200, A100, L4 and V100 datasheets); float32 on GPUs is TF32 tensor-core dense.
The CPU figure is a large float32 matmul measured on this project's 2-core x86 development machine
(docs/performance.md); XLA:CPU has no faster bfloat16 matmul, so it stands for bfloat16 too.
ICI bandwidth (bidirectional, per chip) only where the Cloud TPU page states it (v5e: 400 GB/s).

`SLICES` names the Cloud TPU slices `evit_jax.aot` compiles for: the accelerator type (`v5e-16`,
`v4-32`; v4/v5p count TensorCores, two per chip, v5e/v6e count chips) and the libtpu topology name
(`v5e:4x4`, `v4:2x2x4`) both select one. v4 and v5p run one JAX device per chip ("megacore").
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
    ici_gb_per_s: float | None = None  # inter-chip interconnect, bidirectional, per chip

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
    "tpu v5 lite": Chip("TPU v5e", 197.0, 197.0, 16.0, 819.0, 400.0),
    "tpu v5e": Chip("TPU v5e", 197.0, 197.0, 16.0, 819.0, 400.0),
    # v5p reports device_kind "TPU v5": after the v5e ("TPU v5 lite") entries.
    "tpu v5p": Chip("TPU v5p", 459.0, 459.0, 95.0, 2765.0),
    "tpu v5": Chip("TPU v5p", 459.0, 459.0, 95.0, 2765.0),
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


@dataclasses.dataclass(frozen=True)
class Slice:
    """One Cloud TPU slice: what `jax.experimental.topologies.get_topology_desc` needs to give its
    abstract devices (`evit_jax.aot`)."""

    name: str                          # accelerator type, e.g. "v5e-16"
    topology: str                      # libtpu topology name, e.g. "v5e:4x4"
    chip: str                          # key of CHIPS
    chip_config: str                   # "default" (one core per chip) or "megacore" (v4, v5p)
    wrap: tuple[bool, bool, bool]      # torus wrap-around links per dimension

    @property
    def num_chips(self) -> int:
        n = 1
        for d in self.topology.split(":")[1].split("x"):
            n *= int(d)
        return n

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """Chips of one host along each axis: a 2x2 block (4 chips per host VM) except a 1-chip slice."""
        return (1, 1, 1) if self.num_chips == 1 else (2, 2, 1)


def _slices() -> dict[str, Slice]:
    table = {}
    # (generation, libtpu prefix, CHIPS key, chip config, TensorCores per chip, [(shape, wrap)])
    two_d = [("1x1", (False, False, False)), ("2x2", (False, False, False)), ("2x4", (False, False, False)),
             ("4x4", (False, False, False)), ("4x8", (False, False, False)), ("8x8", (False, False, False)),
             ("8x16", (False, True, False)), ("16x16", (True, True, False))]
    three_d = [("2x2x1", (False, False, False)), ("2x2x2", (False, False, False)), ("2x2x4", (False, False, False)),
               ("2x4x4", (False, False, False)), ("4x4x4", (True, True, True)), ("4x4x8", (True, True, True)),
               ("4x8x8", (True, True, True)), ("8x8x8", (True, True, True))]
    for gen, prefix, chip, config, cores, shapes in (
            ("v5e", "v5e", "tpu v5e", "default", 1, two_d), ("v6e", "v6e", "tpu v6", "default", 1, two_d),
            ("v4", "v4", "tpu v4", "megacore", 2, three_d), ("v5p", "v5", "tpu v5p", "megacore", 2, three_d)):
        for shape, wrap in shapes:
            s = Slice("", f"{prefix}:{shape}", chip, config, wrap)
            table[f"{gen}-{s.num_chips * cores}"] = dataclasses.replace(s, name=f"{gen}-{s.num_chips * cores}")
    return table


SLICES: dict[str, Slice] = _slices()


def find_slice(name: str) -> Slice:
    """The slice named by its accelerator type (`v5e-16`) or topology (`v5e:4x4`, `v5p:2x2x1`); one
    ValueError listing the known names otherwise."""
    key = name.strip().lower()
    for s in SLICES.values():
        aliases = {s.name, s.topology}
        if s.topology.startswith("v5:"):
            aliases.add("v5p:" + s.topology.split(":")[1])
        if key in aliases:
            return s
    known = ", ".join(f"{s.name} ({s.topology})" for s in SLICES.values())
    raise ValueError(f"unknown TPU topology {name!r}; known: {known}.")
