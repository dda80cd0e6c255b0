"""The residual projection's Triton kernel (tnllm.ops.gemv) on CPU under TRITON_INTERPRET=1 against the
reference from the same inputs: fp32 and fp16, with and without the SGLU gate, widths that are not
multiples of the tiles, strided rows, NaN-poisoned outputs so an unwritten element shows up; the op's
dispatch (Triton up to MAX_ROWS rows, cuBLAS's form above) and the fused decode step through it."""
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/ops/test_triton.py (a child process)"
pytest.importorskip("triton")

from tnllm.ops.gemv import op as gemv_op  # noqa: E402
from tnllm.ops.gemv import residual_gemv_naive  # noqa: E402
from tnllm.ops.gemv import triton as tri  # noqa: E402
from tnllm.testing import TOL, rel_err  # noqa: E402
from tnllm.testing import poisoned_allocations as poisoned  # noqa: E402


@given(B=st.integers(1, 3), N=st.sampled_from([1, 7, 16, 40]), K=st.sampled_from([1, 5, 64, 300]),
       dtype=st.sampled_from([torch.float32, torch.float16]), gate=st.sampled_from([None, "none", "silu", "relu"]),
       cfg=st.sampled_from([None, tri.GemvConfig(BN=4, BK=16, num_warps=2), tri.GemvConfig(BN=16, BK=64)]),
       pad=st.sampled_from([0, 6]), seed=st.integers(0, 2**31 - 1))
def test_kernel_matches_reference(B, N, K, dtype, gate, cfg, pad, seed):
    g = torch.Generator().manual_seed(seed)
    ky = 2 * K if gate is not None else K
    y = (torch.randn(B, ky + pad, generator=g) * 2)[:, :ky].to(dtype)       # row stride ky + pad when padded
    x = (torch.randn(B, N + pad, generator=g) * 3)[:, :N].to(dtype)
    w = (torch.randn(N, K + pad, generator=g) * K ** -0.5)[:, :K].to(dtype)
    ref = residual_gemv_naive(x.float(), y.float(), w.float(), gate)
    with poisoned():
        out = tri.residual_gemv_triton(x, y, w, gate, cfg=cfg)
    assert out.dtype == dtype and out.shape == (B, N) and out.is_contiguous()
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"B{B} N{N} K{K} {dtype} gate={gate} {cfg}: {err:.2e}"


def test_dispatch_by_rows(monkeypatch):
    """Up to MAX_ROWS rows the op launches the kernel; above it takes cuBLAS's form (addmm, the gate as its
    own op): both equal the reference."""
    calls = []
    real = tri.residual_gemv_triton
    monkeypatch.setattr(tri, "residual_gemv_triton", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    gemv_op.use_triton_on_cpu(True)
    try:
        g = torch.Generator().manual_seed(5)
        for B in (1, gemv_op.MAX_ROWS, gemv_op.MAX_ROWS + 1):
            x, l12, w = torch.randn(B, 24, generator=g), torch.randn(B, 40, generator=g), torch.randn(24, 20, generator=g)
            out = gemv_op.residual_gemv(x, l12, w, "silu")
            assert rel_err(out, residual_gemv_naive(x, l12, w, "silu")) <= TOL[torch.float32]
    finally:
        gemv_op.use_triton_on_cpu(False)
    assert calls == [1, gemv_op.MAX_ROWS]
