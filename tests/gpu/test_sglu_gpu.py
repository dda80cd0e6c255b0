"""GPU suite for the SGLU gate kernel and the folded input norm of the decode kernel (``pytest -m gpu``):
the Triton kernels against the fp32 reference from the same inputs, at bf16 / fp16 / fp32 and the
released widths; CUDA-graph capture and replay; torch.compile(fullgraph=True)."""
import pytest
import torch

from tnllm.ops.gla_decode import gla_decode_naive, gla_decode_step
from tnllm.ops.sglu import sglu_gate, sglu_gate_naive
from tnllm.testing import poisoned_allocations as poisoned

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


BF, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
PRESET_WIDTHS = {"385M": (1024, 2816), "1B": (2048, 5632), "7B": (4096, 11008)}
# every preset width, batch, dtype and norm flag at least once, each width with and without the norm (a new
# width or dtype is a Triton compile: the full product would be 18 compiles for little more coverage)
SGLU_CASES = [(1, "385M", BF, False), (8, "385M", FP16, True), (256, "385M", FP32, True), (1, "1B", FP32, False),
              (256, "1B", BF, True), (8, "7B", BF, False), (1, "7B", FP16, True), (256, "7B", BF, True)]


@pytest.mark.parametrize("B,preset,dtype,norm", SGLU_CASES, ids=lambda x: str(x))
def test_sglu_kernel_vs_reference(B, preset, dtype, norm):
    d, G = PRESET_WIDTHS[preset]
    g = torch.Generator(device="cuda").manual_seed(B + d)
    l12 = (torch.randn(B, 2 * G, device="cuda", generator=g) * 3).to(dtype)
    x = (torch.randn(B, d, device="cuda", generator=g) * 20).to(dtype) if norm else None
    ref = sglu_gate_naive(l12.float(), None if x is None else x.float(), "none")
    with poisoned():
        out = sglu_gate(l12, x, "none")
    assert out.dtype == dtype and out.shape == (B, G)
    assert rel(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("act", ["silu", "relu"])
def test_sglu_kernel_activations(act):
    l12 = torch.randn(5, 2 * 300, device="cuda").to(torch.bfloat16)
    x = torch.randn(5, 96, device="cuda").to(torch.bfloat16)
    assert rel(sglu_gate(l12, x, act), sglu_gate_naive(l12.float(), x.float(), act)) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("lrpe", [True, False], ids=["lrpe", "nolrpe"])
@pytest.mark.parametrize("B,H,d", [(1, 8, 1024), (64, 16, 2048), (8, 32, 4096)])
def test_gla_kernel_with_norm_input(B, H, d, lrpe, dtype):
    e = 128
    g = torch.Generator(device="cuda").manual_seed(B * H)
    qkvu = (torch.randn(B, 4 * H * e, device="cuda", generator=g) * 30).to(dtype)
    x = (torch.randn(B, d, device="cuda", generator=g) * 30).to(dtype)
    S = torch.randn(B, H, 2 * e if lrpe else e, e, device="cuda", generator=g)
    s = torch.rand(H, device="cuda", generator=g)
    theta = (10000 ** (-2 / (H * e) * torch.arange(H * e, device="cuda"))).reshape(H, 1, e) if lrpe else None
    pos = torch.randint(0, 131073, (B,), device="cuda", generator=g)
    y_ref, S_ref = gla_decode_naive(qkvu.float(), S, s, theta, pos, "silu", norm_input=x.float())
    buf = S.clone()
    with poisoned():
        y, _ = gla_decode_step(qkvu, buf, s, theta, pos, "silu", inplace=True, norm_input=x)
    assert rel(y, y_ref) <= TOL[dtype] * (2 if dtype == torch.bfloat16 else 10)
    assert rel(buf, S_ref) <= TOL[dtype] * (2 if dtype == torch.bfloat16 else 10)


def test_graph_capture_and_compile():
    B, G, d = 4, 2816, 1024
    l12 = torch.randn(B, 2 * G, device="cuda").to(torch.bfloat16)
    x = torch.randn(B, d, device="cuda").to(torch.bfloat16)
    f = torch.compile(lambda a, b: sglu_gate(a * 2, b, "none") + 1, fullgraph=True, dynamic=False)
    want = sglu_gate(l12 * 2, x, "none") + 1
    assert torch.equal(f(l12, x), want)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sglu_gate(l12, x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sglu_gate(l12, x)
    l12.mul_(-1)
    graph.replay()
    assert torch.equal(out, sglu_gate(l12, x))
