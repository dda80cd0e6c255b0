"""Every decoding path equals the outputs recorded before the state/decoder redesign
(tests/data/decode_reference.pt, written by tests/data/make_decode_reference.py at commit efc3903):
forward, prefill (chunked, masked), step, generate (greedy, masked, sampled, eos), the static-buffer
decoder with per-row positions, the exported step module, the Transformer baseline and onnxruntime.

Token ids must be identical; float outputs agree to 1e-5 relative: the reference was recorded on one CPU and
float32 matmuls differ in the last bits between CPUs whose BLAS kernels differ (seen: 1.2e-7 absolute on an
AMD EPYC against the recording machine). On one machine the decoding paths are compared bit for bit with
each other in tests/test_generate.py and tests/test_compile_decode.py."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))
import make_decode_reference as mk  # noqa: E402

sys.path.remove(str(DATA))


def _same(got, want, key):
    if isinstance(want, list):
        assert len(got) == len(want), key
        for i, (a, b) in enumerate(zip(got, want)):
            _same(a, b, f"{key}[{i}]")
        return
    assert got.dtype == want.dtype and got.shape == want.shape, (key, got.dtype, want.dtype, got.shape, want.shape)
    if got.is_floating_point():
        ok = torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    else:
        ok = torch.equal(got, want)
    assert ok, f"{key}: max abs diff {(got.double() - want.double()).abs().max().item():.3g}"


def test_equal_to_recorded_outputs(tmp_path):
    data = torch.load(DATA / "decode_reference.pt", weights_only=True)
    model, base = mk.load(data)
    onnx_path = None
    if importlib.util.find_spec("onnxruntime") is not None:
        from tnllm.export import export_onnx
        onnx_path = export_onnx(model, tmp_path / "step.onnx", verify=False)
    got = mk.compute(model, base, onnx_path)
    want = data["ref"]
    if onnx_path is None:
        want = {k: v for k, v in want.items() if not k.startswith("onnx")}
    assert sorted(got) == sorted(want)
    for key in want:
        _same(got[key], want[key], key)
