"""evit_jax.host_memory: a jitted step's large temporaries are reused, not page-faulted in on every call."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# A temporary of N x 2048 float32 (a matmul's output, read by a second matmul) in every call; prints the
# fewest minor page faults of calls 3-6 (the heap may still grow in the first ones).
_STEP = """
import resource, sys
if sys.argv[1] == "retain":
    from evit_jax import host_memory
    assert host_memory.retain_freed_memory()
import jax, jax.numpy as jnp

@jax.jit
def step(a, b):
    return jnp.sum((a @ b).T @ a)

a, b = jnp.ones((int(sys.argv[2]), 8)), jnp.ones((8, 2048))
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(a, b).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[2:]))
"""


def _fewest_faults_per_call(mode: str, rows: int) -> int:
    return int(_run(_STEP, mode, str(rows)).split()[-1])


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
@pytest.mark.parametrize("rows", [16384, 2**18 + 2**17])  # 128 MiB; 3 GiB, above any mmap threshold
def test_retained_memory_is_reused_across_calls(rows):
    default, retained = _fewest_faults_per_call("default", rows), _fewest_faults_per_call("retain", rows)
    # In 4 KiB pages 128 MiB are 32,768 faults: glibc's default maps the block afresh on every call.
    assert default > rows, (default, rows)
    assert retained < default / 8, (retained, default)


# Synchronous dispatch applies to single-device computations only: a step over four CPU devices with a
# cross-device sum must still run (inline execution of one device after the other would deadlock).
_SHARDED = """
from evit_jax import host_memory
host_memory.retain_freed_memory()
import jax, jax.numpy as jnp
jax.config.update("jax_num_cpu_devices", 4)
mesh = jax.make_mesh((4,), ("data",))
sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
x = jax.device_put(jnp.arange(8.0), sharding)
total = jax.jit(lambda x: jnp.sum(x * 2), out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
print(float(total(x)))
"""


def test_multi_device_steps_still_run():
    assert float(_run(_SHARDED).split()[-1]) == 56.0
