"""Host-memory settings that keep an XLA:CPU step from first-touching its buffers on every call.

An XLA:CPU executable allocates its temporaries (926 MiB for the batch-16 B1 train step) with malloc on
each call, from a thread of JAX's runtime. glibc gives each such thread its own arena, and an arena
other than the main one cannot hold a block above 64 MiB: it maps a fresh one and unmaps it on free.
Every call therefore page-faults its whole working set in again (about 245,000 minor faults per B1
step, a quarter of its time; docs/performance.md). One arena (`M_ARENA_MAX` = 1) serves those blocks
from the main heap, with mmap off (`M_MMAP_MAX` = 0) and trimming off (`M_TRIM_THRESHOLD` = -1) they
stay there once freed, and the next call reuses them. Production services often lower
`MALLOC_ARENA_MAX` too (less memory held in idle arenas).

Call :func:`retain_freed_memory` at the start of an entry point, before JAX starts its runtime (the
first `jax.devices()`, `jit` call or array): a thread keeps the arena it was given, so a later call has
no effect on the runtime's threads. Process-wide, and a no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# (parameter, value): one arena; no block served by mmap; never give the heap's top back (-1: the
# largest size_t). A mmap threshold cannot do the second: mallopt's int cannot exceed 2 GiB, and L1's
# step allocates 2.9 GiB.
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))


def retain_freed_memory() -> bool:
    """Makes glibc serve every thread's blocks from the main heap and keep freed ones for reuse.

    The process's resident memory then stays at its peak instead of shrinking between steps. Returns
    whether every setting was applied (False where mallopt is unavailable: not glibc).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return all([bool(mallopt(option, ctypes.c_int(value))) for option, value in _SETTINGS])
