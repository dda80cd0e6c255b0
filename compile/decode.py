"""Static-buffer recurrent decode: the state lives in fixed tensors, each step updates them in place,
so on CUDA the whole step (every layer, the head) is captured once in a ``torch.cuda.CUDAGraph`` and
replayed per token: one launch per token instead of hundreds.

Buffers (batch B fixed at construction): ``ids`` [B] int64, ``position`` [B] int64 (the LRPE offset
of each row, a tensor so the graph needs no re-capture as it grows), ``states`` (per-layer fp32
[B, H, Dk, Dv]) and ``logits`` [B, V] fp32. The math is the model's own step path
(``model._embed`` -> ``model._run(..., step=True)`` -> ``model._head``).

The same class runs on CPU without a graph (eager or compiled), which is how the static-buffer
logic is tested without a GPU. It also implements the ``start``/``step`` protocol of
``tnllm.generate``, so ``generate(CudaGraphDecoder(model, B), ids)`` decodes through the graph.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .policy import check_mode


class CudaGraphDecoder:
    """Batched decode with static state buffers (and a CUDA graph on CUDA).

    Args:
        model: a ``TransNormerLLM`` (any dtype; the state stays fp32).
        batch_size: B, fixed; ``start``/``prefill`` take exactly B rows.
        cuda_graph: capture the step in a CUDA graph; default True on CUDA, False elsewhere.
        compile: also ``torch.compile`` the step (``fullgraph``, static shapes) with ``mode``
            (fuses the small elementwise ops the graph would otherwise replay one by one).
        warmup: eager runs before capture (compiles, and lets cuBLAS pick its kernels).
    """

    def __init__(self, model, batch_size: int, *, cuda_graph: bool | None = None, compile: bool = False,
                 mode: str = "default", warmup: int = 2):
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
        self.batch_size = batch_size
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"`cuda_graph=True` needs the model on a CUDA device, it is on {self.device}")
        B, dev = batch_size, self.device
        self.ids = torch.zeros(B, dtype=torch.int64, device=dev)
        self.position = torch.zeros(B, dtype=torch.int64, device=dev)
        self.states = list(model.zero_state(B, dev))
        self.logits = torch.zeros(B, model.config.vocab_size, dtype=torch.float32, device=dev)
        self._fn = torch.compile(self._step_inplace, fullgraph=True, dynamic=False, mode=mode) if compile \
            else self._step_inplace
        self._warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None

    # -- the step, on the buffers --------------------------------------------------------------
    @torch.no_grad()
    def _step_inplace(self) -> None:
        m = self.model
        x, new = m._run(m._embed(self.ids)[:, None, :], self.states, self.position, step=True)
        self.logits.copy_(m._head(x)[:, 0])
        for buf, S in zip(self.states, new):
            buf.copy_(S)
        self.position.add_(1)

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

    # -- state in and out ---------------------------------------------------------------------
    def reset(self, state=None, position=None) -> None:
        """Zero state at position 0, or load ``state`` (a ``RecurrentState``: its ``offset`` is the
        position unless ``position`` (int or [B]) is given)."""
        if state is None:
            for b in self.states:
                b.zero_()
            pos = 0 if position is None else position
        else:
            if position is not None and isinstance(state, (list, tuple)) and not hasattr(state, "offset"):
                from tnllm.model import RecurrentState      # a plain sequence with its position given
                state = RecurrentState(list(state), 0)
            state = self.model._check_state(state, self.batch_size)
            for b, S in zip(self.states, state):
                b.copy_(S)
            pos = state.offset if position is None else position
        if isinstance(pos, Tensor):
            if tuple(pos.shape) not in ((), (self.batch_size,)) or pos.is_floating_point():
                raise ValueError(f"`position` must be an int or an int tensor [B] = [{self.batch_size}], got "
                                 f"{pos.dtype} {tuple(pos.shape)}")
            self.position.copy_(pos)
        elif isinstance(pos, int) and not isinstance(pos, bool) and pos >= 0:
            self.position.fill_(pos)
        else:
            raise ValueError(f"`position` must be an int >= 0 or an int tensor [B], got {pos!r}")

    def state(self):
        """A copy of the buffers as a ``RecurrentState`` (rows must share one position)."""
        from tnllm.model import RecurrentState
        pos = self.position.cpu()
        if (pos != pos[0]).any():
            raise ValueError(f"rows sit at different positions {pos.tolist()}: no single RecurrentState offset")
        return RecurrentState([b.clone() for b in self.states], int(pos[0]))

    # -- decoding -------------------------------------------------------------------------------
    def _check_rows(self, ids: Tensor, name: str, ndim: int) -> None:
        self.model._check_ids(ids, name, ndim)
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
        advance by one. The state lives in the buffers: ``state`` is only for ``generate``'s
        protocol, which passes back the marker ``start`` returned; then (logits, marker) is returned."""
        if state is not None and not isinstance(state, BufferState):
            raise TypeError("CudaGraphDecoder keeps its state in static buffers: load one with `reset(state)`, "
                            f"then call step(token_ids); got a state of type {type(state).__name__}")
        self._check_rows(token_ids, "token_ids", 1)
        self.ids.copy_(token_ids.to(self.device, non_blocking=True))
        if self.cuda_graph:
            self.capture()
            self.graph.replay()
        else:
            self._fn()
        return self.logits.clone() if state is None else (self.logits.clone(), state)

    # generate()'s decoder protocol: start(ids, mask) -> (logits, state); step(tokens, state)
    def start(self, ids: Tensor, mask: Tensor | None):
        return self.prefill(ids, mask), BufferState()

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Prefill then decode ``max_new_tokens`` per row; [B, T + n] int64 on the model's device
        (greedy at temperature 0; finished rows repeat ``eos_token_id``)."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"`max_new_tokens` must be an int >= 0, got {max_new_tokens!r}")
        if temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"`temperature` must be >= 0 and `top_k` None or >= 1, got {temperature}, {top_k}")
        ids = input_ids.to(self.device)
        if max_new_tokens == 0:
            self._check_rows(ids, "input_ids", 2)
            return ids
        logits = self.prefill(ids)
        out, done = [ids], torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        for i in range(max_new_tokens):
            nxt = _sample(logits, temperature, top_k, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            out.append(nxt[:, None])
            if i + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            logits = self.step(nxt)
        return torch.cat(out, dim=1)


class BufferState:
    """Marker passed through ``generate``: the state is in the decoder's buffers."""


def _sample(logits: Tensor, temperature: float, top_k: int | None, generator) -> Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    z = logits.float() / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    p = torch.softmax(z, dim=-1)
    if generator is not None and generator.device != p.device:
        return torch.multinomial(p.cpu(), 1, generator=generator)[:, 0].to(p.device)
    return torch.multinomial(p, 1, generator=generator)[:, 0]
