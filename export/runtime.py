"""The onnxruntime side: run a step graph written by ``tnllm.export.export_onnx``.

``OnnxRecurrentDecoder(path)`` runs the graph (numpy in, numpy out; the state is an ``OnnxState``, which
carries each row's position like ``tnllm.RecurrentState``). ``as_decoder()`` gives the decoder protocol of
``tnllm.generate`` over it (a thin torch <-> numpy adapter), so sampling and the generation loop are the one
``tnllm.generate.generate``. onnxruntime is imported when a decoder is built.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .step import state_names


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
        """From a ``tnllm.RecurrentState`` (the PyTorch model's prefill/step state), per-row positions kept."""
        tensors = [t.detach().to("cpu", torch.float32).numpy() for t in state]
        pos = state.position.cpu().numpy() if hasattr(state, "position") else getattr(state, "offset", 0)
        return cls(tensors, pos)

    def to_torch(self, device=None):
        """As a ``tnllm.RecurrentState`` (per-row positions; the shared int where all rows agree)."""
        from tnllm.model import RecurrentState
        tensors = [torch.from_numpy(np.ascontiguousarray(t)).to(device) for t in self]
        shared = not self.position.size or not (self.position != self.position[0]).any()
        return RecurrentState(tensors, self.offset if shared else torch.from_numpy(self.position.copy()).to(device))

    def __repr__(self) -> str:
        shape = self[0].shape if len(self) else None
        return f"OnnxState(layers={len(self)}, position={self.position.tolist()}, shape={shape})"


def _providers(providers):
    if providers is not None:
        return list(providers)
    return ["CPUExecutionProvider"]


def _session(ort, path, opts, providers):
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=_providers(providers))
    except Exception as e:      # InvalidProtobuf, Fail, ...: onnxruntime's own exception classes
        if type(e).__module__.startswith("onnxruntime"):
            raise ValueError(f"{path}: not a readable ONNX graph ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}); export it again with `tnllm export onnx`") from e
        raise


class OnnxRecurrentDecoder:
    """Runs an exported step (``export_onnx``) in onnxruntime; numpy in, numpy out.

    >>> dec = OnnxRecurrentDecoder("step.onnx")
    >>> logits, state = dec.step(np.array([5, 7]))          # state=None: zero state at position 0
    >>> logits, state = dec.step(logits.argmax(-1), state)   # the state carries each row's position

    ``prefill_path`` (from ``export_onnx_prefill``) makes ``prefill`` run the parallel graph in chunks;
    without it, prefill steps token by token through the same step graph. ``config`` is the model config
    stored in the graph (None for a graph without one).
    """

    def __init__(self, path, prefill_path=None, providers=None, threads: int | None = None):
        import onnxruntime as ort
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"OnnxRecurrentDecoder: no ONNX file at {self.path}")
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        self.session = _session(ort, self.path, opts, providers)
        self._read_signature(self.session, "step")
        self.prefill_session = None
        if prefill_path is not None:
            self.prefill_session = _session(ort, prefill_path, opts, providers)
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

    @property
    def config(self):
        """The ``TransNormerConfig`` the graph was exported from (its ``tnllm.config`` metadata), or None."""
        raw = self.metadata.get("tnllm.config")
        if raw is None:
            return None
        from tnllm.config import TransNormerConfig
        return TransNormerConfig.from_dict(json.loads(raw))

    def check_config(self, config, where: str = "the checkpoint") -> None:
        """ValueError unless the graph was exported from a model with ``config`` (a ``TransNormerConfig``)."""
        mine = self.config
        if mine is None:
            raise ValueError(f"{self.path} stores no model config (tnllm.config metadata): export it again with "
                             f"`tnllm export onnx`")
        import dataclasses
        names = [f.name for f in dataclasses.fields(mine) if f.name != "extra"]    # the model, not the notes
        a, b = ({k: getattr(c, k) for k in names} for c in (mine, config))
        diff = [k for k in names if a[k] != b[k]]
        if diff:
            shown = ", ".join(f"{k}: graph {a.get(k)!r} vs {b.get(k)!r}" for k in diff[:4])
            raise ValueError(f"{self.path} was exported from another model than {where} ({shown}"
                             f"{', ...' if len(diff) > 4 else ''}): export this checkpoint with "
                             f"`tnllm export onnx --ckpt ...`")

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
        """input_ids [B, T] -> (logits [B, T, V] float32, OnnxState).

        With a prefill graph: parallel chunks of ``chunk`` tokens; else T steps. ``attention_mask``
        [B, T] (1 keep, 0 pad; left padding) leaves a row's state untouched at its padded tokens (always
        stepped) while its position advances, as ``TransNormerLLM.prefill`` does: the same states."""
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
        return prefill_by_steps(self.step, ids, keep, state)

    def as_decoder(self) -> "OnnxDecoder":
        """The decoder protocol of ``tnllm.generate`` over this session (torch tensors in and out)."""
        return OnnxDecoder(self)

    def generate(self, input_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                 eos_token_id: int | None = None, seed: int | None = None, **kwargs) -> np.ndarray:
        """``tnllm.generate.generate`` through this session (same arguments and finished-row rule);
        ``input_ids`` [B, T] numpy or torch -> [B, T + n] int64 numpy."""
        from tnllm.generate import generate
        ids = torch.from_numpy(self._ids(input_ids, 2, "input_ids").copy())
        return generate(self, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        eos_token_id=eos_token_id, seed=seed, **kwargs).numpy()


def prefill_by_steps(step, ids: np.ndarray, keep: np.ndarray | None, state):
    """Feed ``ids`` [B, T] through ``step(ids [B], state) -> (logits [B, V], state)`` (the state a list of
    arrays with ``position``; ``state=None`` is the zero start). Where ``keep`` [B, T] is False (left padding)
    the row's arrays stay as they were and its position still advances, as in ``TransNormerLLM.prefill``
    (pads count as positions), so the states equal the PyTorch model's. Returns (logits [B, T, V], state)."""
    logits = []
    for t in range(ids.shape[1]):
        lg, new = step(ids[:, t], state)
        if keep is not None and not keep[:, t].all():
            k = keep[:, t]
            old = [np.zeros_like(a) for a in new] if state is None else state
            new = type(new)([np.where(k.reshape((-1,) + (1,) * (a.ndim - 1)), a, b).astype(a.dtype)
                             for a, b in zip(new, old)], new.position)
        logits.append(lg)
        state = new
    return np.stack(logits, axis=1), state


class OnnxDecoder:
    """The decoder protocol (``start``/``step``, torch in and out) over a numpy step decoder: an
    ``OnnxRecurrentDecoder``, or any object with ``step(ids np[B], state|None) -> (logits np [B, V], state)``
    whose state carries ``position`` (then the prompt is fed token by token; a padded token leaves its row's
    state as it was)."""

    def __init__(self, dec):
        self.dec = dec
        self.config = getattr(dec, "config", None)
        self.device = torch.device("cpu")

    def start(self, ids: torch.Tensor, mask: torch.Tensor | None):
        ids_np = ids.cpu().numpy().astype(np.int64)
        keep = None if mask is None else mask.cpu().numpy().astype(bool)
        if hasattr(self.dec, "prefill"):
            logits, state = self.dec.prefill(ids_np, attention_mask=keep)
            return torch.from_numpy(np.asarray(logits[:, -1], dtype=np.float32)), state
        logits, state = prefill_by_steps(self.dec.step, ids_np, keep, None)
        return torch.from_numpy(np.asarray(logits[:, -1], dtype=np.float32)), state

    def step(self, tokens: torch.Tensor, state):
        out, state = self.dec.step(tokens.cpu().numpy().astype(np.int64), state)
        return torch.from_numpy(np.asarray(out, dtype=np.float32)), state


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


