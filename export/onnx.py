"""ONNX export of the recurrent step (and an optional prefill graph), and an onnxruntime decoder.

``export_onnx(model, "step.onnx")`` writes the one-token step of ``export.step`` (names and shapes
documented there: ``ids``, ``position``, ``state_0..`` -> ``logits``, ``new_state_0..``) through
``torch.onnx.export(dynamo=True)`` with a dynamic batch dim. The step is plain aten ops (the
custom op only appears in the parallel form), so it needs no translation. The prefill graph
(``export_onnx_prefill``) has the custom op and gets it decomposed to the quadratic form with
``ExportedProgram.run_decompositions`` before conversion.

This module only writes graphs (and checks them once in onnxruntime); running them is
``tnllm.export.runtime`` (``OnnxRecurrentDecoder``), imported lazily for the check.
"""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from .step import (RecurrentPrefill, RecurrentStep, example_inputs, prefill_decomposition, state_names,
                   state_shapes)

FORMAT_VERSION = "1"
MIN_OPSET, MAX_OPSET = 18, 23


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
def _check_model(model) -> None:
    from tnllm.model import TransNormerLLM
    if not isinstance(model, TransNormerLLM):
        raise TypeError(f"`model` must be a TransNormerLLM, got {type(model).__name__}")


def _check_opset(opset) -> int:
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"`opset` must be an int in [{MIN_OPSET}, {MAX_OPSET}], got {opset!r}")
    return opset


def _cpu_fp32(model):
    """The model itself when it already is fp32 on CPU, else an fp32 CPU copy (ORT's CPU kernels
    cover fp32 everywhere; bf16 weights would not run)."""
    p = model.lm_head.weight
    if p.device.type == "cpu" and all(t.dtype == torch.float32 for t in model.parameters()):
        return model
    return copy.deepcopy(model).to(device="cpu", dtype=torch.float32)


def _metadata(model, kind: str) -> dict[str, str]:
    return {"tnllm.kind": kind, "tnllm.format_version": FORMAT_VERSION,
            "tnllm.num_layers": str(model.config.decoder_layers),
            "tnllm.vocab_size": str(model.config.vocab_size),
            "tnllm.config": json.dumps(model.config.to_dict())}


def _export(module, args, path, opset, input_names, output_names, dynamic_shapes, meta) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        prog = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=input_names,
                                 output_names=output_names, dynamic_shapes=dynamic_shapes, verbose=False)
    prog.model.metadata_props.update(meta)
    prog.save(str(path))     # external data only when the model passes 2 GB
    return path


def export_onnx(model, path, opset: int = 18, *, max_batch: int = 4096, verify: bool = True) -> Path:
    """Export ``model``'s recurrent step to ``path`` (ONNX, fp32, dynamic batch 1..max_batch).

    Inputs ``ids`` [B] int64, ``position`` [B] int64, ``state_i`` [B, H, Dk_i, Dv] fp32; outputs
    ``logits`` [B, V] fp32 and ``new_state_i``. ``verify`` runs the file once in onnxruntime against
    the PyTorch step (batch 3, random states) and raises RuntimeError on a mismatch. Returns the path.
    """
    _check_model(model)
    _check_opset(opset)
    if not isinstance(max_batch, int) or max_batch < 2:
        raise ValueError(f"`max_batch` must be an int >= 2, got {max_batch!r}")
    m = _cpu_fp32(model)
    was_training = m.training
    m.eval()
    try:
        L = m.config.decoder_layers
        step = RecurrentStep(m).eval()      # a new Module starts in training mode (torch.onnx warns)
        ids, position, states = example_inputs(m, 2, device="cpu")
        b = torch.export.Dim("batch", min=1, max=max_batch)
        dyn = {"ids": {0: b}, "position": {0: b}, "states": tuple({0: b} for _ in range(L))}
        path = _export(step, (ids, position, states), path, opset, ["ids", "position", *state_names(L)],
                       ["logits", *state_names(L, "new_state")], dyn, _metadata(m, "step"))
        if verify:
            _verify_step(m, path)
    finally:
        m.train(was_training)
    return path


def export_onnx_prefill(model, path, opset: int = 18, *, max_batch: int = 4096, max_length: int = 1 << 16) -> Path:
    """Export the parallel prefill continued from a state: ``ids`` [B, T] int64, ``position`` [B]
    int64 (first position of each row), ``state_i`` -> ``logits`` [B, T, V], ``new_state_i``.

    Batch and length are dynamic. The Lightning Attention op is decomposed to the quadratic form,
    so memory grows with T^2 per head: use it for prompts, chunking long ones (``OnnxRecurrentDecoder
    .prefill(chunk=...)``)."""
    _check_model(model)
    _check_opset(opset)
    m = _cpu_fp32(model)
    was_training = m.training
    m.eval()
    try:
        L = m.config.decoder_layers
        ids, position, states = example_inputs(m, 2, length=5, device="cpu")
        b = torch.export.Dim("batch", min=1, max=max_batch)
        t = torch.export.Dim("length", min=1, max=max_length)
        dyn = {"ids": {0: b, 1: t}, "position": {0: b}, "states": tuple({0: b} for _ in range(L))}
        with torch.no_grad():
            ep = torch.export.export(RecurrentPrefill(m), (ids, position, states), dynamic_shapes=dyn, strict=False)
            ep = ep.run_decompositions({torch.ops.tnllm.lightning_attn_fwd.default: prefill_decomposition})
        path = _export(ep, (ids, position, states), path, opset, ["ids", "position", *state_names(L)],
                       ["logits", *state_names(L, "new_state")], None, _metadata(m, "prefill"))
    finally:
        m.train(was_training)
    return path


def _verify_step(model, path, tol: float = 1e-3) -> None:
    from .runtime import OnnxRecurrentDecoder, OnnxState
    dec = OnnxRecurrentDecoder(path, threads=1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3,), generator=g)
    position = torch.tensor([0, 7, 1000])
    states = tuple(torch.randn(3, *hkv, generator=g) * 0.1 for hkv in state_shapes(model))
    with torch.no_grad():
        ref, ref_states = RecurrentStep(model)(ids, position, states)
    got, got_state = dec.step(ids.numpy(), OnnxState([s.numpy() for s in states], position.numpy()))
    err = max([float(np.abs(got - ref.numpy()).max())]
              + [float(np.abs(a - b.numpy()).max()) for a, b in zip(got_state, ref_states)])
    scale = max(1.0, float(ref.abs().max()))
    if not err <= tol * scale:
        raise RuntimeError(f"export_onnx: onnxruntime and PyTorch disagree on {path} (max abs err {err:.3g})")


# ---------------------------------------------------------------------------------------------
# checkpoints and int8
# ---------------------------------------------------------------------------------------------
def _load_checkpoint(ckpt):
    """(model, tokenizer) through ``tnllm.checkpoints.load_model`` (run directories, checkpoint folders and
    released HF folders)."""
    from tnllm.checkpoints import load_model
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"export_checkpoint_onnx: no checkpoint at {ckpt}")
    return load_model(ckpt, device="cpu", dtype=torch.float32)


def quantize_int8(src, dst) -> Path:
    """int8 weight-only (dynamic) quantization of every MatMul with a constant weight.

    Weights are unsigned 8-bit (u8 activations x u8 weights): onnxruntime's u8 x s8 kernels on x86 CPUs
    without VNNI (AVX2, AVX-512F) add pairs of products in int16 with saturation, which gave a 34% relative
    RMS logit error on an AVX2 machine (3.4% with u8 weights; 5.3% with 7-bit s8 weights), and the file
    runs wherever it is deployed, not only where it was exported."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QUInt8)
    return Path(dst)


def export_checkpoint_onnx(ckpt, out, opset: int = 18, quantize: str | None = None, *,
                           prefill: bool = False, progress=None) -> dict:
    """Load a tnllm checkpoint (``tnllm.checkpoints.load_model``) or a Hugging Face-layout folder
    and write its step graph to ``out``. ``quantize="int8"`` also writes ``<out stem>.int8.onnx``
    (int8 weights, dynamic activations) and measures it against fp32. ``prefill`` also writes
    ``<out stem>.prefill.onnx``. ``progress(message)``, if given, hears each stage. Returns a report dict
    (paths, sizes, seconds, int8 accuracy) that is
    also saved as ``<out stem>.export.json``."""
    if quantize not in (None, "int8"):
        raise ValueError(f"`quantize` must be None or 'int8', got {quantize!r}")
    out = Path(out)
    if out.suffix != ".onnx":
        raise ValueError(f"`out` must name a .onnx file, got {out}")
    say = progress if progress is not None else (lambda msg: None)
    t0 = time.perf_counter()
    say(f"loading {ckpt}")
    model, _tok = _load_checkpoint(ckpt)
    say(f"tracing the recurrent step of a {model.num_params() / 1e6:.2f}M-parameter model (torch.onnx, opset {opset})")
    export_onnx(model, out, opset=opset)
    say(f"wrote {out}; onnxruntime agrees with PyTorch on a check step")
    report = {"ckpt": str(ckpt), "path": str(out), "opset": opset, "bytes": _size(out),
              "num_params": model.num_params(), "export_seconds": round(time.perf_counter() - t0, 2)}
    if prefill:
        say("exporting the prefill graph")
        pre = export_onnx_prefill(model, out.with_suffix(".prefill.onnx"), opset=opset)
        report["prefill_path"] = str(pre)
    if quantize == "int8":
        say("quantizing to int8 and measuring it against fp32")
        q = quantize_int8(out, out.with_suffix(".int8.onnx"))
        report["int8_path"] = str(q)
        report["int8_bytes"] = _size(q)
        from .runtime import OnnxRecurrentDecoder, compare_decoders
        report["int8_accuracy"] = compare_decoders(OnnxRecurrentDecoder(out), OnnxRecurrentDecoder(q))
    out.with_suffix(".export.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _size(path: Path) -> int:
    data = Path(str(path) + ".data")
    return os.path.getsize(path) + (os.path.getsize(data) if data.exists() else 0)
