"""tnllm.ops.gla_decode: the fused decode step of the token mixer after qkvu_proj.

* The reference form equals the model's current token-mixer step bit for bit (out_proj(y) and the
  new state), on LRPE and plain layers, fp32 / bf16 / fp64, int and per-row tensor positions.
* The custom ops on CPU: in place vs functional, opcheck, torch.compile(fullgraph=True) with no
  recompile across batch sizes, every bad input named.
* The Triton kernel under TRITON_INTERPRET=1: ``tests/interpret`` (run in a child process by tests/ops/test_triton.py).
"""
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tnllm import TransNormerConfig, TransNormerLLM
from tnllm.ops.gla_decode import gla_decode_naive, gla_decode_step

TESTS = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("act", ["silu", "relu", "none"])
def test_reference_equals_the_model_step(dtype, act):
    torch.manual_seed(0)
    cfg = TransNormerConfig.from_preset("tiny", linear_act_fun=act)
    model = TransNormerLLM(cfg).to(dtype)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    B = 3
    for layer in model.model.layers:           # layer 0 has LRPE, layer 1 not
        tm = layer.token_mixer
        x = torch.randn(B, 1, cfg.decoder_embed_dim, dtype=dtype)
        S = torch.randn(B, tm.num_heads, tm.key_dim, tm.head_dim, dtype=sdt)
        for offset in (7, torch.tensor([0, 5, 100000])):
            with torch.no_grad():
                a, S_model = tm.step(x, S, offset)
                pos = offset if isinstance(offset, torch.Tensor) else torch.full((B,), offset)
                theta = tm.lrpe.theta if tm.lrpe is not None else None
                y, S_ref = gla_decode_naive(tm.qkvu_proj(x[:, 0]), S, tm.s, theta, pos, act)
                assert torch.equal(tm.out_proj(y), a[:, 0])
                assert torch.equal(S_ref, S_model)
                y2, S2 = gla_decode_step(tm.qkvu_proj(x[:, 0]), S, tm.s, theta, pos, act)
                assert torch.equal(y2, y) and torch.equal(S2, S_ref)


def _inputs(B, H, e, lrpe, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    qkvu = torch.randn(B, 4 * H * e, generator=g).to(dtype)
    S = torch.randn(B, H, 2 * e if lrpe else e, e, generator=g)
    s = torch.rand(H, generator=g) * 2
    theta = torch.rand(H, 1, e, generator=g) if lrpe else None
    pos = torch.randint(0, 100001, (B,), generator=g)
    return qkvu, S, s, theta, pos


@given(B=st.integers(1, 5), H=st.integers(1, 4), e=st.sampled_from([16, 32, 64]), lrpe=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_inplace_equals_functional(B, H, e, lrpe, seed):
    qkvu, S, s, theta, pos = _inputs(B, H, e, lrpe, seed)
    S0 = S.clone()
    y_f, S_f = gla_decode_step(qkvu, S, s, theta, pos, "silu")
    assert torch.equal(S, S0), "the functional form modified the state"
    y_i, S_i = gla_decode_step(qkvu, S, s, theta, pos, "silu", inplace=True)
    assert S_i is S and torch.equal(S, S_f) and torch.equal(y_i, y_f)
    assert y_f.is_contiguous() and S_f.is_contiguous() and y_f.shape == (B, H * e)


@pytest.mark.parametrize("lrpe", [False, True], ids=["nolrpe", "lrpe"])
def test_opcheck(lrpe):
    qkvu, S, s, theta, pos = _inputs(2, 2, 16, lrpe, 1)
    if not lrpe:
        pos = None
    for op in (torch.ops.tnllm.gla_decode_step.default, torch.ops.tnllm.gla_decode_step_functional.default):
        torch.library.opcheck(op, (qkvu, S.clone(), s, theta, pos, "silu"))


def test_compile_fullgraph():
    """inductor (static shapes, as CudaGraphDecoder compiles) with the in-place op between pointwise
    neighbours: one graph, the state buffer updated in place; then the functional op traced with
    dynamic batch (aot_eager: the same fake kernels, no C++ build) with no recompile over batch sizes."""
    torch._dynamo.reset()

    def f(x, S, s, theta, pos):
        y, _ = gla_decode_step(x * 2, S, s, theta, pos, "silu", inplace=True)
        return y + 1

    def g(x, S, s, theta, pos):
        y, S2 = gla_decode_step(x, S, s, theta, pos, "relu")
        return y, S2

    qkvu, S, s, theta, pos = _inputs(3, 2, 16, True, 3)
    ref_S, buf = S.clone(), S.clone()
    ref_y = f(qkvu, ref_S, s, theta, pos)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, dynamic=False)(qkvu, buf, s, theta, pos), ref_y)
    torch.testing.assert_close(buf, ref_S)
    expl = torch._dynamo.explain(f)(qkvu, S.clone(), s, theta, pos)
    assert expl.graph_break_count == 0 and expl.graph_count == 1

    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    cg = torch.compile(g, fullgraph=True, dynamic=True, backend="aot_eager")
    for B in (3, 4, 7):         # not B = H = 2: dynamo's duck sizing would give both one symbol
        qkvu, S, s, theta, pos = _inputs(B, 2, 16, True, B)
        y, S2 = cg(qkvu, S, s, theta, pos)
        y_ref, S_ref = g(qkvu, S, s, theta, pos)
        assert torch.equal(y, y_ref) and torch.equal(S2, S_ref)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_empty_batch():
    qkvu, S, s, theta, pos = _inputs(0, 2, 16, True, 0)
    y, S2 = gla_decode_step(qkvu, S, s, theta, pos)
    assert y.shape == (0, 32) and S2.shape == S.shape


def _bad_cases():
    qkvu, S, s, theta, pos = _inputs(2, 2, 16, True, 0)
    return {
        "qkvu rank": ((qkvu[:, None], S, s, theta, pos, "silu"), ValueError, "`qkvu` must have shape"),
        "qkvu width": ((qkvu[:, :-4], S, s, theta, pos, "silu"), ValueError, "`qkvu` must have shape"),
        "qkvu int": ((qkvu.long(), S, s, theta, pos, "silu"), TypeError, "`qkvu` must be fp16"),
        "state rank": ((qkvu, S[0], s, theta, pos, "silu"), ValueError, "`state` must have shape"),
        "state dtype": ((qkvu, S.half(), s, theta, pos, "silu"), TypeError, "`state` must be fp32"),
        "state Dk without lrpe": ((qkvu, S, s, None, None, "silu"), ValueError, "`state` must have Dk = e"),
        "state Dk with lrpe": ((qkvu, S[:, :, :16], s, theta, pos, "silu"), ValueError, "`state` must have Dk = 2e"),
        "s shape": ((qkvu, S, s[:1], theta, pos, "silu"), ValueError, "`s`"),
        "theta shape": ((qkvu, S, s, theta[:, 0], pos, "silu"), ValueError, "`theta`"),
        "pos missing": ((qkvu, S, s, theta, None, "silu"), ValueError, "`pos`"),
        "pos float": ((qkvu, S, s, theta, pos.float(), "silu"), ValueError, "`pos`"),
        "pos shape": ((qkvu, S, s, theta, pos[:1], "silu"), ValueError, "`pos`"),
        "act": ((qkvu, S, s, theta, pos, "gelu"), ValueError, "`act` must be one of"),
        "qkvu not a tensor": ((qkvu.tolist(), S, s, theta, pos, "silu"), TypeError, "`qkvu` must be a torch.Tensor"),
        "device": ((qkvu, S.to("meta"), s, theta, pos, "silu"), ValueError, "`state` is on meta"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_inputs_name_the_argument(case):
    args, exc, msg = _bad_cases()[case]
    with pytest.raises(exc, match=msg.replace("[", r"\[")):
        gla_decode_step(*args)
    with pytest.raises(exc, match=msg.replace("[", r"\[")):
        gla_decode_naive(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_norm_input_folds_the_token_norm(dtype):
    """qkvu projected from x itself with norm_input=x == the model's token_norm -> qkvu_proj -> step."""
    from tnllm.ops import srms_norm
    torch.manual_seed(1)
    model = TransNormerLLM(TransNormerConfig.from_preset("tiny")).to(dtype)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2}[dtype]
    B = 3
    for layer in model.model.layers:
        tm = layer.token_mixer
        x = torch.randn(B, cfg_d := 64, dtype=dtype) * 4
        S = torch.randn(B, tm.num_heads, tm.key_dim, tm.head_dim, dtype=sdt)
        pos = torch.tensor([0, 5, 100000])
        theta = tm.lrpe.theta if tm.lrpe is not None else None
        with torch.no_grad():
            y_ref, S_ref = gla_decode_naive(tm.qkvu_proj(srms_norm(x)), S, tm.s, theta, pos, "silu")
            y, S2 = gla_decode_step(tm.qkvu_proj(x), S, tm.s, theta, pos, "silu", norm_input=x)
        assert x.shape[1] == cfg_d
        torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
        torch.testing.assert_close(S2, S_ref, rtol=tol, atol=tol)


def test_norm_input_opcheck_and_bad_values():
    qkvu, S, s, theta, pos = _inputs(2, 2, 16, True, 4)
    x = torch.randn(2, 9)
    for op in (torch.ops.tnllm.gla_decode_step.default, torch.ops.tnllm.gla_decode_step_functional.default):
        torch.library.opcheck(op, (qkvu, S.clone(), s, theta, pos, "silu", x))
    for bad in (x[0], x[:1], x.long(), x.to("meta")):
        with pytest.raises(ValueError, match="`norm_input`"):
            gla_decode_step(qkvu, S, s, theta, pos, "silu", norm_input=bad)
