"""tnllm.ops.sglu: the decode step's SGLU gate. The reference equals the model's GLU bit for bit (without
the folded norm) and the model's channel norm + GLU within rounding (with it); the custom op on CPU:
opcheck, torch.compile(fullgraph=True), every bad input named. The Triton kernel under
TRITON_INTERPRET=1: tests/interpret/test_sglu_interpreted.py."""
import pytest
import torch

from tnllm import TransNormerConfig, TransNormerLLM
from tnllm.ops import srms_norm
from tnllm.ops.sglu import sglu_gate, sglu_gate_naive


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("act", ["none", "silu", "relu"])
def test_reference_equals_the_model_glu(dtype, act):
    torch.manual_seed(0)
    m = TransNormerLLM(TransNormerConfig.from_preset("tiny", glu_act=act)).to(dtype)
    glu = m.model.layers[0].channel_mixer
    x = torch.randn(5, 64, dtype=dtype) * 3
    with torch.no_grad():
        w12 = torch.cat([glu.l1.weight, glu.l2.weight])
        h = srms_norm(x)
        assert torch.equal(glu.l3(sglu_gate_naive(h @ w12.T, None, act)), glu(h))
        assert torch.equal(sglu_gate(h @ w12.T, None, act), sglu_gate_naive(h @ w12.T, None, act))
        # the channel norm folded in: projection of x itself, scaled inside
        folded = glu.l3(sglu_gate(x @ w12.T, x, act))
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(folded, glu(h), rtol=tol, atol=tol * float(glu(h).abs().max()))


def test_opcheck_and_compile():
    g = torch.Generator().manual_seed(1)
    l12, x = torch.randn(3, 20, generator=g), torch.randn(3, 7, generator=g)
    for xn in (None, x):
        torch.library.opcheck(torch.ops.tnllm.sglu_gate.default, (l12, xn, "silu"))
    torch._dynamo.reset()

    def f(l12, x):
        return sglu_gate(l12 * 2, x, "silu") + 1
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(cf(l12, x), f(l12, x))
    expl = torch._dynamo.explain(f)(l12, x)
    assert expl.graph_break_count == 0 and expl.graph_count == 1


def test_empty_batch():
    assert sglu_gate(torch.zeros(0, 8), None).shape == (0, 4)


@pytest.mark.parametrize("case", ["rank", "odd", "int", "act", "norm shape", "norm rows", "norm device", "type"])
def test_bad_inputs_name_the_argument(case):
    l12, x = torch.randn(2, 8), torch.randn(2, 5)
    args, exc, msg = {
        "rank": ((l12[None], None, "none"), ValueError, "`l12` must have shape"),
        "odd": ((l12[:, :7], None, "none"), ValueError, "`l12` must have shape"),
        "int": ((l12.long(), None, "none"), TypeError, "`l12` must be fp16"),
        "act": ((l12, None, "gelu"), ValueError, "`act` must be one of"),
        "norm shape": ((l12, x[0], "none"), ValueError, "`norm_input`"),
        "norm rows": ((l12, x[:1], "none"), ValueError, "`norm_input`"),
        "norm device": ((l12, x.to("meta"), "none"), ValueError, "`norm_input` is on meta"),
        "type": ((l12.tolist(), None, "none"), TypeError, "`l12` must be a torch.Tensor"),
    }[case]
    for fn in (sglu_gate, sglu_gate_naive):
        with pytest.raises(exc, match=msg):
            fn(*args)
