"""The model's recurrent step through the fused Triton decode kernels on CPU under TRITON_INTERPRET=1:
the ops' CPU kernels are the Triton launchers here (``use_triton_on_cpu``), so ``model.step(...,
decode_kernel=True)`` and the decoders run the real kernels, against the aten step (fp32, the tiny
preset, a few tokens, the states included), and ``CudaGraphDecoder``'s kernel and fused paths."""
import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/ops/test_triton.py (a child process)"
pytest.importorskip("triton")

from tnllm import RecurrentState, TransNormerConfig, TransNormerLLM  # noqa: E402
from tnllm.compile import CudaGraphDecoder  # noqa: E402
from tnllm.ops.gla_decode import op as gla_op  # noqa: E402
from tnllm.ops.gla_decode import triton as gla_tri  # noqa: E402
from tnllm.ops.gemv import op as gemv_op  # noqa: E402
from tnllm.ops.sglu import op as sglu_op  # noqa: E402
from tnllm.testing import decode_against_step  # noqa: E402

V = 259


@pytest.fixture
def triton_on_cpu():
    gla_op.use_triton_on_cpu(True)
    sglu_op.use_triton_on_cpu(True)
    gemv_op.use_triton_on_cpu(True)
    gla_tri._COUNTERS.clear()
    yield
    gla_op.use_triton_on_cpu(False)
    sglu_op.use_triton_on_cpu(False)
    gemv_op.use_triton_on_cpu(False)


def _model(seed=0):
    torch.manual_seed(seed)
    m = TransNormerLLM(TransNormerConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4.0)
    return m


def _close(a, b, what):
    err = float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
    assert err < 1e-5, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
def test_model_step_through_the_kernel_equals_the_aten_step(triton_on_cpu, per_row):
    m, B = _model(), 3
    g = torch.Generator().manual_seed(2)
    st0 = [torch.randn(B, *hkv, generator=g) * 0.3 for hkv in m.state_shapes()]
    pos = torch.tensor([0, 17, 100000]) if per_row else 1000
    a = RecurrentState([S.clone() for S in st0], pos)
    k = RecurrentState([S.clone() for S in st0], pos)
    ids = torch.randint(1, V, (4, B), generator=g)
    with torch.no_grad():
        for t in range(4):
            la, a = m.step(ids[t], a, decode_kernel=False)
            lk, k = m.step(ids[t], k, decode_kernel=True)
            _close(lk, la, f"logits, token {t}")
    for i, (x, y) in enumerate(zip(k, a)):
        _close(x, y, f"state of layer {i}")
    assert ("cpu", None) in gla_tri._COUNTERS, "the Triton kernel did not run"


@pytest.mark.parametrize("path", ["kernel", "fused"])
def test_decoder_through_the_kernel_equals_model_step(triton_on_cpu, path):
    m, B = _model(1), 2
    dec = CudaGraphDecoder(m, B, decode_path=path)
    pairs, got_states, want_states = decode_against_step(dec, m, torch.randint(1, V, (B, 3)), 4)
    for t, (got, want) in enumerate(pairs):
        _close(got, want, f"{path} logits, token {t}")
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    for x, y in zip(got_states, want_states):
        _close(x, y, f"{path} state")
