"""Weight-only int8 decoding through torchao (tnllm.compile.quantize_int8): which weights are quantized,
the bytes a step reads, every decode path on the int8 model against its own eager step, the clear error
without torchao."""
import pytest
import torch

from tnllm import TransNormerConfig, TransNormerLLM
from tnllm.compile import CudaGraphDecoder, quantize_int8
from tnllm.compile import quant


def _model(seed=0):
    torch.manual_seed(seed)
    m = TransNormerLLM(TransNormerConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4.0)
    return m.to(torch.bfloat16)


def test_missing_torchao_names_the_option_and_the_install(monkeypatch):
    monkeypatch.setattr(quant, "torchao_available", lambda: False)
    with pytest.raises(ValueError, match=r"--int8 needs torchao .*pip install 'tnllm\[int8\]'"):
        quantize_int8(_model(), option="--int8")


def test_quantized_weights_and_bytes_read():
    pytest.importorskip("torchao")
    m = _model()
    before = quant.weight_bytes_read(m)
    lin = [mod for layer in m.model.layers for mod in layer.modules() if isinstance(mod, torch.nn.Linear)]
    n_lin = sum(mod.weight.numel() for mod in lin)
    rows = sum(mod.weight.shape[0] for mod in lin)
    quantize_int8(m)
    assert all(quant.is_quantized(mod.weight) for mod in lin)
    assert not quant.is_quantized(m.lm_head.weight) and m.lm_head.weight is m.model.embed_tokens.weight
    # each Linear weight: 2 bytes -> 1 byte per value, plus an fp32 scale and an int8 zero point per row
    after = quant.weight_bytes_read(m)
    assert before - after == n_lin - 5 * rows, (before, after, n_lin, rows)


@pytest.mark.parametrize("path", ["aten", "kernel", "fused"])
def test_int8_decode_paths_match_the_int8_model_step(path):
    pytest.importorskip("torchao")
    m = quantize_int8(_model(1))
    B = 2
    dec = CudaGraphDecoder(m, B, decode_path=path)
    st = m.zero_state(B)
    g = torch.Generator().manual_seed(2)
    for t in range(4):
        tok = torch.randint(1, 259, (B,), generator=g)
        got = dec.step(tok)
        with torch.no_grad():
            want, st = m.step(tok, st)
        err = float((got.double() - want.double()).norm() / want.double().norm())
        assert err <= (0 if path != "fused" else 3e-2), f"{path} token {t}: {err:.2e}"


def test_int8_fused_step_compiles_fullgraph():
    pytest.importorskip("torchao")
    from tnllm.compile import FusedDecodeStep
    torch._dynamo.reset()
    m = quantize_int8(_model(2))
    fs = FusedDecodeStep(m)
    st = [torch.zeros(2, *s) for s in m.state_shapes()]
    ids, pos = torch.tensor([3, 4]), torch.tensor([0, 9])
    want = fs(ids, [s.clone() for s in st], pos)
    got = torch.compile(fs.__call__, fullgraph=True, backend="aot_eager")(ids, [s.clone() for s in st], pos)
    assert torch.equal(got, want)
