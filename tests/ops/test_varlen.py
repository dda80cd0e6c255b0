"""lightning_attn_varlen (the tnllm::lightning_attn_varlen_* ops, CPU kernel): packed sequences equal an
independent block-diagonal quadratic form (fp64) and one call per sequence (tnllm.testing), outputs, final
states and every gradient; nothing crosses a boundary; opcheck and torch.compile; bad input is a clear error."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tnllm.testing as tt
from tnllm.ops import lightning_attn_varlen


def reference(q, k, v, s, cu, S0=None):
    """Written out from the definition: position t of sequence i sees positions c_i..t of its own sequence only."""
    T = q.shape[2]
    seg = torch.zeros(T, dtype=torch.long)
    for i in range(len(cu) - 1):
        seg[cu[i]:cu[i + 1]] = i
    t = torch.arange(T, dtype=torch.float64)
    diff = t[:, None] - t[None, :]
    same = (seg[:, None] == seg[None, :]) & (diff >= 0)
    lam = torch.exp(-s.double())                                          # [H]
    D = torch.where(same, lam[:, None, None] ** diff.clamp(min=0), torch.zeros((), dtype=torch.float64))
    o = ((q @ k.transpose(-1, -2)) * D) @ v
    finals = []
    for i in range(len(cu) - 1):
        a, b = cu[i], cu[i + 1]
        w = lam[:, None] ** (b - 1 - t[a:b])                              # [H, L]
        Si = torch.einsum("bhtk,ht,bhtv->bhkv", k[:, :, a:b], w, v[:, :, a:b])
        if S0 is not None:
            j = t[a:b] - a
            o[:, :, a:b] = o[:, :, a:b] + (lam[:, None] ** (j + 1))[..., None] * (q[:, :, a:b] @ S0[i:i + 1])
            Si = Si + lam[:, None, None] ** (b - a) * S0[i:i + 1]
        finals.append(Si)
    return o, torch.cat(finals)


@given(H=st.integers(1, 3), lengths=st.lists(st.integers(0, 70), min_size=1, max_size=5),
       Dk=st.sampled_from([1, 4, 16]), Dv=st.sampled_from([1, 8, 16]), state=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_packed_equals_the_block_diagonal_form(H, lengths, Dk, Dv, state, seed):
    g = torch.Generator().manual_seed(seed)
    T, N = sum(lengths), len(lengths)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    q, k, v = r(1, H, T, Dk), r(1, H, T, Dk), r(1, H, T, Dv)
    s = torch.rand(H, generator=g, dtype=torch.float64) * 2
    S0 = r(N, H, Dk, Dv) if state else None
    o, S = lightning_attn_varlen(q, k, v, s, torch.tensor(cu), initial_state=S0, output_final_state=True, block_size=16)
    ro, rS = reference(q, k, v, s, cu, S0)
    torch.testing.assert_close(o, ro, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(S, rS, rtol=1e-9, atol=1e-9)
    do, dS = torch.randn_like(o), torch.randn_like(S)
    ins = [q, k, v] + ([S0] if state else [])
    got = torch.autograd.grad((o * do).sum() + (S * dS).sum(), ins)
    want = torch.autograd.grad((ro * do).sum() + (rS * dS).sum(), ins)
    for name, a, b in zip(("dq", "dk", "dv", "dS0"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def test_no_token_crosses_a_boundary():
    """A NaN in the second sequence leaves the first sequence's outputs and final state untouched, and the
    first sequence's tokens do not reach the second (its output equals a call on it alone)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 30, 8) for _ in range(3))
    s = torch.tensor([0.1, 0.0])
    cu = torch.tensor([0, 12, 30])
    o, S = lightning_attn_varlen(q, k, v, s, cu, output_final_state=True)
    v2 = v.clone()
    v2[:, :, 20] = math.nan
    o2, S2 = lightning_attn_varlen(q, k, v2, s, cu, output_final_state=True)
    assert torch.equal(o2[:, :, :20], o[:, :, :20]) and torch.equal(S2[0], S[0])
    alone = lightning_attn_varlen(q[:, :, 12:], k[:, :, 12:], v[:, :, 12:], s, torch.tensor([0, 18]))
    torch.testing.assert_close(o[:, :, 12:], alone)


@pytest.mark.parametrize("cu,err,match", [
    ([0, 5, 3, 10], ValueError, "non-decreasing"),
    ([1, 10], ValueError, "start at 0"),
    ([0, 9], ValueError, "end at the packed length"),
    ([0], ValueError, "N \\+ 1 >= 2"),
])
def test_bad_boundaries_name_the_argument(cu, err, match):
    q = torch.randn(1, 2, 10, 4)
    with pytest.raises(err, match=match):
        lightning_attn_varlen(q, q, q, torch.ones(2), torch.tensor(cu))


def test_bad_inputs_name_the_argument():
    q = torch.randn(1, 2, 10, 4)
    with pytest.raises(TypeError, match="`cu_seqlens` must be a 1-D integer tensor"):
        lightning_attn_varlen(q, q, q, torch.ones(2), torch.tensor([0.0, 10.0]))
    with pytest.raises(TypeError, match="`cu_seqlens` must be a 1-D integer tensor"):
        lightning_attn_varlen(q, q, q, torch.ones(2), torch.tensor([[0, 10]]))
    with pytest.raises(ValueError, match="batch 1"):
        q2 = torch.randn(2, 2, 10, 4)
        lightning_attn_varlen(q2, q2, q2, torch.ones(2), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="`initial_state` must be a floating tensor of shape \\[N, H, Dk, Dv\\] "
                                         "= \\(2, 2, 4, 4\\) with N = 2"):
        lightning_attn_varlen(q, q, q, torch.ones(2), torch.tensor([0, 4, 10]), initial_state=torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="`initial_state`"):
        lightning_attn_varlen(q, q, q, torch.ones(2), torch.tensor([0, 10]), initial_state=torch.zeros(1, 2, 4, 4,
                                                                                                      dtype=torch.long))
    with pytest.raises(ValueError, match="decay rate"):
        lightning_attn_varlen(q, q, q, -torch.ones(2), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="`cu_seqlens` must be on q's device cpu"):
        lightning_attn_varlen(q, q, q, torch.ones(2), torch.tensor([0, 10], device="meta"))
    with pytest.raises(ValueError, match="block_size"):
        lightning_attn_varlen(q, q, q, torch.ones(2), torch.tensor([0, 10]), block_size=0)


def test_boundary_check_can_be_skipped_and_narrow_ints_are_widened():
    q = torch.randn(1, 2, 10, 4)
    cu8 = torch.tensor([0, 3, 10], dtype=torch.uint8)
    torch.testing.assert_close(lightning_attn_varlen(q, q, q, torch.ones(2), cu8),
                               lightning_attn_varlen(q, q, q, torch.ones(2), cu8.long()), rtol=0, atol=0)
    # the CPU kernel reads the boundaries anyway, so skipping the up-front check still raises there
    with pytest.raises(ValueError, match="non-decreasing"):
        lightning_attn_varlen(q, q, q, torch.ones(2), torch.tensor([0, 7, 3, 10]), check_boundaries=False)


# ---- through tnllm.testing: one dense oracle call per sequence -------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp64", "fp32", "fp16", "bf16"])
def test_op_agrees_with_one_call_per_sequence(dtype):
    tt.assert_varlen_agrees(lightning_attn_varlen, dtypes=(dtype,), max_examples=12, max_len=140)


def test_a_nonfinite_input_stays_in_its_sequence():
    tt.assert_varlen_isolated(lightning_attn_varlen, dtypes=(torch.float32,), max_examples=12, max_len=90)


def test_harness_catches_a_kernel_that_crosses_boundaries():
    """The per-sequence oracle fails a kernel that runs the packed row as one sequence (state carried over)."""
    from tnllm.ops import lightning_attn

    def leaky(q, k, v, s, cu_seqlens, initial_state=None, output_final_state=False):
        S0 = None if initial_state is None else initial_state[:1]
        o, S = lightning_attn(q, k, v, s, initial_state=S0, output_final_state=True)
        N = cu_seqlens.numel() - 1
        return (o, S.expand(N, *S.shape[1:])) if output_final_state else o

    case = tt.VarlenCase(H=2, lengths=(20, 30), Dk=8, Dv=8, rates=(0.01, 0.1), state=False, seed=0)
    with pytest.raises(AssertionError, match="sequence 1"):
        tt.check_varlen_case(leaky, case)
    tt.check_varlen_case(lightning_attn_varlen, case)


def test_empty_and_all_empty_sequences():
    case = tt.VarlenCase(H=2, lengths=(0, 0, 5, 0), Dk=4, Dv=3, rates=(0.3, math.inf), state=True, seed=1)
    tt.check_varlen_case(lightning_attn_varlen, case)
    q = torch.randn(1, 2, 0, 4)
    S0 = torch.randn(3, 2, 4, 4)
    o, S = lightning_attn_varlen(q, q, q, torch.ones(2), torch.tensor([0, 0, 0, 0]), initial_state=S0,
                                 output_final_state=True)
    assert o.shape == (1, 2, 0, 4) and torch.equal(S, S0)


# ---- registration ---------------------------------------------------------------------------------------------

def test_opcheck_both_ops():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 37, d, dtype=torch.float64, requires_grad=True) for d in (8, 8, 6))
    s = torch.tensor([0.2, 1.0], dtype=torch.float64)
    cu = torch.tensor([0, 10, 10, 37], dtype=torch.int32)
    S0 = torch.randn(3, 2, 8, 6, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.tnllm.lightning_attn_varlen_fwd.default, (q, k, v, s, cu, S0, 16))
    torch.library.opcheck(torch.ops.tnllm.lightning_attn_varlen_fwd.default, (q, k, v, s, cu, None, 16))
    do, dS = torch.randn(1, 2, 37, 6, dtype=torch.float64), torch.randn(3, 2, 8, 6, dtype=torch.float64)
    torch.library.opcheck(torch.ops.tnllm.lightning_attn_varlen_bwd.default,
                          (do, dS, q.detach(), k.detach(), v.detach(), s, cu, S0.detach(), 16))
    torch.library.opcheck(torch.ops.tnllm.lightning_attn_varlen_bwd.default,
                          (do, None, q.detach(), k.detach(), v.detach(), s, cu, None, 16))


def test_gradcheck_fp64():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 9, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    S0 = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.3, 0.0], dtype=torch.float64)
    cu = torch.tensor([0, 4, 4, 9])
    f = lambda q, k, v, S0: lightning_attn_varlen(q, k, v, s, cu, S0, True, block_size=2)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v, S0))


def test_compile_fullgraph_no_recompile_across_lengths():
    """A caller compiles with fullgraph (no graph break) and dynamic shapes: new lengths and a new number of
    sequences run without a recompile; values and gradients equal eager. aot_eager here (fake kernels, autograd
    and the dynamic shapes, in seconds); tests/gpu/test_varlen_gpu.py compiles with inductor."""
    import torch._dynamo.testing

    s = torch.tensor([0.1, 0.7])

    def f(q, k, v, cu, S0):
        o, S = lightning_attn_varlen(q * 1.5, k, v, s, cu, initial_state=S0, output_final_state=True)
        return o.sin().sum() + S.square().sum()

    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    cf = torch.compile(f, fullgraph=True, dynamic=True, backend=cnt)
    for lengths in ([5, 0, 40], [17, 3, 1, 60, 2]):
        torch.manual_seed(len(lengths))
        T, N = sum(lengths), len(lengths)
        q, k, v = (torch.randn(1, 2, T, 8, requires_grad=True) for _ in range(3))
        S0 = torch.randn(N, 2, 8, 8, requires_grad=True)
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        a = f(q, k, v, cu, S0)
        ga = torch.autograd.grad(a, [q, k, v, S0])
        b = cf(q, k, v, cu, S0)
        gb = torch.autograd.grad(b, [q, k, v, S0])
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        for x, y in zip(gb, ga):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert cnt.frame_count == 1
    with pytest.raises(ValueError, match="`cu_seqlens`"):       # the CPU kernel checks the values when it runs
        cf(q, k, v, torch.tensor([0, 1, 2, 3, 4, T + 1], dtype=torch.int32), S0)
