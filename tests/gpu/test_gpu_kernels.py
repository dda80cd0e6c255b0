"""GPU suite (``pytest -m gpu``; skipped without CUDA): the Triton path of the op on a real device.

Outputs, final states and gradients of ``tnllm.ops.lightning_attn`` against an fp64 oracle from
the same (rounded) inputs; relative RMS error <= 1e-2 (bf16), 2e-3 (fp16), 1e-4 (fp32, ieee dots).
Fresh random inputs every check, NaN-poisoned allocations so unwritten elements fail.
"""
import math

import pytest
import torch

from _numerics import poisoned
from tnllm.ops import lightning_attn, lightning_attn_naive

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}
DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))




def make(B, H, T, Dk, Dv, dtype, state, s_max=1.0, noncontig=False):
    dev = "cuda"
    if noncontig:
        q, k, v = (torch.randn(B, T, H, D, device=dev).transpose(1, 2) for D in (Dk, Dk, Dv))
    else:
        q, k, v = (torch.randn(B, H, T, D, device=dev) for D in (Dk, Dk, Dv))
    q, k = q / math.sqrt(Dk), k / math.sqrt(Dk)
    s = torch.rand(H, device=dev) * s_max
    S0 = torch.randn(B, H, Dk, Dv, device=dev) if state else None
    q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
    S0 = S0.requires_grad_() if state else None
    return q, k, v, s, S0


def grads(fn, q, k, v, s, S0, do, dS):
    o, S = fn(q, k, v, s, initial_state=S0, output_final_state=True)
    loss = (o.double() * do).sum() + (S.double() * dS).sum()
    ins = [q, k, v] + ([S0] if S0 is not None else [])
    return [o, S, *torch.autograd.grad(loss, ins)]


def check(B, H, T, Dk, Dv, dtype, state, **kw):
    q, k, v, s, S0 = make(B, H, T, Dk, Dv, dtype, state, **kw)
    do = torch.randn(B, H, T, Dv, device="cuda", dtype=torch.float64)
    dS = torch.randn(B, H, Dk, Dv, device="cuda", dtype=torch.float64)
    with poisoned():
        got = grads(lightning_attn, q, k, v, s, S0, do, dS)
    d = lambda x: None if x is None else x.detach().double().requires_grad_()
    ref = grads(lightning_attn_naive, d(q), d(k), d(v), s.double(), d(S0), do, dS)
    errs = {n: rel(a, b) for n, a, b in zip(("o", "S", "dq", "dk", "dv", "dS0"), got, ref)}
    bad = {n: e for n, e in errs.items() if not e <= TOL[dtype]}
    assert not bad, f"B{B} H{H} T{T} Dk{Dk} Dv{Dv} {dtype} state={state}: {errs}"
    assert got[0].dtype == dtype and got[1].dtype == torch.float32


CASES = [   # (B, H, T, Dk, Dv, dtype): every dtype at the model widths, odd widths, tails, Dk != Dv
    (2, 3, 1, 16, 16, "bf16"), (2, 3, 1, 16, 16, "fp32"), (2, 3, 100, 64, 64, "fp16"),
    (1, 4, 1000, 128, 128, "bf16"), (1, 4, 1000, 128, 128, "fp16"), (1, 4, 1000, 128, 128, "fp32"),
    (1, 2, 777, 256, 128, "bf16"), (1, 2, 777, 256, 128, "fp32"), (2, 2, 300, 128, 256, "bf16"),
    (1, 2, 333, 48, 80, "fp16"), (1, 1, 2048, 32, 32, "bf16"), (2, 4, 700, 64, 64, "bf16"),
]


@pytest.mark.parametrize("B,H,T,Dk,Dv,dt", CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("state", [False, True], ids=["nostate", "state"])
def test_op_cuda_matches_naive(B, H, T, Dk, Dv, dt, state):
    check(B, H, T, Dk, Dv, DT[dt], state)


def test_noncontiguous_slow_and_fast_decay():
    check(2, 4, 515, 128, 128, torch.bfloat16, True, noncontig=True, s_max=1e-5)
    check(2, 4, 515, 128, 128, torch.bfloat16, True, s_max=20.0)


def test_many_heads_grid():
    """B*H far past any grid-dimension limit of 65535 along y/z."""
    check(70000, 1, 20, 16, 16, torch.float16, True)


def test_split_path_small_batch_long_sequence():
    """B*H small: the launcher splits the sequence (state pre-pass); compare one long head."""
    check(1, 1, 6000, 64, 64, torch.bfloat16, True)


def test_compile_fullgraph_cuda():
    q, k, v, s, S0 = make(2, 4, 200, 64, 64, torch.bfloat16, True)

    def f(q, k, v, S0):
        o, S = lightning_attn(q * 1.5, k, v, s, initial_state=S0, output_final_state=True)
        return o.float().sin().sum() + S.square().sum()
    cf = torch.compile(f, fullgraph=True)
    a = f(q, k, v, S0)
    ga = torch.autograd.grad(a, [q, k, v, S0])
    b = cf(q, k, v, S0)
    gb = torch.autograd.grad(b, [q, k, v, S0])
    assert rel(b, a) < 1e-3
    for x, y in zip(gb, ga):
        assert rel(x, y) < 1e-3


@pytest.mark.parametrize("dt", ["bf16", "fp32"])
def test_norm_gate_cuda(dt):
    from tnllm.ops.norm_triton import _reference, srms_norm_gate
    dtype = DT[dt]
    B, H, T, E = 2, 8, 300, 128
    o = torch.randn(B, H, T, E, device="cuda", dtype=dtype, requires_grad=True)
    u = torch.randn(B, T, 2 * H * E, device="cuda", dtype=dtype)[..., : H * E].detach().requires_grad_()
    dy = torch.randn(B, T, H * E, device="cuda", dtype=dtype)
    with poisoned():
        y = srms_norm_gate(o, u)
        gy = torch.autograd.grad((y * dy).sum(), [o, u])
    od, ud = o.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    yr = _reference(od, ud)
    gr = torch.autograd.grad((yr * dy.double()).sum(), [od, ud])
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert rel(y, yr) < tol
    for a, b in zip(gy, gr):
        assert rel(a, b) < tol
    if dtype == torch.bfloat16:
        assert torch.equal(y, _reference(o.detach(), u.detach()))


def test_tiny_model_cuda_matches_cpu():
    from tnllm import TransNormerConfig, TransNormerLLM
    cfg = TransNormerConfig(vocab_size=97, decoder_embed_dim=64, decoder_layers=2, decoder_attention_heads=4, glu_dim=96)
    torch.manual_seed(0)
    m = TransNormerLLM(cfg)
    ids = torch.randint(1, 97, (2, 150))
    ref = m(ids)
    got = m.cuda()(ids.cuda()).cpu()
    assert rel(got, ref) < 1e-4
