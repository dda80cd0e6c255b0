"""GPU suite for the residual projection (``tnllm.ops.gemv``, ``pytest -m gpu``): the Triton kernel and the
op's cuBLAS side against the fp64 reference from the same inputs, at the released widths (out_proj and l3,
with and without the SGLU gate), bf16 / fp16 / fp32; CUDA-graph capture and replay; torch.compile(fullgraph)."""
import pytest
import torch

from tnllm.ops.gemv import op as gemv_op
from tnllm.ops.gemv import residual_gemv, residual_gemv_naive
from tnllm.testing import poisoned_allocations as poisoned

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
BF, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# (batch, N = d, K, gate, dtype): the 385M / 1B / 7B out_proj (K = d) and l3 (K = glu dim, gated), batch 1 and
# MAX_ROWS (the kernel) and 8 (cuBLAS)
CASES = [(1, 1024, 1024, None, BF), (1, 1024, 2816, "none", BF), (4, 1024, 2816, "silu", FP16),
         (8, 1024, 2816, "none", BF), (1, 2048, 5632, "none", FP32), (2, 2048, 2048, None, FP16),
         (1, 4096, 4096, None, BF), (1, 4096, 11008, "none", BF), (8, 4096, 4096, None, BF)]


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("B,N,K,gate,dtype", CASES, ids=lambda x: str(x))
def test_residual_gemv_vs_reference(B, N, K, gate, dtype):
    g = torch.Generator(device="cuda").manual_seed(B + N + K)
    x = (torch.randn(B, N, device="cuda", generator=g) * 4).to(dtype)
    y = (torch.randn(B, 2 * K if gate else K, device="cuda", generator=g) * 2).to(dtype)
    w = (torch.randn(N, K, device="cuda", generator=g) * K ** -0.5).to(dtype)
    ref = residual_gemv_naive(x.double(), y.double(), w.double(), gate)
    with poisoned():
        out = residual_gemv(x, y, w, gate)
    assert out.dtype == dtype and out.shape == (B, N)
    assert rel(out, ref) <= TOL[dtype], f"rows {B} ({'kernel' if B <= gemv_op.MAX_ROWS else 'cuBLAS'})"


def test_graph_capture_and_compile():
    B, N, K = 1, 1024, 2816
    x = torch.randn(B, N, device="cuda").to(BF)
    l12 = torch.randn(B, 2 * K, device="cuda").to(BF)
    w = (torch.randn(N, K, device="cuda") * K ** -0.5).to(BF)
    f = torch.compile(lambda a, b: residual_gemv(a * 2, b, w, "none") + 1, fullgraph=True, dynamic=False)
    assert torch.equal(f(x, l12), residual_gemv(x * 2, l12, w, "none") + 1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        residual_gemv(x, l12, w, "none")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = residual_gemv(x, l12, w, "none")
    l12.mul_(-1)
    graph.replay()
    assert torch.equal(out, residual_gemv(x, l12, w, "none"))
