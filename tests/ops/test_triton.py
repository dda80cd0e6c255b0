"""The Triton kernels on CPU under TRITON_INTERPRET=1 (fp32/fp16: the interpreter's bf16 tl.dot is broken).

The launchers are called directly with CPU tensors, against the fp64 naive oracle: outputs, final
states and all gradients, at tile/chunk/split/tail edges, with poisoned (NaN) allocations so that
an element the kernels never write fails the check.
"""
import importlib
import math
import os

os.environ["TRITON_INTERPRET"] = "1"   # before the kernels are decorated (triton reads it at @jit time)

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytest.importorskip("triton")

from _numerics import assert_close, poisoned  # noqa: E402
from tnllm.ops import norm_triton as nt  # noqa: E402
from tnllm.ops.lightning_attn import naive  # noqa: E402
from tnllm.ops.lightning_attn import op as la_op  # noqa: E402
from tnllm.ops.lightning_attn import triton as tri  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if not isinstance(tri._la_sweep_kernel, InterpretedFunction):   # imported earlier without the interpreter
    tri = importlib.reload(tri)
assert isinstance(tri._la_sweep_kernel, InterpretedFunction)

TOL = {torch.float32: 1e-5, torch.float16: 3e-3}




def make(B, H, T, Dk, Dv, dtype, seed, state, s_max=1.0, noncontig=False):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    if noncontig:     # the model's layout: [B, T, H, D] storage seen as [B, H, T, D]
        q, k, v = (r(B, T, H, D).transpose(1, 2) for D in (Dk, Dk, Dv))
    else:
        q, k, v = r(B, H, T, Dk), r(B, H, T, Dk), r(B, H, T, Dv)
    q, k = q / math.sqrt(Dk), k / math.sqrt(Dk)
    s = (torch.rand(H, generator=g, dtype=torch.float64) * s_max).float()
    S0 = r(B, H, Dk, Dv).float() if state else None
    do, dS = r(B, H, T, Dv), r(B, H, Dk, Dv)
    return [x.to(dtype) for x in (q, k, v)], s, S0, do.to(dtype), dS.float()


def oracle(q, k, v, s, S0, do, dS):
    d = lambda x: None if x is None else x.detach().double().requires_grad_()
    qd, kd, vd, S0d = d(q), d(k), d(v), d(S0)
    o, S = naive.lightning_attn_naive(qd, kd, vd, s.double(), S0d, output_final_state=True)
    loss = (o * do.double()).sum() + (S * dS.double()).sum()
    ins = [qd, kd, vd] + ([S0d] if S0d is not None else [])
    grads = torch.autograd.grad(loss, ins)
    return o, S, grads[0], grads[1], grads[2], (grads[3] if S0 is not None else None)


def check(B, H, T, Dk, Dv, dtype, seed, state, cfg=None, s_max=1.0, noncontig=False, with_dS=True):
    (q, k, v), s, S0, do, dS = make(B, H, T, Dk, Dv, dtype, seed, state, s_max, noncontig)
    if not with_dS:
        dS = torch.zeros_like(dS)
    ref = oracle(q, k, v, s, S0, do, dS)
    cfgs = {n: cfg for n in ("dq", "dk", "dv")} if cfg is not None else None
    with poisoned():
        o, S = tri.lightning_attn_fwd_triton(q, k, v, s, S0, cfg=cfg)
        dq, dk, dv, dS0 = tri.lightning_attn_bwd_triton(do, dS if with_dS else None, q, k, v, s, S0, cfgs=cfgs)
    tag = f"B{B} H{H} T{T} Dk{Dk} Dv{Dv} {dtype} state={state} cfg={cfg}"
    for name, a, b in zip(("o", "S", "dq", "dk", "dv", "dS0"), (o, S, dq, dk, dv, dS0), ref):
        if b is None:
            continue
        assert a.is_contiguous(), name
        err_dtype = torch.float32 if name in ("S", "dS0") and dtype == torch.float32 else dtype
        assert_close(a, b, torch.float32, f"{name} {tag}", scale=TOL[err_dtype] / 2e-5)
    assert o.dtype == dtype and dq.dtype == dtype and dk.dtype == dtype and dv.dtype == dtype
    assert S.dtype == torch.float32 and dS0.dtype == torch.float32
    if S0 is None:   # dS0 is still the gradient an initial state would get: lam^T dS + sum lam^(t+1) q^T do
        (qd, kd, vd), Zd = (x.double() for x in (q, k, v)), torch.zeros(B, H, Dk, Dv, dtype=torch.float64, requires_grad=True)
        oz, Sz = naive.lightning_attn_naive(qd, kd, vd, s.double(), Zd, output_final_state=True)
        (g,) = torch.autograd.grad((oz * do.double()).sum() + (Sz * dS.double()).sum(), [Zd])
        assert_close(dS0, g, torch.float32, f"dS0(no state) {tag}", scale=TOL[dtype] / 2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,H,T,Dk,Dv", [
    (1, 2, 1, 16, 16), (1, 2, 63, 16, 32), (2, 1, 65, 32, 16), (1, 2, 130, 24, 40), (1, 1, 257, 16, 16),
], ids=lambda x: str(x))
@pytest.mark.parametrize("state", [False, True], ids=["nostate", "state"])
def test_kernels_match_naive(B, H, T, Dk, Dv, dtype, state):
    check(B, H, T, Dk, Dv, dtype, seed=T * 7 + Dk, state=state)


@pytest.mark.parametrize("cfg", [
    tri.SweepConfig(BC=16, CHUNK=16, n_split=1),
    tri.SweepConfig(BC=16, CHUNK=16, n_split=3),     # splits with a state pre-pass, tail in the last split
    tri.SweepConfig(BC=16, CHUNK=32, n_split=2),
    tri.SweepConfig(BC=32, CHUNK=16, n_split=8),     # more splits asked than chunks of 16 allow evenly
], ids=lambda c: f"BC{c.BC}-C{c.CHUNK}-split{c.n_split}")
def test_tiles_chunks_splits(cfg):
    check(2, 2, 150, 20, 36, torch.float32, seed=cfg.n_split + cfg.CHUNK, state=True, cfg=cfg)


@pytest.mark.parametrize("Dk,Dv", [(136, 24), (24, 136), (144, 144)], ids=str)
def test_wide_heads_split_into_launches(Dk, Dv):
    """Dk or Dv over 128 (the LRPE layer has Dk = 2e): column slices and summed partial sweeps."""
    check(1, 2, 70, Dk, Dv, torch.float32, seed=Dk + Dv, state=True)


def test_noncontiguous_inputs_no_dS_and_fast_decay():
    check(2, 2, 70, 16, 16, torch.float32, seed=3, state=True, noncontig=True, with_dS=False, s_max=8.0)


def test_slow_decay_long_split():
    # lam ~ 1 - 1e-6: every position sees the whole prefix; with 5 splits of 2 chunks
    check(1, 2, 600, 16, 16, torch.float32, seed=5, state=True, s_max=1e-6, cfg=tri.SweepConfig(BC=16, CHUNK=64, n_split=5))


@settings(max_examples=8)
@given(B=st.integers(1, 2), H=st.integers(1, 2), T=st.integers(1, 140), Dk=st.sampled_from([8, 16, 24]),
       Dv=st.sampled_from([8, 16, 40]), state=st.booleans(), chunk=st.sampled_from([16, 32, 64]),
       n_split=st.integers(0, 3), seed=st.integers(0, 2**31 - 1))
def test_kernels_property(B, H, T, Dk, Dv, state, chunk, n_split, seed):
    check(B, H, T, Dk, Dv, torch.float32, seed, state, cfg=tri.SweepConfig(BC=16, CHUNK=chunk, n_split=n_split))


def test_zero_length_and_fallbacks():
    (q, k, v), s, S0, do, dS = make(1, 2, 0, 16, 16, torch.float32, 0, True)
    o, S = tri.lightning_attn_fwd_triton(q, k, v, s, S0)
    assert o.shape == (1, 2, 0, 16) and torch.equal(S, S0)
    dq, dk, dv, dS0 = tri.lightning_attn_bwd_triton(do, dS, q, k, v, s, S0)
    assert dq.shape == q.shape and torch.equal(dS0, dS)
    # fp64 is not a kernel dtype: the launchers fall back to the blocked form, same answers
    (q, k, v), s, S0, do, dS = make(1, 2, 33, 8, 8, torch.float64, 1, True)
    ref = oracle(q, k, v, s, S0.double(), do, dS.double())
    o, S = tri.lightning_attn_fwd_triton(q, k, v, s, S0.double())
    assert_close(o, ref[0], torch.float64, "fp64 fallback o")
    assert not tri.supported(q, v) and tri.supported(q.float(), v.float())


def test_cuda_registration_glue():
    """The functions registered for CUDA on the op, run here through the interpreter on CPU tensors."""
    (q, k, v), s, S0, do, dS = make(1, 2, 40, 16, 16, torch.float32, 2, True)
    ref = oracle(q, k, v, s, S0, do, dS)
    o, S = la_op._fwd_cuda(q, k, v, s, S0, 64)
    dq, dk, dv, dS0 = la_op._bwd_cuda(do, dS, q, k, v, s, S0, 64)
    for name, a, b in zip(("o", "S", "dq", "dk", "dv", "dS0"), (o, S, dq, dk, dv, dS0), ref):
        assert_close(a, b, torch.float32, name, scale=0.5)


# ---- fused SRMSNorm * u ------------------------------------------------------------------------

def _norm_inputs(B, H, T, E, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(B, T, H, E, generator=g).transpose(1, 2).to(dtype)          # [B, H, T, e] seen through [B, T, H, e] strides
    u = torch.randn(B, T, 2 * H * E, generator=g)[..., : H * E].to(dtype)       # a chunk of a wider projection
    dy = torch.randn(B, T, H * E, generator=g).to(dtype)
    return o, u, dy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,H,T,E", [(2, 3, 5, 24), (1, 4, 7, 32), (1, 1, 3, 16)], ids=str)
def test_norm_gate_kernels(B, H, T, E, dtype):
    o, u, dy = _norm_inputs(B, H, T, E, dtype, seed=B + H + T + E)
    ref = nt._reference(o, u)
    od, ud = o.double().requires_grad_(), u.double().requires_grad_()
    (nt._reference(od, ud) * dy.double()).sum().backward()
    with poisoned():
        y = nt.srms_norm_gate_fwd_triton(o, u)
        dx, du = nt.srms_norm_gate_bwd_triton(dy, o, u)
    if dtype == torch.float16:   # same roundings as the unfused expression
        assert torch.equal(y, ref)
    assert_close(y, ref, torch.float32, "y", scale=TOL[dtype] / 2e-5)
    assert_close(dx, od.grad, torch.float32, "do", scale=TOL[dtype] / 2e-5)
    assert_close(du, ud.grad, torch.float32, "du", scale=TOL[dtype] / 2e-5)
    assert dx.shape == o.shape and dx.is_contiguous() and du.is_contiguous()


def test_norm_gate_op_cpu():
    """On CPU the public function is exactly the unfused model expression; the op's CPU kernels agree."""
    from tnllm.ops import srms_norm
    o, u, dy = _norm_inputs(2, 2, 6, 16, torch.float32, seed=0)
    B, H, T, E = o.shape
    assert torch.equal(nt.srms_norm_gate(o, u), srms_norm(o.transpose(1, 2).reshape(B, T, -1)) * u)
    oo, uu = o.clone().requires_grad_(), u.clone().requires_grad_()
    y = torch.ops.tnllm.srms_norm_gate(oo, uu)
    (y * dy).sum().backward()
    od, ud = o.double().requires_grad_(), u.double().requires_grad_()
    (nt._reference(od, ud) * dy.double()).sum().backward()
    assert_close(oo.grad, od.grad, torch.float32, "do")
    assert_close(uu.grad, ud.grad, torch.float32, "du")
    torch.library.opcheck(torch.ops.tnllm.srms_norm_gate.default, (oo, uu))
    with pytest.raises(ValueError, match="u"):
        nt.srms_norm_gate(o, u[..., :-1])
    assert torch.equal(nt.srms_norm_gate(o, u.double()), srms_norm(o.transpose(1, 2).reshape(B, T, -1)) * u.double())
