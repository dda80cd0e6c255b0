"""Integer helpers for the Triton launchers' Python side (grids, tile widths).

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` objects (triton 3.6 and 3.9): called
from Python each costs about 1.5 us, and a Lightning Attention backward computes about 27 of them per call, on the
host's critical path of a training step. These are the same functions in plain Python (about 0.02 us)."""
from __future__ import annotations


def cdiv(x: int, y: int) -> int:
    """ceil(x / y) for ints, as ``triton.cdiv``."""
    return (x + y - 1) // y


def next_pow2(n: int) -> int:
    """The smallest power of 2 >= n for 1 <= n < 2**64, as ``triton.next_power_of_2`` (which gives 0 at n = 0)."""
    n -= 1
    n |= n >> 1
    n |= n >> 2
    n |= n >> 4
    n |= n >> 8
    n |= n >> 16
    n |= n >> 32
    return n + 1
