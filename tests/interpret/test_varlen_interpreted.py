"""The packed variable-length Triton sweeps on CPU under TRITON_INTERPRET=1 (fp32/fp16), run in a child
process by tests/ops/test_triton.py.

The launchers, wrapped as a form with lightning_attn_varlen's signature, go through tnllm.testing against
one fp64 oracle call per sequence (outputs, final states, all gradients), with NaN-poisoned allocations
so that an element never written fails: empty and one-token sequences, chunk and tile edges, wide heads
cut into launches, strided layouts, rates 0 and inf, both launch orders, and the non-finite masking
modes (a NaN stays in its own sequence, causally).
"""
import functools
import math
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 (run through tests/ops/test_triton.py)", allow_module_level=True)
pytest.importorskip("triton")

import tnllm.testing as tt  # noqa: E402
from tnllm.ops.lightning_attn import triton as tri  # noqa: E402
from tnllm.ops.lightning_attn import varlen as la_varlen  # noqa: E402

SMALL = tri.SweepConfig(BC=16, CHUNK=16)        # short chunks: short sequences still cross chunk edges


class _VarlenFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, s, cu, S0, cfg, order):
        with tt.poisoned_allocations():
            o, S = tri.lightning_attn_varlen_fwd_triton(q, k, v, s, cu, S0, cfg=cfg, order=order)
        ctx.save_for_backward(q, k, v, s, cu, S0)
        ctx.cfg, ctx.order = cfg, order
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        q, k, v, s, cu, S0 = ctx.saved_tensors
        cfgs = None if ctx.cfg is None else {n: ctx.cfg for n in ("dq", "dk", "dv")}
        with tt.poisoned_allocations():
            dq, dk, dv, dS0 = tri.lightning_attn_varlen_bwd_triton(do.contiguous(), dS, q, k, v, s, cu, S0,
                                                                   cfgs=cfgs, order=ctx.order)
        for x in (dq, dk, dv, dS0):
            assert x.is_contiguous()
        return dq, dk, dv, None, None, (dS0 if S0 is not None else None), None, None


def triton_varlen(q, k, v, s, cu_seqlens, initial_state=None, output_final_state=False, cfg=SMALL, order=None):
    """The packed Triton launchers as a form with lightning_attn_varlen's signature."""
    S0 = initial_state.float() if initial_state is not None else None
    o, S = _VarlenFn.apply(q, k, v, s, cu_seqlens, S0, cfg, order)
    return (o, S) if output_final_state else o


def check(lengths, H, Dk, Dv, dtype=torch.float32, state=True, rates=None, layout="contiguous", seed=0, **kw):
    rates = rates or tuple(0.1 + 0.8 * h for h in range(H))
    case = tt.VarlenCase(H=H, lengths=tuple(lengths), Dk=Dk, Dv=Dv, dtype=dtype, layout=layout, rates=rates,
                         state=state, seed=seed)
    tt.check_varlen_case(functools.partial(triton_varlen, **kw), case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("state", [False, True], ids=["nostate", "state"])
def test_edges_and_empty_sequences(dtype, state):
    check([0, 1, 15, 16, 17, 0, 33, 2], 2, 16, 24, dtype, state, seed=3)


def test_default_tiles_long_and_short():
    check([130, 1, 64, 0, 65], 2, 32, 16, state=True, cfg=None, seed=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32-cut", "fp16-one-launch"])
@pytest.mark.parametrize("Dk,Dv", [(136, 24), (24, 136)], ids=str)
def test_wide_heads(Dk, Dv, dtype):
    """Dk or Dv over 128: fp32 cut into launches of <= 128, 16 bits in one launch (WIDE_ONE_LAUNCH)."""
    check([20, 0, 35], 1, Dk, Dv, dtype, state=True, seed=Dk)


def test_layouts_and_extreme_rates():
    check([9, 40, 0, 18], 2, 16, 16, state=True, layout="bthd", rates=(0.0, math.inf), seed=5)
    check([25, 3], 2, 16, 8, torch.float16, state=True, layout="padded", rates=(1e4, 1e-6), seed=6)


def test_launch_order_does_not_change_the_result():
    """Programs in the given order or longest first (the default) write the same bits."""
    case = tt.VarlenCase(H=2, lengths=(5, 40, 0, 17), Dk=16, Dv=16, rates=(0.2, 0.9), seed=7)
    ins = tt.make_varlen_inputs(case)
    ident = torch.arange(case.N, dtype=torch.int32)
    a = tt.evaluate_varlen(functools.partial(triton_varlen, order=ident), *ins)
    b = tt.evaluate_varlen(triton_varlen, *ins)
    assert tri.launch_order(ins[4]).tolist() == [1, 3, 0, 2]
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_property():
    tt.assert_varlen_agrees(triton_varlen, dtypes=(torch.float32, torch.float16), max_examples=4, max_len=50,
                            max_N=4, dims=(8, 16, 24, 40))


@pytest.mark.parametrize("nf", [1, 2], ids=["masked", "flagged"])
def test_nonfinite_stays_in_its_sequence(nf):
    tt.assert_varlen_isolated(functools.partial(triton_varlen, cfg=tri.SweepConfig(BC=16, CHUNK=16, nonfinite=nf)),
                              max_examples=3, max_len=40, max_N=3, dims=(8, 16))


def test_cuda_registration_glue():
    """The functions registered for CUDA on the varlen ops, run here through the interpreter on CPU tensors,
    and the blocked fallback they take for fp64."""
    case = tt.VarlenCase(H=2, lengths=(30, 0, 12), Dk=16, Dv=16, rates=(0.3, 0.9), seed=2)
    q, k, v, s, cu, S0, do, dS = tt.make_varlen_inputs(case)
    ref = tt.varlen_oracle(q, k, v, s, cu, S0, do, dS)
    d = lambda x: x.detach()  # noqa: E731
    o, S = la_varlen._varlen_fwd_cuda(d(q), d(k), d(v), s, cu, d(S0), 64)
    dq, dk, dv, dS0 = la_varlen._varlen_bwd_cuda(do.float(), dS.float(), d(q), d(k), d(v), s, cu, d(S0), 64)
    for name, a in zip(("o", "S", "dq", "dk", "dv", "dS0"), (o, S, dq, dk, dv, dS0)):
        assert tt.rel_err(a, ref[name]) <= tt.TOL[torch.float32], name
    q64, k64, v64 = (d(x).double() for x in (q, k, v))
    o64, S64 = la_varlen._varlen_fwd_cuda(q64, k64, v64, s, cu, d(S0).double(), 64)
    assert o64.dtype == torch.float64 and tt.rel_err(o64, ref["o"]) <= tt.TOL[torch.float64]
