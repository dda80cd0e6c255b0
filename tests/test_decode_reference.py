"""Every decoding path is bit-exact to the outputs recorded before the state/decoder redesign
(tests/data/decode_reference.pt, written by tests/data/make_decode_reference.py at commit efc3903):
forward, prefill (chunked, masked), step, generate (greedy, masked, sampled, eos), the static-buffer
decoder with per-row positions, the exported step module, the Transformer baseline and onnxruntime."""
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
    assert torch.equal(got, want), f"{key}: max abs diff {(got.double() - want.double()).abs().max().item():.3g}"


def test_bit_exact_to_recorded_outputs(tmp_path):
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
