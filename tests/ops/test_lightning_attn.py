"""Lightning Attention: every form agrees with the fp64 oracles (outputs, final states, gradients)
and holds the edge contract, through the one harness tnllm.testing."""
import functools
import math

import pytest
import torch
import tnllm.testing as tt
from tnllm.ops import lightning_attn, lightning_attn_blocked, lightning_attn_naive, lightning_attn_recurrent
from tnllm.ops.lightning_attn import _common

FORMS = {
    "op": lightning_attn,
    "blocked": lightning_attn_blocked,
    "recurrent": lightning_attn_recurrent,
    "naive": lightning_attn_naive,
}


def make(B, H, T, Dk, Dv, dtype, seed, state=True, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    rates = tuple(float(x) for x in torch.rand(H, generator=g) * 3)
    return tt.make_inputs(tt.Case(B, H, T, Dk, Dv, dtype, layout=layout, rates=rates, state=state, seed=seed))


@pytest.mark.parametrize("block", [16, 32, 64, 128])
def test_blocked_matches_naive_fp64(block):
    tt.assert_forms_agree(functools.partial(lightning_attn_blocked, block_size=block), dtypes=(torch.float64,),
                          max_examples=8, max_T=300)


def test_op_matches_naive():
    tt.assert_forms_agree(lightning_attn, dtypes=(torch.float32, torch.float64), max_T=200, max_examples=20)


def test_recurrent_matches_naive():
    tt.assert_forms_agree(lightning_attn_recurrent, dtypes=(torch.float64,), max_T=80, max_examples=15)


def test_naive_matches_fp64_loop():
    tt.assert_forms_agree(lightning_attn_naive, dtypes=(torch.float64,), oracle="loop", max_T=80, max_examples=15)


def test_low_precision_dtypes_and_layouts():
    tt.assert_forms_agree(lightning_attn, dtypes=(torch.float16, torch.bfloat16), max_T=130, max_examples=20)


@pytest.mark.parametrize("T", [1, 63, 64, 65, 127, 128, 129, 257], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("form", ["op", "recurrent"])
def test_block_edges(form, T):
    tt.check_case(FORMS[form], tt.Case(2, 2, T, 16, 8, torch.float64, rates=(0.3, math.inf), seed=T))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", tt.LAYOUTS)
@pytest.mark.parametrize("Dk,Dv", [(16, 16), (32, 8), (8, 24)], ids=lambda d: str(d))
def test_op_dtypes(dtype, layout, Dk, Dv):
    tt.check_case(lightning_attn, tt.Case(2, 3, 100, Dk, Dv, dtype, layout=layout, rates=(0.0, 0.5, 20.0), seed=7))


# -- edge semantics ----------------------------------------------------------------------------

@pytest.mark.parametrize("form", list(FORMS))
def test_edge_semantics(form):
    """A NaN/inf in q, k or v at t never reaches o or dq before t, nor dk, dv after t (bit-identical to
    the clean run); s = inf is lambda = 0; a NaN or negative s raises."""
    tt.assert_edge_semantics(FORMS[form], dtypes=(torch.float32, torch.float64), max_examples=15)


def test_edge_semantics_blocked_small_blocks():
    tt.assert_nonfinite_causal(functools.partial(lightning_attn_blocked, block_size=16), dtypes=(torch.bfloat16,),
                               max_examples=10)


def test_nothing_overflows_for_any_rate():
    """Every decay is lam^m with m >= 0: finite for any length and rate (0, tiny, huge, inf)."""
    B, H, T, D = 1, 4, 3000, 4
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    s = torch.tensor([0.0, 1e-6, 1e30, math.inf])
    S0 = torch.randn(B, H, D, D)
    outs = {n: f(q, k, v, s, initial_state=S0, output_final_state=True) for n, f in FORMS.items() if n != "naive"}
    for n, (o, S) in outs.items():
        assert torch.isfinite(o).all() and torch.isfinite(S).all(), n
    for n in ("op", "blocked"):
        assert tt.rel_err(outs[n][0], outs["recurrent"][0]) < 1e-4 and tt.rel_err(outs[n][1], outs["recurrent"][1]) < 1e-4


def test_bad_rates_raise_in_every_form():
    q = torch.randn(1, 2, 5, 4)
    for form, fn in FORMS.items():
        for bad in ([math.nan, 0.5], [0.5, -1e-3], [-math.inf, 0.0]):
            with pytest.raises(ValueError, match="`s`"):
                fn(q, q, q, torch.tensor(bad))


# -- the memoised decay check (no host read on a cached call) ----------------------------------

def test_decay_check_is_memoised_and_rechecked_after_in_place_change(monkeypatch):
    calls = []
    real = _common._decay_values_ok
    monkeypatch.setattr(_common, "_decay_values_ok", lambda s: calls.append(1) or real(s))
    q = torch.randn(1, 2, 8, 4)
    s = torch.tensor([0.1, 0.2])
    for _ in range(5):
        lightning_attn(q, q, q, s)
    assert len(calls) == 1                     # the host read once, then the memo
    s.fill_(-1)                                # in place: the version counter moves, so the check runs again
    with pytest.raises(ValueError, match="`s`"):
        lightning_attn(q, q, q, s)
    assert len(calls) == 2
    s.fill_(0.5)
    lightning_attn(q, q, q, s)
    lightning_attn(q, q, q, s)
    assert len(calls) == 3
    s[1:].fill_(math.nan)                      # through a view: same counter
    with pytest.raises(ValueError, match="NaN"):
        lightning_attn(q, q, q, s)
    t = s.clone().fill_(0.3)                   # a new tensor: its own check
    lightning_attn(q, q, q, t)
    assert len(calls) == 5
    lightning_attn(q, q, q, torch.tensor([-1.0, 0.0]), check_decay=False)   # off: no check at all
    assert len(calls) == 5
    with torch.inference_mode():               # inference tensors have no version counter: checked every call
        u = torch.tensor([0.1, 0.2])
        lightning_attn(q, q, q, u)
        lightning_attn(q, q, q, u)
    assert len(calls) == 7


def test_decay_check_under_compile_is_device_side():
    """Compiled, the check is an assertion inside the graph (no host read at trace time, no graph break)."""
    torch._dynamo.reset()
    fn = torch.compile(lambda q, s: lightning_attn(q, q, q, s), fullgraph=True)
    q = torch.randn(1, 2, 8, 4)
    good = torch.tensor([0.1, 0.2])
    torch.testing.assert_close(fn(q, good), lightning_attn(q, q, q, good))
    with pytest.raises(Exception, match="decay rate"):
        fn(q, torch.tensor([0.1, -1.0]))


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


@pytest.mark.parametrize("form", ["naive", "recurrent"])
def test_gradgradcheck_reference_forms(form):
    """The reference forms are plain autograd, so second derivatives exist and are checked."""
    q, k, v, s, S0, _, _ = make(1, 2, 9, 3, 2, torch.float64, 5)
    fn = lambda q, k, v, S0: FORMS[form](q, k, v, s, initial_state=S0, output_final_state=True)
    assert torch.autograd.gradgradcheck(fn, (q, k, v, S0))


def test_op_double_backward_is_a_clear_error():
    """The op's backward is itself a custom op without a derivative: a second backward says so."""
    q, k, v, s, S0, _, _ = make(1, 2, 9, 3, 2, torch.float64, 5)
    (g,) = torch.autograd.grad(lightning_attn(q, k, v, s).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="lightning_attn_bwd"):
        torch.autograd.grad(g.sum(), q)


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


@pytest.mark.parametrize("layout", tt.LAYOUTS)
@pytest.mark.parametrize("B,H,T", [(2, 3, 17), (1, 1, 9), (2, 4, 1), (1, 2, 0)], ids=str)
def test_backward_gradient_layout_real_equals_fake(layout, B, H, T):
    """dq, dk, dv come out dense in the order of heads and positions of q, k, v (token-major for the model's
    [B, T, H, D] head slices, so their gradient flows into the projection without a transposing copy), and the
    fake kernel that inductor plans with gives exactly the real strides, for every layout and edge shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    q, k, v, s, _, do, _ = make(B, H, T, 8, 4, torch.float32, 7, state=False, layout=layout)
    args = (do.float().contiguous(), None, q.detach(), k.detach(), v.detach(), s, None, 16)
    real = torch.ops.tnllm.lightning_attn_bwd(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = torch.ops.tnllm.lightning_attn_bwd(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                    for a in args))
    for r, f, x in zip(real[:3], fake[:3], (q, k, v)):
        assert r.shape == x.shape and r.stride() == f.stride(), (layout, r.stride(), f.stride())
        assert r.stride() == _common.empty_grad(x).stride()
        assert _common.token_major(r) == _common.token_major(x)
    if layout == "bthd" and H > 1 and T > 1:
        assert _common.token_major(real[0])          # the model's layout: gradients token-major too
