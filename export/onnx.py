"""ONNX export of the recurrent step (and an optional prefill graph), and an onnxruntime decoder.

``export_onnx(model, "step.onnx")`` writes the one-token step of ``export.step`` (names and shapes
documented there: ``ids``, ``position``, ``state_0..`` -> ``logits``, ``new_state_0..``) through
``torch.onnx.export(dynamo=True)`` with a dynamic batch dim. The step is plain aten ops (the
custom op only appears in the parallel form), so it needs no translation. The prefill graph
(``export_onnx_prefill``) has the custom op and gets it decomposed to the quadratic form with
``ExportedProgram.run_decompositions`` before conversion (torch-apis.md section 3, way (c)).

onnxruntime is imported lazily, inside ``OnnxRecurrentDecoder``.
"""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Sequence

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
# the onnxruntime decoder
# ---------------------------------------------------------------------------------------------
class OnnxState(list):
    """Per-layer fp32 states [B, H, Dk, Dv] (numpy) plus ``position`` [B] int64: the position of
    each row's next token. ``OnnxRecurrentDecoder.step`` returns one; pass it back unchanged."""

    def __init__(self, tensors: Sequence[np.ndarray] = (), position=0):
        super().__init__(tensors)
        B = self[0].shape[0] if len(self) else 0
        pos = np.asarray(position)
        if not np.issubdtype(pos.dtype, np.integer):
            raise TypeError(f"OnnxState: `position` must be integer, got {pos.dtype}")
        self.position = np.broadcast_to(pos.astype(np.int64), (B,)).copy() if pos.ndim == 0 else pos.astype(np.int64)

    @property
    def offset(self) -> int:
        """The common position of all rows (like ``RecurrentState.offset``); ValueError if they differ."""
        if self.position.size and (self.position != self.position[0]).any():
            raise ValueError(f"OnnxState rows sit at different positions {self.position.tolist()}")
        return int(self.position[0]) if self.position.size else 0

    @classmethod
    def from_torch(cls, state) -> "OnnxState":
        """From a ``tnllm.RecurrentState`` (the PyTorch model's prefill/step state)."""
        tensors = [t.detach().to("cpu", torch.float32).numpy() for t in state]
        return cls(tensors, getattr(state, "offset", 0))

    def to_torch(self, device=None):
        from tnllm.model import RecurrentState
        return RecurrentState([torch.from_numpy(np.ascontiguousarray(t)).to(device) for t in self], self.offset)

    def __repr__(self) -> str:
        shape = self[0].shape if len(self) else None
        return f"OnnxState(layers={len(self)}, position={self.position.tolist()}, shape={shape})"


def _providers(providers):
    if providers is not None:
        return list(providers)
    return ["CPUExecutionProvider"]


class OnnxRecurrentDecoder:
    """Runs an exported step (``export_onnx``) in onnxruntime; numpy in, numpy out.

    >>> dec = OnnxRecurrentDecoder("step.onnx")
    >>> logits, state = dec.step(np.array([5, 7]))          # state=None: zero state at position 0
    >>> logits, state = dec.step(logits.argmax(-1), state)   # the state carries each row's position

    ``prefill_path`` (from ``export_onnx_prefill``) makes ``prefill`` run the parallel graph in chunks;
    without it, prefill steps token by token through the same step graph.
    """

    def __init__(self, path, prefill_path=None, providers=None, threads: int | None = None):
        import onnxruntime as ort
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"OnnxRecurrentDecoder: no ONNX file at {self.path}")
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=_providers(providers))
        self._read_signature(self.session, "step")
        self.prefill_session = None
        if prefill_path is not None:
            self.prefill_session = ort.InferenceSession(str(prefill_path), sess_options=opts,
                                                        providers=_providers(providers))
            n, shapes = self.num_layers, self.state_shapes
            self._read_signature(self.prefill_session, "prefill")
            if (n, shapes) != (self.num_layers, self.state_shapes):
                raise ValueError(f"prefill graph {prefill_path} does not match the step graph {path}")

    def _read_signature(self, sess, kind):
        ins, outs = sess.get_inputs(), sess.get_outputs()
        names = [i.name for i in ins]
        if names[:2] != ["ids", "position"] or names[2:] != state_names(len(names) - 2):
            raise ValueError(f"{kind} graph inputs {names} are not a tnllm graph "
                             "(ids, position, state_0..state_{L-1}); export it with tnllm.export")
        self.num_layers = len(names) - 2
        self.state_shapes = [tuple(int(d) for d in i.shape[1:]) for i in ins[2:]]
        self.vocab_size = int(outs[0].shape[-1])
        self.metadata = dict(sess.get_modelmeta().custom_metadata_map)

    # -- inputs -----------------------------------------------------------------------------
    def _ids(self, ids, ndim: int, name: str) -> np.ndarray:
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        a = np.asarray(ids)
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"`{name}` must be integer token ids, got dtype {a.dtype}")
        if a.ndim != ndim:
            raise ValueError(f"`{name}` must have shape {'[B]' if ndim == 1 else '[B, T]'}, got {a.shape}")
        if a.size and (a.min() < 0 or a.max() >= self.vocab_size):
            raise ValueError(f"`{name}` has token ids outside [0, vocab_size={self.vocab_size}): "
                             f"min {a.min()}, max {a.max()}")
        return a.astype(np.int64, copy=False)

    def _state(self, state, B: int) -> OnnxState:
        if state is None:
            return self.zero_state(B)
        if not isinstance(state, (list, tuple)):
            raise TypeError(f"`state` must be an OnnxState (or a list of {self.num_layers} arrays with an "
                            f"`offset`), got {type(state).__name__}")
        if len(state) != self.num_layers:
            raise ValueError(f"`state` must hold {self.num_layers} per-layer arrays [B, H, Dk, Dv], got {len(state)}")
        if not isinstance(state, OnnxState):
            if not hasattr(state, "offset"):
                raise TypeError("`state` is a plain sequence without a position: pass the OnnxState that "
                                "step/prefill returned, or OnnxState(arrays, position)")
            state = (OnnxState.from_torch(state) if all(isinstance(t, torch.Tensor) for t in state)
                     else OnnxState(list(state), state.offset))
        for i, (S, hkv) in enumerate(zip(state, self.state_shapes)):
            if not isinstance(S, np.ndarray):
                raise TypeError(f"`state[{i}]` must be a numpy array, got {type(S).__name__}")
            if S.dtype != np.float32:
                raise TypeError(f"`state[{i}]` must be float32, got {S.dtype}")
            if S.shape != (B, *hkv):
                raise ValueError(f"`state[{i}]` must have shape [B, H, Dk, Dv] = {(B, *hkv)}, got {S.shape}")
        if state.position.shape != (B,):
            raise ValueError(f"`state.position` must have shape [B] = ({B},), got {state.position.shape}")
        return state

    def zero_state(self, batch_size: int) -> OnnxState:
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
        return OnnxState([np.zeros((batch_size, *hkv), np.float32) for hkv in self.state_shapes],
                         np.zeros(batch_size, np.int64))

    def _feed(self, ids, state):
        feed = {"ids": ids, "position": state.position}
        feed.update({f"state_{i}": np.ascontiguousarray(S) for i, S in enumerate(state)})
        return feed

    # -- running ----------------------------------------------------------------------------
    def step(self, token_ids, state=None):
        """token_ids [B] -> (logits [B, V] float32, new OnnxState at position + 1)."""
        ids = self._ids(token_ids, 1, "token_ids")
        state = self._state(state, ids.shape[0])
        out = self.session.run(None, self._feed(ids, state))
        return out[0], OnnxState(out[1:], state.position + 1)

    def prefill(self, input_ids, state=None, attention_mask=None, chunk: int = 256):
        """input_ids [B, T] -> (logits [B, T, V] float32, OnnxState at position + T).

        With a prefill graph: parallel chunks of ``chunk`` tokens; else T steps. ``attention_mask``
        [B, T] (1 keep, 0 pad; left padding) leaves a row's state untouched at its padded tokens,
        as ``TransNormerLLM.prefill`` does from the zero state (always stepped)."""
        ids = self._ids(input_ids, 2, "input_ids")
        B, T = ids.shape
        state = self._state(state, B)
        keep = None
        if attention_mask is not None:
            keep = np.asarray(attention_mask.cpu() if isinstance(attention_mask, torch.Tensor) else attention_mask)
            if keep.shape != ids.shape:
                raise ValueError(f"`attention_mask` must have input_ids' shape {ids.shape}, got {keep.shape}")
            keep = keep.astype(bool)
            keep = None if keep.all() else keep
        if T == 0:
            return np.zeros((B, 0, self.vocab_size), np.float32), state
        logits = []
        if self.prefill_session is not None and keep is None:
            if not isinstance(chunk, int) or chunk < 1:
                raise ValueError(f"`chunk` must be a positive int, got {chunk!r}")
            for t0 in range(0, T, chunk):
                part = np.ascontiguousarray(ids[:, t0:t0 + chunk])
                out = self.prefill_session.run(None, self._feed(part, state))
                logits.append(out[0])
                state = OnnxState(out[1:], state.position + part.shape[1])
            return np.concatenate(logits, axis=1), state
        for t in range(T):
            lg, new = self.step(ids[:, t], state)
            if keep is not None and not keep[:, t].all():
                k = keep[:, t, None, None, None]
                new = OnnxState([np.where(k, a, b) for a, b in zip(new, state)], new.position)
            logits.append(lg)
            state = new
        return np.stack(logits, axis=1), state

    def generate(self, input_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                 eos_token_id: int | None = None, seed: int | None = None, state=None) -> np.ndarray:
        """Prefill ``input_ids`` [B, T] then decode: returns [B, T + n] int64 (n <= max_new_tokens;
        it stops early once every row has emitted ``eos_token_id``, finished rows repeat it).

        ``temperature`` 0 is greedy; otherwise softmax(logits / temperature) over the ``top_k`` best."""
        ids = self._ids(input_ids, 2, "input_ids")
        if ids.shape[1] == 0:
            raise ValueError("`input_ids` must hold at least one token per row")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"`max_new_tokens` must be an int >= 0, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"`temperature` must be a float >= 0, got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"`top_k` must be None or an int >= 1, got {top_k!r}")
        rng = np.random.default_rng(seed)
        logits, state = self.prefill(ids, state)
        last = logits[:, -1]
        out = [ids]
        done = np.zeros(ids.shape[0], bool)
        for i in range(max_new_tokens):
            nxt = sample_numpy(last, temperature, top_k, rng)
            if eos_token_id is not None:
                nxt = np.where(done, eos_token_id, nxt)
                done |= nxt == eos_token_id
            out.append(nxt[:, None])
            if (eos_token_id is not None and done.all()) or i == max_new_tokens - 1:
                break
            last, state = self.step(nxt, state)
        return np.concatenate(out, axis=1)


def sample_numpy(logits: np.ndarray, temperature: float, top_k: int | None, rng) -> np.ndarray:
    """Greedy (temperature 0) or temperature/top-k sampling of logits [B, V] -> ids [B] int64."""
    if temperature == 0:
        return logits.argmax(-1).astype(np.int64)
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    u = rng.random((z.shape[0], 1))
    return np.minimum((p.cumsum(-1) < u).sum(-1), z.shape[-1] - 1).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# checkpoints and int8
# ---------------------------------------------------------------------------------------------
def _load_checkpoint(ckpt):
    """(model, tokenizer or None) through ``tnllm.train.checkpoint.load_model`` (run directories,
    checkpoint folders and released HF folders); ``from_pretrained`` where that module is absent."""
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"export_checkpoint_onnx: no checkpoint at {ckpt}")
    try:
        from tnllm.train.checkpoint import load_model
    except ImportError:
        from tnllm.model import TransNormerLLM
        return TransNormerLLM.from_pretrained(ckpt), None
    return load_model(ckpt, device="cpu", dtype=torch.float32)


def quantize_int8(src, dst) -> Path:
    """int8 weight-only (dynamic) quantization of every MatMul with a constant weight."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8)
    return Path(dst)


def compare_decoders(ref: OnnxRecurrentDecoder, other: OnnxRecurrentDecoder, batch: int = 2, steps: int = 32,
                     seed: int = 0) -> dict:
    """Accuracy of ``other`` against ``ref`` on the same teacher-forced random tokens, then on greedy
    decoding from the same prompt: max |dlogits|, relative RMS, top-1 agreement, identical greedy tokens."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(1, ref.vocab_size, (batch, steps))
    sa = sb = None
    errs, rms, agree = [], [], []
    for t in range(steps):
        la, sa = ref.step(toks[:, t], sa)
        lb, sb = other.step(toks[:, t], sb)
        errs.append(float(np.abs(la - lb).max()))
        rms.append(float(np.sqrt(((la - lb) ** 2).mean() / max((la ** 2).mean(), 1e-30))))
        agree.append(float((la.argmax(-1) == lb.argmax(-1)).mean()))
    ga = ref.generate(toks[:, :4], steps)
    gb = other.generate(toks[:, :4], steps)
    return {"steps": steps, "batch": batch, "max_abs_logit_err": max(errs), "rel_rms_logit_err": float(np.mean(rms)),
            "top1_agreement": float(np.mean(agree)), "greedy_tokens_identical": float((ga == gb).mean())}


def export_checkpoint_onnx(ckpt, out, opset: int = 18, quantize: str | None = None, *,
                           prefill: bool = False) -> dict:
    """Load a tnllm checkpoint (``tnllm.train.checkpoint.load_model``) or a Hugging Face-layout folder
    and write its step graph to ``out``. ``quantize="int8"`` also writes ``<out stem>.int8.onnx``
    (int8 weights, dynamic activations) and measures it against fp32. ``prefill`` also writes
    ``<out stem>.prefill.onnx``. Returns a report dict (paths, sizes, seconds, int8 accuracy) that is
    also saved as ``<out stem>.export.json``."""
    if quantize not in (None, "int8"):
        raise ValueError(f"`quantize` must be None or 'int8', got {quantize!r}")
    out = Path(out)
    if out.suffix != ".onnx":
        raise ValueError(f"`out` must name a .onnx file, got {out}")
    t0 = time.perf_counter()
    model, _tok = _load_checkpoint(ckpt)
    export_onnx(model, out, opset=opset)
    report = {"ckpt": str(ckpt), "path": str(out), "opset": opset, "bytes": _size(out),
              "num_params": model.num_params(), "export_seconds": round(time.perf_counter() - t0, 2)}
    if prefill:
        pre = export_onnx_prefill(model, out.with_suffix(".prefill.onnx"), opset=opset)
        report["prefill_path"] = str(pre)
    if quantize == "int8":
        q = quantize_int8(out, out.with_suffix(".int8.onnx"))
        report["int8_path"] = str(q)
        report["int8_bytes"] = _size(q)
        report["int8_accuracy"] = compare_decoders(OnnxRecurrentDecoder(out), OnnxRecurrentDecoder(q))
    out.with_suffix(".export.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _size(path: Path) -> int:
    data = Path(str(path) + ".data")
    return os.path.getsize(path) + (os.path.getsize(data) if data.exists() else 0)
