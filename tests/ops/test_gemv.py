"""tnllm.ops.gemv: the decode step's residual projection. The reference equals x + y W^T (and, with a gate,
x + the model's channel norm + GLU + l3) within rounding; the custom op on CPU: opcheck,
torch.compile(fullgraph=True), the empty cases, every bad input named. The Triton kernel under
TRITON_INTERPRET=1: tests/interpret/test_gemv_interpreted.py."""
import pytest
import torch

from tnllm import TransNormerConfig, TransNormerLLM
from tnllm.ops import srms_norm
from tnllm.ops.gemv import residual_gemv, residual_gemv_naive


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_reference_is_the_residual_projection(dtype):
    g = torch.Generator().manual_seed(0)
    x, y, w = (torch.randn(*s, generator=g).to(dtype) for s in ((3, 40), (3, 24), (40, 24)))
    want = (x.double() + y.double() @ w.double().T).to(dtype)
    assert torch.equal(residual_gemv_naive(x, y, w), want)
    assert torch.equal(residual_gemv(x, y, w), want)       # CPU: the op runs the reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", ["none", "silu", "relu"])
def test_gate_is_the_models_channel_mixer(dtype, act):
    torch.manual_seed(0)
    m = TransNormerLLM(TransNormerConfig.from_preset("tiny", glu_act=act)).to(dtype)
    glu = m.model.layers[0].channel_mixer
    x = torch.randn(5, 64, dtype=dtype) * 3
    with torch.no_grad():
        w12 = torch.cat([glu.l1.weight, glu.l2.weight])
        out = residual_gemv(x, x @ w12.T, glu.l3.weight, act)     # norm folded: the projection of x itself
        want = x + glu(srms_norm(x))
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out, want, rtol=tol, atol=tol * float(want.abs().max()))


def test_opcheck_and_compile():
    g = torch.Generator().manual_seed(1)
    x, y, w, l12 = torch.randn(3, 7, generator=g), torch.randn(3, 5, generator=g), torch.randn(7, 5, generator=g), \
        torch.randn(3, 10, generator=g)
    torch.library.opcheck(torch.ops.tnllm.residual_gemv.default, (x, y, w, None))
    torch.library.opcheck(torch.ops.tnllm.residual_gemv.default, (x, l12, w, "silu"))
    torch._dynamo.reset()

    def f(x, y, w):
        return residual_gemv(x * 2, y, w) + residual_gemv(x, l12, w, "silu")
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(cf(x, y, w), f(x, y, w))
    expl = torch._dynamo.explain(f)(x, y, w)
    assert expl.graph_break_count == 0 and expl.graph_count == 1


def test_empty_shapes():
    assert residual_gemv(torch.zeros(0, 8), torch.zeros(0, 4), torch.zeros(8, 4)).shape == (0, 8)
    x = torch.randn(2, 3)
    assert torch.equal(residual_gemv(x, torch.zeros(2, 0), torch.zeros(3, 0)), x)


@pytest.mark.parametrize("case", ["type", "rank", "dtype int", "dtype mix", "device", "w rows", "y cols",
                                  "y rows", "gate cols", "gate"])
def test_bad_inputs_name_the_argument(case):
    x, y, w = torch.randn(2, 6), torch.randn(2, 4), torch.randn(6, 4)
    args, exc, msg = {
        "type": ((x.tolist(), y, w), TypeError, "`x` must be a torch.Tensor"),
        "rank": ((x, y[None], w), ValueError, "`y` must be 2-D"),
        "dtype int": ((x.long(), y.long(), w.long()), TypeError, "`x` must be fp16"),
        "dtype mix": ((x, y.double(), w), TypeError, "must share one dtype"),
        "device": ((x, y, w.to("meta")), ValueError, "must be on one device"),
        "w rows": ((x, y, w[:5]), ValueError, "`w` must have shape"),
        "y cols": ((x, y[:, :3], w), ValueError, "`y` must have shape \\[B, K\\]"),
        "y rows": ((x, y[:1], w), ValueError, "`y` must have shape"),
        "gate cols": ((x, y, w, "none"), ValueError, "l1 \\| l2"),
        "gate": ((x, torch.randn(2, 8), w, "gelu"), ValueError, "`gate` must be None or one of"),
    }[case]
    for fn in (residual_gemv, residual_gemv_naive):
        with pytest.raises(exc, match=msg):
            fn(*args)
