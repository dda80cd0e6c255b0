"""The blocked form never forms a T x T tensor, and its memory grows linearly in T."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
from memtrack import peak_bytes  # noqa: E402

from tnllm.ops import lightning_attn, lightning_attn_naive  # noqa: E402


def _run(fn, T, grad):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, T, 16, generator=g).requires_grad_(grad) for _ in range(3))
    s = torch.tensor([0.1, 0.5])
    if not grad:
        return peak_bytes(fn, q, k, v, s)
    do = torch.randn(1, 2, T, 16)
    return peak_bytes(lambda: torch.autograd.grad(fn(q, k, v, s), (q, k, v), do))


def test_blocked_memory_linear_in_T():
    for grad in (False, True):
        p1, l1 = _run(lightning_attn, 1024, grad)
        p2, l2 = _run(lightning_attn, 4096, grad)
        tt = 2 * 4096 * 4096 * 4                      # one fp32 [H, T, T] tensor
        assert l2 < tt / 16, f"largest allocation {l2} bytes looks quadratic"
        assert p2 < 4.6 * p1, f"peak grew {p2 / p1:.2f}x for 4x T (grad={grad})"
    # the tracker does see the quadratic form's T x T mask
    pn, ln = _run(lightning_attn_naive, 1024, False)
    assert ln >= 2 * 1024 * 1024 * 4
