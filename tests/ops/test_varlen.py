"""lightning_attn_varlen: packed sequences equal an independent block-diagonal quadratic form (fp64), outputs,
final states and every gradient; boundaries are never crossed; bad boundaries are clear errors."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

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
    with pytest.raises(ValueError, match="batch 1"):
        q2 = torch.randn(2, 2, 10, 4)
        lightning_attn_varlen(q2, q2, q2, torch.ones(2), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="`initial_state` must have shape \\[N, H, Dk, Dv\\] with N = 2"):
        lightning_attn_varlen(q, q, q, torch.ones(2), torch.tensor([0, 4, 10]), initial_state=torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="decay rate"):
        lightning_attn_varlen(q, q, q, -torch.ones(2), torch.tensor([0, 10]))
