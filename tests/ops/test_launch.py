"""The launchers' integer helpers (ops/_launch.py) equal Triton's own on every value the launchers pass."""
import pytest

from tnllm.ops._launch import cdiv, next_pow2

triton = pytest.importorskip("triton")


def test_cdiv_and_next_pow2_equal_triton():
    for x in list(range(0, 300)) + [2 ** 20 - 1, 2 ** 20, 2 ** 31 + 5, 2 ** 40 + 3]:
        for y in (1, 2, 3, 7, 16, 64, 128, 1000):
            assert cdiv(x, y) == triton.cdiv(x, y), (x, y)
        if x >= 1:
            assert next_pow2(x) == triton.next_power_of_2(x), x
