"""GPU suite for the fused decode kernel (tnllm.ops.gla_decode; ``pytest -m gpu``, skipped without CUDA).

The Triton op against the reference form in fp32 from the same (rounded) inputs, e = 128, H = 8 / 16
(and 32), B = 1 / 8 / 64, LRPE on and off, positions 0 and 1e5, rates 0 to large; in place and
functional; bit-for-bit determinism over repeated calls (the last-program-normalises scheme sums in a
fixed order); CUDA-graph capture and replay of many steps; torch.compile(fullgraph=True).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tnllm.testing import poisoned_allocations as poisoned
from tnllm.ops.gla_decode import gla_decode_naive, gla_decode_step

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make(B, H, e, lrpe, dtype, seed=0, pos_max=100000):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = H * e
    qkvu = torch.randn(B, 4 * h, device="cuda", generator=g).to(dtype)
    S = torch.randn(B, H, 2 * e if lrpe else e, e, device="cuda", generator=g)
    s = torch.rand(H, device="cuda", generator=g) * 2
    s[0] = 0.0
    if H > 1:
        s[-1] = 30.0
    theta = (10000 ** (-2 / h * torch.arange(h, device="cuda"))).reshape(H, 1, e) if lrpe else None
    pos = torch.randint(0, pos_max + 1, (B,), device="cuda", generator=g)
    pos[0] = 0
    pos[-1] = pos_max
    return qkvu, S, s, theta, pos


BF, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# every H, B, dtype and LRPE flag, and each dtype with and without LRPE (the Hypothesis test below draws more)
DECODE_CASES = [(8, 1, True, BF), (8, 64, False, FP32), (16, 8, True, FP16), (16, 1, False, BF),
                (16, 64, True, FP32), (32, 8, False, FP16), (32, 64, True, BF), (32, 1, True, FP32),
                (8, 8, False, BF), (16, 64, True, FP16)]


@pytest.mark.parametrize("H,B,lrpe,dtype", DECODE_CASES, ids=lambda x: str(x))
def test_kernel_vs_reference(H, B, lrpe, dtype):
    qkvu, S, s, theta, pos = make(B, H, 128, lrpe, dtype, seed=B * 100 + H)
    y_ref, S_ref = gla_decode_naive(qkvu.float(), S, s, theta, pos, "silu")       # fp32 oracle
    y_mod, _ = gla_decode_naive(qkvu, S, s, theta, pos, "silu")                     # the model's rounding
    with poisoned():
        y_f, S_f = gla_decode_step(qkvu, S, s, theta, pos, "silu")
    buf = S.clone()
    with poisoned():
        y_i, _ = gla_decode_step(qkvu, buf, s, theta, pos, "silu", inplace=True)
    tag = f"H{H} B{B} lrpe={lrpe} {dtype}"
    errs = {"y": rel(y_f, y_ref), "S": rel(S_f, S_ref), "y vs model-rounded": rel(y_f, y_mod)}
    assert all(e <= TOL[dtype] for e in errs.values()), f"{tag}: {errs}"
    assert torch.equal(y_i, y_f) and torch.equal(buf, S_f), f"{tag}: in place != functional"
    assert y_f.dtype == dtype and S_f.dtype == torch.float32


@given(B=st.integers(1, 5), H=st.integers(1, 4), e=st.sampled_from([16, 32, 64, 128]), lrpe=st.booleans(),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), act=st.sampled_from(["silu", "relu", "none"]),
       rate=st.sampled_from([0.0, 1e-6, 0.5, 30.0]), pos=st.sampled_from([0, 1, 100000, 12345]),
       scale=st.sampled_from([0.0, 1.0, 100.0]), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=12)   # a drawn (e, lrpe, dtype, act) is a compile: 12 keep this under ~30 s
def test_kernel_property(B, H, e, lrpe, dtype, act, rate, pos, scale, seed):
    torch.manual_seed(seed)
    h = H * e
    qkvu = torch.randn(B, 4 * h, device="cuda").to(dtype)
    S = torch.randn(B, H, 2 * e if lrpe else e, e, device="cuda") * scale
    s = torch.full((H,), rate, device="cuda")
    theta = (10000 ** (-2 / h * torch.arange(h, device="cuda"))).reshape(H, 1, e) if lrpe else None
    p = torch.full((B,), pos, device="cuda", dtype=torch.int64)
    y_ref, S_ref = gla_decode_naive(qkvu.float(), S, s, theta, p, act)
    with poisoned():
        y, S_new = gla_decode_step(qkvu, S, s, theta, p, act)
    errs = {"y": rel(y, y_ref), "S": rel(S_new, S_ref)}
    assert all(v <= TOL[dtype] for v in errs.values()), errs


@pytest.mark.parametrize("lrpe", [True, False], ids=["lrpe", "nolrpe"])
def test_deterministic_over_repeated_calls(lrpe):
    qkvu, S, s, theta, pos = make(64, 16, 128, lrpe, torch.bfloat16, seed=7)
    y0, S0 = gla_decode_step(qkvu, S, s, theta, pos)
    for _ in range(50):
        y, S1 = gla_decode_step(qkvu, S, s, theta, pos)
        assert torch.equal(y, y0) and torch.equal(S1, S0)


@pytest.mark.parametrize("B", [1, 64])
def test_cuda_graph_replay_of_many_steps(B):
    H, e, T = 8, 128, 20
    qkvu, S, s, theta, pos = make(B, H, e, True, torch.bfloat16, seed=11)
    xs = torch.randn(T, B, 4 * H * e, device="cuda").to(torch.bfloat16)
    buf, ys = S.clone(), torch.empty(T, B, H * e, device="cuda", dtype=torch.bfloat16)
    x_in, p_in = torch.empty_like(xs[0]), pos.clone()

    def step():
        y, _ = gla_decode_step(x_in, buf, s, theta, p_in, "silu", inplace=True)
        return y

    x_in.copy_(xs[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()                                  # warm-up: compiles the kernel, allocates the counters
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y_static = step()
    buf.copy_(S)
    for t in range(T):
        x_in.copy_(xs[t])
        p_in.copy_(pos + t)
        g.replay()
        ys[t] = y_static
    S_ref = S.clone()
    for t in range(T):
        y_ref, S_ref = gla_decode_naive(xs[t].float(), S_ref, s, theta, pos + t, "silu")
        assert rel(ys[t], y_ref) <= TOL[torch.bfloat16], f"step {t}"
    assert rel(buf, S_ref) <= TOL[torch.bfloat16]


def test_compile_fullgraph_cuda():
    qkvu, S, s, theta, pos = make(8, 8, 128, True, torch.bfloat16, seed=3)

    def f(x, S):
        y, _ = gla_decode_step(x * 2, S, s, theta, pos, "silu", inplace=True)
        return y.float().sum(-1)

    buf, ref_buf = S.clone(), S.clone()
    out = torch.compile(f, fullgraph=True, dynamic=False)(qkvu, buf)
    ref = f(qkvu, ref_buf)
    assert torch.equal(buf, ref_buf)
    torch.testing.assert_close(out, ref)
