"""Lightning Attention: the forms agree with the fp64 naive oracle (outputs, final states, gradients)."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from _numerics import TOL, assert_close
from tnllm.ops import lightning_attn, lightning_attn_blocked, lightning_attn_naive, lightning_attn_recurrent

FORMS = {
    "op": lightning_attn,
    "blocked": lightning_attn_blocked,
    "recurrent": lightning_attn_recurrent,
    "naive": lightning_attn_naive,
}


def make(B, H, T, Dk, Dv, dtype, seed, s_max=3.0, state=True, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    if noncontig:   # [B, T, H, D] storage viewed as [B, H, T, D], as the model produces
        q, k, v = (r(B, T, H, D).transpose(1, 2) for D in (Dk, Dk, Dv))
    else:
        q, k, v = r(B, H, T, Dk), r(B, H, T, Dk), r(B, H, T, Dv)
    q, k = q / math.sqrt(Dk), k / math.sqrt(Dk)
    s = torch.rand(H, generator=g, dtype=torch.float64) * s_max
    S0 = r(B, H, Dk, Dv) if state else None
    do, dS = r(B, H, T, Dv), r(B, H, Dk, Dv)
    cast = lambda x: None if x is None else x.to(dtype).requires_grad_()
    sdt = torch.float64 if dtype == torch.float64 else torch.float32   # state in the acc dtype
    return cast(q), cast(k), cast(v), s.float(), (None if S0 is None else S0.to(sdt).requires_grad_()), do, dS


def run(fn, q, k, v, s, S0, do, dS, **kw):
    o, S = fn(q, k, v, s, initial_state=S0, output_final_state=True, **kw)
    loss = (o.double() * do).sum() + (S.double() * dS).sum()
    inputs = [q, k, v] + ([S0] if S0 is not None else [])
    grads = torch.autograd.grad(loss, inputs)
    return [o, S, *grads]


def oracle(q, k, v, s, S0, do, dS):
    d = lambda x: None if x is None else x.detach().double().requires_grad_()
    return run(lightning_attn_naive, d(q), d(k), d(v), s.double(), d(S0), do, dS)


NAMES = ["o", "S", "dq", "dk", "dv", "dS0"]


def check(form, B, H, T, Dk, Dv, dtype, seed, state, s_max=3.0, noncontig=False, **kw):
    args = make(B, H, T, Dk, Dv, dtype, seed, s_max=s_max, state=state, noncontig=noncontig)
    got = run(FORMS[form], *args, **kw)
    ref = oracle(*args)
    for name, a, b in zip(NAMES, got, ref):
        # the state is fp32 for low-precision inputs, so it is held to fp32-accumulation accuracy
        tol_dtype = dtype
        assert_close(a, b, tol_dtype, f"{form} {name} B{B} H{H} T{T} Dk{Dk} Dv{Dv} seed{seed}", scale=4.0)
    assert got[0].dtype == dtype
    assert got[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 300), Dk=st.sampled_from([1, 4, 8, 16, 32]),
       Dv=st.sampled_from([1, 4, 8, 24]), s_max=st.sampled_from([1e-4, 0.1, 1.0, 10.0]),
       state=st.booleans(), block=st.sampled_from([16, 32, 64, 128]), seed=st.integers(0, 2**31 - 1))
def test_blocked_matches_naive_fp64(B, H, T, Dk, Dv, s_max, state, block, seed):
    check("blocked", B, H, T, Dk, Dv, torch.float64, seed, state, s_max=s_max, block_size=block)


@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 200), Dk=st.sampled_from([4, 16]),
       Dv=st.sampled_from([4, 8]), state=st.booleans(), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_op_matches_naive(B, H, T, Dk, Dv, state, seed, dtype):
    check("op", B, H, T, Dk, Dv, dtype, seed, state, s_max=10.0)


@given(T=st.integers(1, 80), state=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_recurrent_matches_naive(T, state, seed):
    check("recurrent", 2, 2, T, 8, 4, torch.float64, seed, state)


@pytest.mark.parametrize("T", [1, 63, 64, 65, 127, 128, 129, 257], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("form", ["op", "recurrent"])
def test_block_edges(form, T):
    check(form, 2, 2, T, 16, 8, torch.float64, T, state=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("noncontig", [False, True], ids=["contig", "noncontig"])
@pytest.mark.parametrize("Dk,Dv", [(16, 16), (32, 8), (8, 24)], ids=lambda d: str(d))
def test_op_dtypes(dtype, noncontig, Dk, Dv):
    check("op", 2, 3, 100, Dk, Dv, dtype, 7, state=True, noncontig=noncontig)


def test_state_split_equals_full():
    q, k, v, s, S0, _, _ = make(2, 2, 150, 8, 8, torch.float64, 3)
    o, S = lightning_attn(q, k, v, s, initial_state=S0, output_final_state=True)
    o1, S1 = lightning_attn(q[:, :, :61], k[:, :, :61], v[:, :, :61], s, initial_state=S0, output_final_state=True)
    o2, S2 = lightning_attn(q[:, :, 61:], k[:, :, 61:], v[:, :, 61:], s, initial_state=S1, output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], 2), o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S2, S, rtol=1e-10, atol=1e-10)


def test_no_state_equals_zero_state():
    q, k, v, s, S0, _, _ = make(1, 2, 70, 8, 8, torch.float64, 4)
    a = lightning_attn(q, k, v, s)
    b = lightning_attn(q, k, v, s, initial_state=torch.zeros_like(S0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_recurrent_finite_at_long_T():
    # lam^(-t) would overflow fp32 here (s=10, T=5000); the robust recurrence never forms it
    B, H, T, D = 1, 2, 5000, 4
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    s = torch.tensor([10.0, 0.0])
    o, S = lightning_attn_recurrent(q, k, v, s, output_final_state=True)
    ob, Sb = lightning_attn(q, k, v, s, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert torch.isfinite(ob).all() and torch.isfinite(Sb).all()
    torch.testing.assert_close(ob, o, rtol=1e-4, atol=1e-3)


def test_gradcheck_fp64():
    q, k, v, s, S0, _, _ = make(1, 2, 37, 4, 3, torch.float64, 5)
    fn = lambda q, k, v, S0: lightning_attn(q, k, v, s, initial_state=S0, output_final_state=True, block_size=16)
    assert torch.autograd.gradcheck(fn, (q, k, v, S0))
    assert torch.autograd.gradgradcheck is not None


def test_opcheck():
    for state in (False, True):
        q, k, v, s, S0, do, dS = make(2, 2, 45, 8, 4, torch.float32, 6, state=state)
        S0d = None if S0 is None else S0.detach().requires_grad_()
        torch.library.opcheck(torch.ops.tnllm.lightning_attn_fwd.default, (q, k, v, s, S0d, 16))
        torch.library.opcheck(torch.ops.tnllm.lightning_attn_bwd.default,
                              (do.float(), dS.float(), q.detach(), k.detach(), v.detach(), s,
                               None if S0 is None else S0.detach(), 16))
        torch.library.opcheck(torch.ops.tnllm.lightning_attn_bwd.default,
                              (do.float(), None, q.detach(), k.detach(), v.detach(), s, None, 64))


def test_gradient_only_through_final_state():
    q, k, v, s, S0, _, dS = make(1, 2, 20, 4, 4, torch.float64, 8)
    _, S = lightning_attn(q, k, v, s, initial_state=S0, output_final_state=True)
    got = torch.autograd.grad((S.double() * dS).sum(), (q, k, v, S0))
    _, Sn = lightning_attn_naive(q, k, v, s, initial_state=S0, output_final_state=True)
    ref = torch.autograd.grad((Sn * dS).sum(), (q, k, v, S0), allow_unused=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, rtol=1e-10, atol=1e-10)


def test_compile_fullgraph_dynamic_no_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("inductor")

    def fn(q, k, v, s, S0):
        o, S = lightning_attn(q * 2, k, v, s, initial_state=S0, output_final_state=True)
        return o.sin().sum() + S.sum()

    cf = torch.compile(fn, backend=cnt, fullgraph=True, dynamic=True)
    for T in (37, 100, 64):
        q, k, v, s, S0, _, _ = make(2, 2, T, 8, 4, torch.float32, T)
        S0 = S0.detach().requires_grad_()
        got = cf(q, k, v, s, S0)
        g = torch.autograd.grad(got, (q, k, v, S0))
        ref = fn(q, k, v, s, S0)
        gr = torch.autograd.grad(ref, (q, k, v, S0))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
        for a, b in zip(g, gr):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert cnt.frame_count == 1, f"recompiled: {cnt.frame_count} frames"
    expl = torch._dynamo.explain(fn)(q, k, v, s, S0)
    assert expl.graph_break_count == 0 and expl.graph_count == 1


# -- bad input -------------------------------------------------------------------------------------

def _ok(T=10, B=2, H=3, Dk=4, Dv=5):
    return torch.randn(B, H, T, Dk), torch.randn(B, H, T, Dk), torch.randn(B, H, T, Dv), torch.rand(H)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("case", ["rank", "k_shape", "v_shape", "s_shape", "s_negative", "int_dtype", "mixed_dtype",
                                  "state_shape", "state_int", "s_int", "not_tensor", "devices"])
def test_bad_input(form, case):
    q, k, v, s = _ok()
    kw = {}
    exc = ValueError
    if case == "rank":
        q = q[0]
    elif case == "k_shape":
        k = k[:, :, :5]
    elif case == "v_shape":
        v = v[:, :2]
    elif case == "s_shape":
        s = torch.rand(2)
    elif case == "s_negative":
        s = -s
    elif case == "int_dtype":
        q, exc = q.long(), TypeError
    elif case == "mixed_dtype":
        k, exc = k.double(), TypeError
    elif case == "state_shape":
        kw["initial_state"] = torch.zeros(2, 3, 5, 4)
    elif case == "state_int":
        kw["initial_state"], exc = torch.zeros(2, 3, 4, 5, dtype=torch.long), TypeError
    elif case == "s_int":
        s, exc = torch.ones(3, dtype=torch.long), TypeError
    elif case == "not_tensor":
        v, exc = v.tolist(), TypeError
    elif case == "devices":
        s = s.to("meta")
    with pytest.raises(exc) as e:
        FORMS[form](q, k, v, s, **kw)
    msg = str(e.value)
    assert "lightning_attn" in msg and "`" in msg, msg


def test_bad_block_size():
    q, k, v, s = _ok()
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="block_size"):
            lightning_attn(q, k, v, s, block_size=bad)


def test_zero_length_with_state_through_the_op():
    # review: T = 0 with an fp32 initial state returned the input tensor itself, which torch.library
    # rejects ("output ... may not alias any inputs"); the final state must be a copy, the gradient too
    from tnllm.ops import lightning_attn as op
    q = torch.randn(2, 3, 0, 4, requires_grad=True)
    v = torch.randn(2, 3, 0, 5, requires_grad=True)
    S0 = torch.randn(2, 3, 4, 5, requires_grad=True)
    o, S = op(q, q, v, torch.rand(3), initial_state=S0, output_final_state=True)
    assert o.shape == (2, 3, 0, 5) and S.data_ptr() != S0.data_ptr()
    torch.testing.assert_close(S, S0.detach(), rtol=0, atol=0)
    (S * 3).sum().backward()
    torch.testing.assert_close(S0.grad, torch.full_like(S0, 3.0), rtol=0, atol=0)
