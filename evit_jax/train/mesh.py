"""Device mesh and the ONE table that maps logical array axes to mesh axes.

The mesh always has two axes, ``("data", "fsdp")``:

* ``data``  - pure data parallelism: parameters are replicated along it.
* ``fsdp``  - data parallelism *and* parameter/optimizer-state sharding (ZeRO-3 style):
  every large parameter (and its Adam moments, and its EMA copy) is split along one of
  its dimensions over this axis; XLA gathers it for the forward/backward pass.

The global batch is always split over *both* axes, so every device sees
``global_batch / num_devices`` examples whichever strategy is used.

Parameters carry no partitioning annotations in the model code (models are pure Flax):
their logical axis names are derived here from their rank (conv kernels are
``(kh, kw, in, out)``, dense kernels ``(in, out)``, vectors ``(channels,)``) and mapped to
mesh axes by :data:`LOGICAL_AXIS_RULES`. A dimension that does not divide by the mesh axis
size stays replicated (e.g. an 8-channel stem on a 16-way fsdp axis), which keeps every
model loadable on every mesh.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
STRATEGIES = ("replicated", "fsdp")

# Logical axis name of a parameter dimension -> mesh axis (or axes): ONE place for every parameter
# sharding decision. Per strategy; an axis mapped to None is replicated. (Activations and batches
# are always split over all devices along their leading axis: `batch_sharding`.)
LOGICAL_AXIS_RULES: dict[str, tuple[tuple[str, Any], ...]] = {
    "replicated": (
        ("out_channels", None),
        ("in_channels", None),
        ("kernel_h", None),
        ("kernel_w", None),
        ("channels", None),
    ),
    "fsdp": (
        # Shard the output dimension of every kernel; fall back to the input one when the
        # output does not divide (see param_logical_axes).
        ("out_channels", "fsdp"),
        ("in_channels", "fsdp"),
        ("kernel_h", None),
        ("kernel_w", None),
        # Per-channel vectors (biases, BN/LN scales) are tiny: replicate them.
        ("channels", None),
    ),
}


def create_mesh(strategy: str, fsdp_size: int = -1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ("data", "fsdp") mesh over all (global) devices.

    strategy="replicated" puts every device on the data axis (fsdp axis of size 1);
    strategy="fsdp" puts ``fsdp_size`` devices on the fsdp axis (-1: all of them) and the
    rest on the data axis. Devices are ordered by process so that each process owns a
    contiguous block of the batch.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"sharding.strategy={strategy!r} is unknown; use one of {STRATEGIES}.")
    devices = list(devices if devices is not None else jax.devices())
    devices.sort(key=lambda d: (d.process_index, d.id))
    n = len(devices)
    if strategy == "replicated":
        fsdp = 1
    else:
        fsdp = n if fsdp_size in (-1, 0, None) else int(fsdp_size)
        if n % fsdp:
            raise ValueError(f"sharding.fsdp_size={fsdp} does not divide the {n} devices; pick a divisor of {n}.")
    return Mesh(np.asarray(devices, dtype=object).reshape(n // fsdp, fsdp), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of every per-example array: leading (batch) axis over all mesh axes, whatever the
    strategy (both are data parallel over every device)."""
    return NamedSharding(mesh, P(MESH_AXES))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _rule_table(strategy: str) -> dict[str, Any]:
    return dict(LOGICAL_AXIS_RULES[strategy])


def param_logical_axes(shape: Sequence[int]) -> tuple[str | None, ...]:
    """Logical axis names of a parameter-like array, from its rank."""
    rank = len(shape)
    if rank == 4:
        return ("kernel_h", "kernel_w", "in_channels", "out_channels")
    if rank == 2:
        return ("in_channels", "out_channels")
    if rank == 1:
        return ("channels",)
    return (None,) * rank


def _axis_size(mesh: Mesh, mesh_axes: Any) -> int:
    if mesh_axes is None:
        return 1
    if isinstance(mesh_axes, str):
        mesh_axes = (mesh_axes,)
    return int(np.prod([mesh.shape[a] for a in mesh_axes]))


def spec_for_shape(shape: Sequence[int], mesh: Mesh, strategy: str) -> P:
    """PartitionSpec of one parameter-like array under ``strategy``.

    At most one dimension is sharded over a given mesh axis; the preferred dimension is the
    first one (in the order of the rule table: out, then in) that divides evenly.
    """
    rules = _rule_table(strategy)
    logical = param_logical_axes(shape)
    spec: list[Any] = [None] * len(shape)
    used: set[str] = set()
    order = sorted(range(len(shape)), key=lambda i: list(rules).index(logical[i]) if logical[i] in rules else 99)
    for i in order:
        mesh_axes = rules.get(logical[i]) if logical[i] else None
        if mesh_axes is None:
            continue
        names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        size = _axis_size(mesh, names)
        if size == 1 or used & set(names) or shape[i] % size:
            continue
        spec[i] = mesh_axes
        used |= set(names)
    return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, strategy: str) -> Any:
    """NamedShardings for a pytree of arrays / ShapeDtypeStructs (params, opt state, EMA...)."""
    def one(x):
        shape = getattr(x, "shape", ())
        return NamedSharding(mesh, spec_for_shape(shape, mesh, strategy))
    return jax.tree_util.tree_map(one, tree)


def global_batch_from_local(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles per-process numpy batches into global jax.Arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    # The one intended host->device copy of the loop (allowed under the loop's transfer guard;
    # with several processes jax implements it with a device_put it would otherwise refuse).
    with jax.transfer_guard_host_to_device("allow"):
        return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def process_count(mesh: Mesh) -> int:
    """The number of processes (hosts) owning the mesh's devices: `jax.process_count()` for a mesh over
    every device of a run; the slice's host count for the abstract devices of a TPU topology
    (`evit_jax.aot`), whose `process_index` says which host each chip belongs to."""
    return len({d.process_index for d in mesh.devices.flat})


def check_batch_divisible(global_batch: int, mesh: Mesh, what: str = "batch size") -> None:
    """One clear error when the global batch cannot be split evenly over devices and processes."""
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(
            f"global {what} {global_batch} is not divisible by the {n} devices; "
            f"use a multiple of {n} (e.g. {max(n, global_batch - global_batch % n)})."
        )
    hosts = process_count(mesh)
    if global_batch % hosts:
        raise ValueError(f"global {what} {global_batch} is not divisible by the {hosts} processes.")
