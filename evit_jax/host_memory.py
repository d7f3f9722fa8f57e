"""Host settings that keep an XLA:CPU step from first-touching its buffers on every call.

An XLA:CPU executable mallocs its temporaries on each call: 926 MiB for the batch-16 B1 train step,
2.9 GiB for L1's. glibc serves a block that large with a fresh mmap and unmaps it on free, so every
call page-faults its whole working set in again (about 245,000 minor faults per B1 step; with the
settings below the step took 687-702 ms instead of 1078, docs/performance.md). Two settings make the
step reuse the same memory:

- JAX's CPU client runs a single-device computation on the thread that calls it
  (`jax_cpu_enable_async_dispatch` = False), the Python main thread, whose malloc arena is the main
  heap. With asynchronous dispatch it runs on a runtime thread, whose arena (any arena but the main one)
  cannot hold a block above 64 MiB and maps it whatever the settings below say.
- glibc serves no block by mmap (`M_MMAP_MAX` = 0) and never gives the heap's top back
  (`M_TRIM_THRESHOLD` = -1): freed blocks stay in the heap for the next call. A high mmap threshold
  cannot do this: mallopt's int stops at 2 GiB.

Not done: one arena for every thread (`M_ARENA_MAX` = 1), which also removes the faults but serialises
every thread's small allocations on one lock (the classification demo ran at half speed).

Call :func:`retain_freed_memory` at the start of an entry point, before JAX creates its CPU client (the
first `jax.devices()`, `jit` call or array): the dispatch mode is fixed when the client is created.
Computations over several devices keep asynchronous dispatch (JAX's rule), so they run as before. The
cost: the process's resident memory stays at its peak, and on CPU Python waits for each step to finish
before it returns (the data pipeline prefetches in its own threads).
"""

from __future__ import annotations

import ctypes
import ctypes.util

import jax

# glibc mallopt parameters (malloc.h): no block served by mmap; never trim the heap (-1: the largest
# size_t).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_SETTINGS = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))


def retain_freed_memory() -> bool:
    """Makes single-device CPU computations run on the calling thread and glibc keep freed blocks in the
    heap for reuse (module docstring). Returns whether the malloc settings were applied (False where
    mallopt is unavailable: not glibc)."""
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return all([bool(mallopt(option, ctypes.c_int(value))) for option, value in _SETTINGS])
