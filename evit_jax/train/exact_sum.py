"""Exact running sums of evaluation statistics, kept on the device and fetched once.

The evaluation adds every batch's statistics (counts, loss sums, per-class pixel histograms)
into an accumulator that stays on the device, so the eval loop never waits for the host; the
loop jits :func:`start` and :func:`add` and fetches the accumulator once at the end
(:func:`to_host`). The sums must be as exact as the float64/int64 host sums they replace, but
without 64-bit types on the device (jax disables x64 by default, and TPUs have no native
float64/int64 arithmetic):

* integer statistics (and bools) are kept as two int32 words, ``value = high * 2**30 + low``
  with ``0 <= low < 2**30``: exact up to about 2**61, where one int32 would overflow at
  2**31 (the pixel counts of a large segmentation split pass that);
* float statistics are kept as a float32 pair (sum, compensation) updated with the error-free
  two-sum (Knuth), i.e. compensated (Kahan-Babuska) summation: the rounding error of every
  addition is carried instead of lost, which keeps about 46 significant bits where a float32
  running sum keeps 24 minus the log2 of the number of batches. Integer-valued float
  statistics therefore stay exact far beyond float32's 2**24.

Statistics that already are 64-bit (x64 enabled) are simply added.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

_LOW_BITS = 30
_LOW_MASK = (1 << _LOW_BITS) - 1


def _is_wide(x) -> bool:
    return jnp.dtype(x.dtype).itemsize > 4


def _is_integer(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.integer) or jnp.issubdtype(x.dtype, jnp.bool_)


def _split_integer(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(high, low) int32 with x == high * 2**30 + low and 0 <= low < 2**30, for any integer
    of at most 32 bits (the shift is a floor division, also for negative values)."""
    if x.dtype != jnp.uint32:
        x = x.astype(jnp.int32)
    return (x >> _LOW_BITS).astype(jnp.int32), (x & _LOW_MASK).astype(jnp.int32)


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(s, e) with s = fl(a + b) and a + b == s + e exactly (Knuth's TwoSum, any magnitudes)."""
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


def _add_leaf(acc: tuple, x: jax.Array) -> tuple:
    if _is_wide(x):
        return (acc[0] + x,)
    if _is_integer(x):
        high, low = acc
        x_high, x_low = _split_integer(x)
        low = low + x_low  # both < 2**30: no int32 overflow
        return high + x_high + (low >> _LOW_BITS), low & _LOW_MASK
    total, compensation = acc
    total, error = _two_sum(total, x.astype(jnp.float32))
    return total, compensation + error


def _zero_leaf(x: jax.Array) -> tuple:
    if _is_wide(x):
        return (jnp.zeros_like(x),)
    dtype = jnp.int32 if _is_integer(x) else jnp.float32
    return jnp.zeros(x.shape, dtype), jnp.zeros(x.shape, dtype)


def _is_leaf_acc(node) -> bool:
    return isinstance(node, tuple)


def start(stats: Mapping[str, jax.Array]) -> dict[str, tuple]:
    """The accumulator holding one batch's statistics (traceable; jit it)."""
    return add(jax.tree_util.tree_map(_zero_leaf, dict(stats)), stats)


def add(acc: Mapping[str, tuple], stats: Mapping[str, jax.Array]) -> dict[str, tuple]:
    """``acc`` plus one batch's statistics, exactly (traceable; jit it)."""
    return jax.tree_util.tree_map(_add_leaf, dict(acc), dict(stats), is_leaf=_is_leaf_acc)


def to_host(acc: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Fetched accumulator -> {name: int64 or float64 numpy sum}."""
    def value(words):
        words = [np.asarray(w) for w in words]
        if len(words) == 1:
            return words[0]
        high, low = words
        if np.issubdtype(high.dtype, np.integer):
            return (high.astype(np.int64) << _LOW_BITS) + low.astype(np.int64)
        return high.astype(np.float64) + low.astype(np.float64)

    return jax.tree_util.tree_map(value, dict(acc), is_leaf=_is_leaf_acc)
