"""tnllm.testing as a product: it passes correct kernels, catches wrong ones (values, gradients, edge
semantics), checks foreign-layout kernels through an adapter, and drives `tnllm check`."""
import dataclasses
import math

import pytest
import torch

import tnllm.testing as tt
from tnllm.cli import main
from tnllm.ops import lightning_attn, lightning_attn_recurrent


# -- a "foreign" kernel in fla's convention: [B, T, H, K], per-head log decay g_gamma, explicit scale
def bthk_kernel(q, k, v, g_gamma, scale=None, initial_state=None, output_final_state=False):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    o, S = lightning_attn_recurrent(t(q) * scale, t(k), t(v), -g_gamma, initial_state=initial_state,
                                    output_final_state=True)
    return t(o), (S if output_final_state else None)


def foreign_as_tnllm(q, k, v, s, initial_state=None, output_final_state=False):
    """The adapter of docs/ops.md, applied to the local [B, T, H, K] kernel."""
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    o, S = bthk_kernel(t(q), t(k), t(v), g_gamma=-s, scale=1.0, initial_state=initial_state, output_final_state=True)
    o = t(o)
    return (o, S) if output_final_state else o


def test_foreign_layout_kernel_through_an_adapter():
    tt.assert_forms_agree(foreign_as_tnllm, dtypes=(torch.float32, torch.float64), max_examples=10, max_T=90)
    tt.assert_edge_semantics(foreign_as_tnllm, max_examples=5, max_T=60, bad_rates=False)


# -- wrong kernels are caught
def no_state_decay(q, k, v, s, initial_state=None, output_final_state=False):
    """Wrong: the initial state is not decayed (lam^(t+1) q S0 becomes q S0)."""
    o, S = lightning_attn(q, k, v, s, output_final_state=True)
    if initial_state is not None:
        o = o + (q.to(initial_state.dtype) @ initial_state).to(o.dtype)
        S = S + torch.exp(-s.to(S.dtype) * q.shape[2])[:, None, None] * initial_state
    return (o, S) if output_final_state else o


class _NoGradK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k):
        return k.clone()

    @staticmethod
    def backward(ctx, g):
        return g * 0.5


def wrong_dk(q, k, v, s, initial_state=None, output_final_state=False):
    """Wrong only in the gradient of k."""
    return lightning_attn(q, _NoGradK.apply(k), v, s, initial_state=initial_state, output_final_state=output_final_state)


def leaky_mask(q, k, v, s, initial_state=None, output_final_state=False):
    """Right on finite inputs, but masks by multiplying with 0/1: a NaN at t leaks to every position."""
    T = q.shape[2]
    idx = torch.arange(T, dtype=torch.float64)
    diff = idx[:, None] - idx[None, :]
    sd = s.double()[:, None, None]
    D = torch.exp(-sd * diff.clamp(min=0)) * (diff >= 0)
    o = (((q.double() @ k.double().transpose(-1, -2)) * D) @ v.double())
    _, S = lightning_attn(q, k, v, s, initial_state=None, output_final_state=True)
    if initial_state is not None:
        raise NotImplementedError
    o = o.to(q.dtype)
    return (o, S) if output_final_state else o


@pytest.mark.parametrize("fn,what", [(no_state_decay, "o"), (wrong_dk, "dk")], ids=["state", "dk"])
def test_wrong_kernels_fail(fn, what):
    with pytest.raises(AssertionError, match=what):
        tt.assert_forms_agree(fn, max_examples=25, max_T=40, states=(True,))


def test_leaky_mask_fails_the_edge_contract():
    tt.assert_forms_agree(leaky_mask, dtypes=(torch.float64,), max_examples=5, max_T=40, states=(False,),
                          rates=("small", "medium"))
    with pytest.raises(AssertionError, match="reached `d?[oqkv]`"):
        tt.assert_nonfinite_causal(leaky_mask, max_examples=25, max_T=40, states=(False,), rates=("small", "medium"))


def test_rel_err():
    a = torch.tensor([1.0, 2.0])
    assert tt.rel_err(a, a) == 0.0
    assert tt.rel_err(a * 1.01, a) == pytest.approx(0.01)
    assert tt.rel_err(torch.tensor([1.0, math.nan]), a) == math.inf
    assert tt.rel_err(a[:1], a) == math.inf
    assert tt.rel_err(torch.zeros(3), torch.full((3,), 1e-300, dtype=torch.float64)) < 1e-200   # underflow is no error
    assert set(tt.TOL) == set(tt.DTYPES.values())


def test_cases_strategy_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rates"):
        tt.cases(rates=("tiny",))
    with pytest.raises(ValueError, match="layouts"):
        tt.cases(layouts=())
    with pytest.raises(ValueError, match="oracle"):
        tt.assert_forms_agree(lightning_attn, oracle="exact")


def test_layouts_are_what_they_say():
    for layout, contiguous in (("contiguous", True), ("bthd", False), ("padded", False)):
        q, k, v, s, S0, do, dS = tt.make_inputs(tt.Case(2, 3, 7, 4, 5, layout=layout, rates=(0.0, 1.0, math.inf)))
        assert q.shape == (2, 3, 7, 4) and v.shape == (2, 3, 7, 5) and q.is_contiguous() == contiguous
        assert q.is_leaf and q.requires_grad and s.tolist() == [0.0, 1.0, math.inf]
    assert tt.make_inputs(tt.Case(1, 1, 3, 2, 2, layout="bthd"))[0].stride() == (6, 2, 2, 1)


def test_poisoned_input_keeps_its_layout():
    """The edge check poisons a copy of an input in the input's own layout: a contiguous clone of a padded or
    transposed input made a BLAS call sum in another order, and the bit-exact comparison then failed a correct
    kernel (found by `tnllm check`: a NaN in v at t = 0, padded layout, Dk = 1, dk after t off by one ulp)."""
    for layout in tt.LAYOUTS:
        x = tt.make_inputs(tt.Case(2, 3, 9, 4, 5, layout=layout))[0]
        y = tt.copy_in_layout(x)
        assert (y.stride(), y.storage_offset(), y.dtype) == (x.stride(), x.storage_offset(), x.dtype)
        assert torch.equal(y, x) and y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        y[0, 0, 0, 0] = math.nan
        assert not math.isnan(x[0, 0, 0, 0].item())
    case = tt.Case(B=1, H=1, T=128, Dk=1, Dv=8, dtype=torch.float32, layout="padded", rates=(0.0,), seed=0)
    tt.check_nonfinite_causal(lightning_attn, case, "v", (0, 0, 0, 0), math.nan)


def test_cli_check_passes_and_fails(capsys):
    assert main(["check", "--examples", "4", "--dtype", "fp32", "--max-T", "40"]) == 0
    out = capsys.readouterr().out
    assert "fp32" in out and "edges" in out and "pass" in out and "FAIL" not in out
    assert main(["check", "--examples", "10", "--dtype", "fp64", "--max-T", "40", "--no-edges",
                 "--op", "test_testing:no_state_decay"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "failed: Case(" in out
    assert main(["check", "--op", "no_such_module:fn"]) == 2
    assert "cannot import" in capsys.readouterr().err


def test_ill_conditioned_low_precision_case_passes_and_a_wrong_kernel_does_not():
    """T = 1: dq is one dot product (do . v) times k, and here it cancels: the exact op in bf16 has dq
    relative error 7e-2 (above TOL) only from rounding the output gradient, and the fp64 oracle moves 0.14
    under a unit-roundoff perturbation: check_case accepts it. A kernel off by 5% fails the same case, and
    fails a well-conditioned one, where the allowance is ~1e-2."""
    import torch
    from tnllm.ops import lightning_attn
    bad_case = tt.Case(B=1, H=1, T=1, Dk=16, Dv=16, dtype=torch.bfloat16, device="cpu", layout="padded",
                       rates=(0.0,), state=False, seed=0)
    errs = tt.case_errors(lightning_attn, bad_case)
    assert errs["dq"] > tt.TOL[torch.bfloat16]                     # the raw error is above the table
    tt.check_case(lightning_attn, bad_case)

    def off(q, k, v, s, initial_state=None, output_final_state=False):
        o, S = lightning_attn(q * 1.05, k, v, s, initial_state=initial_state, output_final_state=True)
        return (o, S) if output_final_state else o
    good_case = tt.Case(B=2, H=3, T=100, Dk=64, Dv=64, dtype=torch.bfloat16, device="cpu", layout="contiguous",
                        rates=(0.1, 0.5, 1.0), state=True, seed=3)
    for case in (bad_case, good_case):
        with pytest.raises(AssertionError, match="disagrees"):
            tt.check_case(off, case)
    cond = tt.perturbation_errors(good_case)
    assert all(tt.COND_FACTOR * e < tt.TOL[torch.bfloat16] for e in cond.values()), cond
    with pytest.raises(ValueError, match="fp16 / bf16"):
        tt.perturbation_errors(dataclasses.replace(good_case, dtype=torch.float32))
