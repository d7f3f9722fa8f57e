"""evit_jax.host_memory: a jitted step's large temporaries are reused, not page-faulted in on every call."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from evit_jax import host_memory

# A temporary of N x 2048 float32 (a matmul's output, read by a second matmul) in every call; prints the minor page
# faults of the third call.
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
for _ in range(2):
    step(a, b).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step(a, b).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_of_third_call(mode: str, rows: int) -> int:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _STEP, mode, str(rows)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
@pytest.mark.parametrize("rows", [16384, 2**18 + 2**17])  # 128 MiB; 3 GiB, above any mmap threshold
def test_retained_memory_is_reused_across_calls(rows):
    default, retained = _faults_of_third_call("default", rows), _faults_of_third_call("retain", rows)
    # In 4 KiB pages 128 MiB are 32,768 faults: glibc's default maps the block afresh on every call.
    assert default > rows, (default, rows)
    assert retained < default / 8, (retained, default)
