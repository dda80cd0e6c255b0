"""CPU benchmark of the Lightning Attention forms (pytest-benchmark).

    python -m pytest bench/test_bench_cpu.py --benchmark-only --benchmark-columns=min,median,rounds

Each case also records the exact peak tensor memory (bench/memtrack.py) in ``extra_info``.
"""
import pytest
import torch

from memtrack import peak_bytes
from tnllm.ops import lightning_attn, lightning_attn_naive

B, H, D = 1, 8, 64
TS = [256, 512, 1024, 2048, 4096]


def inputs(T, grad=False):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(B, H, T, D, generator=g) / 8 for _ in range(3))
    if grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    s = torch.tensor([2 ** (-(h + 1)) for h in range(H)], dtype=torch.float32)
    return q, k, v, s


FORMS = {"blocked": lambda q, k, v, s: lightning_attn(q, k, v, s, block_size=128),
         "naive": lightning_attn_naive}


@pytest.mark.parametrize("T", TS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("form", list(FORMS))
def test_fwd(benchmark, form, T):
    q, k, v, s = inputs(T)
    fn = FORMS[form]
    with torch.no_grad():
        peak, largest = peak_bytes(fn, q, k, v, s)
        benchmark.extra_info.update(peak_MiB=peak / 2**20, largest_MiB=largest / 2**20)
        out = benchmark(fn, q, k, v, s)
    assert out.shape == v.shape


@pytest.mark.parametrize("T", TS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("form", list(FORMS))
def test_fwd_bwd(benchmark, form, T):
    q, k, v, s = inputs(T, grad=True)
    fn = FORMS[form]
    do = torch.randn(B, H, T, D)

    def step():
        o = fn(q, k, v, s)
        return torch.autograd.grad(o, (q, k, v), do)

    peak, largest = peak_bytes(step)
    benchmark.extra_info.update(peak_MiB=peak / 2**20, largest_MiB=largest / 2**20)
    g = benchmark(step)
    assert g[0].shape == q.shape
