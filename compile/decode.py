"""Static-buffer recurrent decode: the state lives in fixed tensors, each step updates them in place,
so on CUDA the whole step (every layer, the head) is captured once in a ``torch.cuda.CUDAGraph`` and
replayed per token: one launch per token instead of hundreds.

Buffers (batch B fixed at construction): ``ids`` [B] int64, ``position`` [B] int64 (each row's
position, a tensor so the graph needs no re-capture as it grows and rows may differ), ``states``
(per-layer fp32 [B, H, Dk, Dv]) and ``logits`` [B, V] fp32. ``buffers`` is a ``RecurrentState`` over
those very tensors; the step is the model's public ``model.step(ids, buffers, inplace=True)``, which
writes every layer's new state straight into its buffer.

``decode_path`` picks how the step runs (the same maths in every path):

* ``"aten"``: the plain aten recurrent step (``decode_kernel=False``), what ONNX and torch.export trace;
* ``"kernel"``: the token mixer after ``qkvu_proj`` as the one fused kernel ``tnllm::gla_decode_step``,
  in place on the state buffers (on CPU the op runs its reference form, the same maths);
* ``"fused"``: ``FusedDecodeStep`` (``fused_step.py``): six device operations per layer (the two norms folded into
  the kernels, l1 and l2 as one GEMM over a decode-time stacked copy of their weights, the residual
  adds inside the GEMMs); the roundings differ from ``model.step`` at the dtype's epsilon;
* ``"layer"``: ``FusedDecodeStep(layer_kernel=True)``: each layer one launch of the persistent kernel
  ``tnllm::decode_layer_step`` on CUDA up to 4 rows of layers that fit it (the fused step's maths; other calls,
  wider layers and the CPU take the fused step's six operations);
* ``"stack"``: ``FusedDecodeStep(layer_kernel=True, stack=True)``: each run of like layers (the 385M preset: layer
  0, then layers 1-23) one launch of ``tnllm::decode_stack_step``, the layer kernel looping over the layers with a
  grid barrier between two and the next layer's first weight tiles loaded ahead; the buffers are then views of
  one stacked state tensor per run (``stacked_zero_state``); elsewhere as ``"layer"``;
* ``"auto"`` (default): ``"layer"`` on CUDA at batch 1 where it was measured faster (``layer_pays``: the
  385M-sized layers), else ``"fused"`` on CUDA where the model allows it, else ``"kernel"`` where every
  layer can use the kernel, else ``"aten"``; on CPU ``"aten"`` (bit-identical to ``model.step``).

A static batch of slots for continuous batching: ``reset_rows(rows)`` starts new sequences in some rows
(zero state, position 0) and ``load_rows(rows, state)`` puts prefilled ones there, while the other rows
keep going; the captured graph reads the buffers, so neither needs a re-capture.

The same class runs on CPU without a graph (eager or compiled), which is how the static-buffer
logic is tested without a GPU. It implements the decoder protocol of ``tnllm.generate`` (``start`` /
``step``), so ``generate(CudaGraphDecoder(model, B), ids)`` decodes through the graph.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tnllm.model import RecurrentState, check_token_ids

from .fused_step import FusedDecodeStep, fused_unsupported, layer_pays, stacked_zero_state

DECODE_PATHS = ("auto", "aten", "kernel", "fused", "layer", "stack")

from .policy import check_mode


def resolve_decode_path(model, path: str = "auto", batch_size: int | None = None) -> str:
    """The decode path ``path`` names for ``model`` (module docstring): ``"auto"`` resolved by the model's
    device, dtype and layers (and ``batch_size``, the rows decoded together, where known); an explicit path the
    model cannot run is a ValueError saying why."""
    if path not in DECODE_PATHS:
        raise ValueError(f"`decode_path` must be one of {DECODE_PATHS}, got {path!r}")
    mixers = [layer.token_mixer for layer in model.model.layers]
    if path in ("fused", "layer", "stack"):
        why = fused_unsupported(model)
        if why is not None:
            raise ValueError(f"decode_path='{path}' cannot run this model: {why}")
    if path == "kernel":
        for i, tm in enumerate(mixers):
            why = tm.kernel_unsupported()
            if why is not None:
                raise ValueError(f"decode_path='kernel': layer {i} cannot use the fused decode kernel: {why}")
    if path != "auto":
        return path
    w = model.lm_head.weight
    if w.device.type != "cuda" or w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return "aten"
    if fused_unsupported(model) is None:
        return "layer" if batch_size is not None and layer_pays(model, batch_size) else "fused"
    return "kernel" if all(tm.kernel_unsupported() is None for tm in mixers) else "aten"


class CudaGraphDecoder:
    """Batched decode with static state buffers (and a CUDA graph on CUDA).

    Args:
        model: a ``TransNormerLLM`` (any dtype; the state stays fp32).
        batch_size: B, fixed; ``start``/``prefill`` take exactly B rows.
        cuda_graph: capture the step in a CUDA graph; default True on CUDA, False elsewhere.
        compile: also ``torch.compile`` the step (``fullgraph``, static shapes) with ``mode``
            (fuses the small elementwise ops the graph would otherwise replay one by one).
        warmup: eager runs before capture (compiles, and lets cuBLAS pick its kernels).
        decode_path: ``"auto"``, ``"aten"``, ``"kernel"``, ``"fused"``, ``"layer"`` or ``"stack"`` (module docstring);
            ``self.decode_path`` is the path chosen.
    """

    def __init__(self, model, batch_size: int, *, cuda_graph: bool | None = None, compile: bool = False,
                 mode: str = "default", warmup: int = 2, decode_path: str = "auto"):
        from tnllm.model import TransNormerLLM
        if not isinstance(model, TransNormerLLM):
            raise TypeError(f"`model` must be a TransNormerLLM, got {type(model).__name__}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"`warmup` must be an int >= 1, got {warmup!r}")
        check_mode(mode)
        self.model = model.eval()
        self.device = model.lm_head.weight.device
        self.decode_path = resolve_decode_path(model, decode_path, batch_size)
        self.batch_size = batch_size
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"`cuda_graph=True` needs the model on a CUDA device, it is on {self.device}")
        B, dev = batch_size, self.device
        self.ids = torch.zeros(B, dtype=torch.int64, device=dev)
        self.position = torch.zeros(B, dtype=torch.int64, device=dev)
        # views of one stacked tensor per run of like layers (what the "stack" path's launches take)
        self.states, self.state_stacks = stacked_zero_state(model, B, dev)
        self.buffers = RecurrentState(self.states, self.position)     # views of the same tensors
        self.config = model.config
        self.logits = torch.zeros(B, model.config.vocab_size, dtype=torch.float32, device=dev)
        self.fused = FusedDecodeStep(model, layer_kernel=self.decode_path in ("layer", "stack"),
                                     stack=self.decode_path == "stack") \
            if self.decode_path in ("fused", "layer", "stack") else None
        self.compiled = bool(compile)
        self._fn = torch.compile(self._step_inplace, fullgraph=True, dynamic=False, mode=mode) if compile \
            else self._step_inplace
        self._warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None

    # -- the step, on the buffers --------------------------------------------------------------
    @torch.no_grad()
    def _step_inplace(self) -> None:
        if self.fused is not None:
            logits = self.fused(self.ids, self.states, self.position, stacks=self.state_stacks)
        else:
            logits, _ = self.model.step(self.ids, self.buffers, inplace=True,
                                        decode_kernel=self.decode_path == "kernel")
        self.logits.copy_(logits)
        self.position.add_(1)               # (new.position would be one more kernel per step)

    def _buffers(self) -> list[Tensor]:
        return [self.ids, self.position, self.logits, *self.states]

    def capture(self) -> None:
        """Warm up and capture the step graph; the buffers' contents are kept (restored after the
        warm-up runs, which advance them). Called by the first ``step`` when ``cuda_graph``."""
        if not self.cuda_graph or self.graph is not None:
            return
        saved = [b.clone() for b in self._buffers()]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self._warmup):
                self._fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._fn()
        for b, s in zip(self._buffers(), saved):
            b.copy_(s)
        self.graph = g

    def replay(self) -> None:
        """One step on the buffers as they are (``ids`` already written): the graph's replay on CUDA
        (capturing it the first time), the eager or compiled step elsewhere. What a benchmark times."""
        if self.cuda_graph:
            self.capture()
            self.graph.replay()
        else:
            self._fn()

    def refresh_weights(self) -> None:
        """The fused path's stacked l1|l2 copies follow the model's parameters: re-copy the layers whose
        parameters changed (``FusedDecodeStep.refresh``; a copy that needed new storage drops the captured
        graph, re-captured on the next step). ``step`` calls it; a no-op on the other paths."""
        if self.fused is not None and self.fused.refresh()[1]:
            self.graph = None

    # -- state in and out ---------------------------------------------------------------------
    def reset(self, state=None, position=None) -> None:
        """Zero state at position 0, or load ``state``: a ``RecurrentState`` (its positions are used unless
        ``position`` is given) or a plain sequence of per-layer tensors with ``position`` (an int or [B])."""
        pos = 0 if position is None else position
        if isinstance(pos, Tensor):
            if tuple(pos.shape) not in ((), (self.batch_size,)) or pos.is_floating_point() or pos.dtype == torch.bool:
                raise ValueError(f"`position` must be an int or an int tensor [B] = [{self.batch_size}], got "
                                 f"{pos.dtype} {tuple(pos.shape)}")
            if bool((pos < 0).any()):
                raise ValueError(f"`position` must be >= 0, got {pos.tolist()}")
        elif not (isinstance(pos, int) and not isinstance(pos, bool) and pos >= 0):
            raise ValueError(f"`position` must be an int >= 0 or an int tensor [B], got {pos!r}")
        if state is None:
            for b in self.states:
                b.zero_()
        else:
            if not isinstance(state, RecurrentState) and isinstance(state, (list, tuple)) and position is not None:
                state = RecurrentState(list(state), pos if isinstance(pos, int) else pos.reshape(-1).expand(
                    self.batch_size).to(self.device))
            state = self.model.validate_state(state, self.batch_size)
            for b, S in zip(self.states, state):
                b.copy_(S)
            if position is None:
                pos = state.position
        if isinstance(pos, Tensor):
            self.position.copy_(pos)
        else:
            self.position.fill_(pos)

    def reset_rows(self, rows) -> None:
        """Start new sequences in ``rows`` (indices or a bool mask [B]): zero state, position 0; the other rows
        keep their state and position. No re-capture."""
        self.buffers.reset_rows(rows)

    def load_rows(self, rows, state: RecurrentState) -> None:
        """Copy ``state`` (as many rows as ``rows``, e.g. a prompt prefilled alone with ``model.prefill``) and
        its positions into ``rows``; the other rows are untouched. No re-capture."""
        self.buffers.load_rows(rows, state)

    def state(self) -> RecurrentState:
        """A copy of the buffers as a ``RecurrentState`` (the shared position as an int when all rows agree)."""
        pos = self.position.cpu()
        shared = pos.numel() and not bool((pos != pos[0]).any())
        return RecurrentState([b.clone() for b in self.states], int(pos[0]) if shared else self.position.clone())

    # -- decoding -------------------------------------------------------------------------------
    def _check_rows(self, ids: Tensor, name: str, ndim: int) -> None:
        check_token_ids(ids, name, ndim, self.model.config.vocab_size)
        if ids.shape[0] != self.batch_size:
            raise ValueError(f"`{name}` must have {self.batch_size} rows (the decoder's batch_size), got {ids.shape[0]}")

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Parallel prefill of ``input_ids`` [B, T] from the zero state into the buffers; returns the
        last position's logits [B, V] fp32."""
        self._check_rows(input_ids, "input_ids", 2)
        dev = self.device
        logits, st = self.model.prefill(input_ids.to(dev),
                                        attention_mask=None if attention_mask is None else attention_mask.to(dev))
        self.reset(st)
        return logits[:, -1].float()

    @torch.no_grad()
    def step(self, token_ids: Tensor, state=None):
        """One token per row: ``token_ids`` [B] -> logits [B, V] fp32 (a fresh tensor); the buffers
        advance by one. The state lives in the buffers: ``state`` is only for the decoder protocol,
        which passes back what ``start`` returned (``buffers``); then (logits, buffers) is returned."""
        if state is not None and state is not self.buffers:
            raise TypeError("CudaGraphDecoder keeps its state in static buffers: load one with `reset(state)` or "
                            f"`load_rows(rows, state)`, then call step(token_ids); got a state of type "
                            f"{type(state).__name__}")
        self._check_rows(token_ids, "token_ids", 1)
        self.refresh_weights()
        self.ids.copy_(token_ids.to(self.device, non_blocking=True))
        self.replay()
        return self.logits.clone() if state is None else (self.logits.clone(), state)

    # the decoder protocol of tnllm.generate: start(ids, mask) -> (logits, state); step(tokens, state)
    def start(self, ids: Tensor, mask: Tensor | None):
        return self.prefill(ids, mask), self.buffers

    def generate(self, input_ids: Tensor, max_new_tokens: int = 32, temperature: float = 0.0, **kwargs) -> Tensor:
        """``tnllm.generate`` through the buffers (same arguments): [B, T + n] int64 on the model's device."""
        from tnllm.generate import generate
        return generate(self, input_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                        **kwargs).to(self.device)
