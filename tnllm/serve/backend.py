"""The only module of ``tnllm.serve`` that calls into the model: ``SlotBatch``, a fixed set of rows of one
batched recurrent state, each row its own stream at its own position.

Buffers (``n_slots`` rows, allocated once, so memory is constant per stream and does not grow with the
generated length): per-layer states [n_slots, H, Dk, Dv] fp32 (fp64 for an fp64 model), ``position``
[n_slots] int64 (each row's LRPE offset), ``ids`` [n_slots] int64 and ``logits`` [n_slots, V].

* ``prefill_into(row, ids)``: the prompt's blocked prefill at batch 1 (``model.prefill``), its final state
  copied into that row; returns the last position's logits [V].
* ``prefill_rows(rows, prompts)``: several prompts in one packed prefill (``model.prefill(ids,
  cu_seqlens=...)``, the prompts end to end, no padding), each prompt's final state loaded into its row
  (``RecurrentState.load_rows``); returns each prompt's last-position logits [N, V].
* ``step(tokens, rows)``: one recurrent step of the first ``rows`` rows together (each at its own
  position); returns their logits [rows, V], a view of the static buffer valid until the next call.
  Rows past the busy ones inside that prefix are idle: they are stepped too and their logits ignored.
  On CUDA the step is captured in a CUDA graph once per slot count: counts are rounded up to a bucket
  (1, 2, 4, ... up to ``n_slots``) so at most log2(n_slots) + 1 graphs exist, sharing one memory pool.
  Elsewhere the step runs eagerly over exactly ``rows`` rows (compiled: over the bucket, like on CUDA).
* ``free(row)``: zeroes the row's state and position (an idle row then steps a pad token from a zero
  state, which keeps it finite whatever the weights).

The step is one of the decode paths of ``tnllm.compile.CudaGraphDecoder`` (``decode_path``): by default on
CUDA ``FusedDecodeStep`` (six device operations per layer, the two norms folded into the kernels), where the
model allows it; else the model's public ``model.step(ids, RecurrentState(states, position), inplace=True)``.
Either way the state carries one position per row, so rows at different positions step together, and each
layer's new state is written straight into the slot buffers (no copy of the state per step). On CPU, and for
fp64 weights, the default is ``model.step`` (bit-identical to ``tnllm.generate``); the fused step's roundings
differ from it at the dtype's epsilon.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tnllm.model import RecurrentState


def _buckets(n: int) -> list[int]:
    out, b = [], 1
    while b < n:
        out.append(b)
        b *= 2
    return out + [n]


class SlotBatch:
    """``n_slots`` static rows of a batched recurrent state of a ``TransNormerLLM``.

    Args:
        model: a ``TransNormerLLM`` in eval mode (any dtype; the state stays fp32, fp64 for fp64).
        n_slots: the number of rows (concurrent streams), fixed.
        cuda_graph: capture the step in CUDA graphs; default True on CUDA, False elsewhere.
        compile: ``torch.compile`` the step (``fullgraph``, static shapes: one graph per bucket); on CUDA
            the compiled step is what the CUDA graphs capture.
        decode_path: ``"auto"`` (default), ``"aten"``, ``"kernel"``, ``"fused"`` or ``"layer"``, as in
            ``CudaGraphDecoder`` (not ``"stack"``, whose launches need stacked states); ``self.decode_path`` is the
            path chosen.
    """

    def __init__(self, model, n_slots: int, *, cuda_graph: bool | None = None, compile: bool = False,
                 decode_path: str = "auto"):
        from tnllm.model import TransNormerLLM
        if not isinstance(model, TransNormerLLM):
            raise TypeError(f"`model` must be a TransNormerLLM (the Transformer baseline has a growing KV cache, "
                            f"not a fixed-size state), got {type(model).__name__}")
        if not isinstance(n_slots, int) or isinstance(n_slots, bool) or n_slots < 1:
            raise ValueError(f"`n_slots` must be an int >= 1, got {n_slots!r}")
        self.model = model.eval()
        self.device = model.lm_head.weight.device
        self.n_slots = n_slots
        self.vocab_size = model.config.vocab_size
        self.pad_id = model.config.pad_token_id
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"`cuda_graph=True` needs the model on a CUDA device, it is on {self.device}")
        from tnllm.compile.decode import resolve_decode_path
        from tnllm.compile.fused_step import FusedDecodeStep
        if decode_path == "stack":
            raise ValueError("decode_path='stack' needs one stacked state tensor per run of layers, and a slot batch "
                             "runs views of its first rows (the active slots): use 'layer' (one launch per layer) "
                             "or 'auto'")
        self.decode_path = resolve_decode_path(model, decode_path)
        # "layer" (asked for explicitly): the fused step with each layer as one launch where it applies (<= 4 rows)
        self._fused = FusedDecodeStep(model, layer_kernel=self.decode_path == "layer") \
            if self.decode_path in ("fused", "layer") else None
        dev = self.device
        self.states = list(model.zero_state(n_slots, dev))
        self.position = torch.zeros(n_slots, dtype=torch.int64, device=dev)
        self.ids = torch.full((n_slots,), self.pad_id, dtype=torch.int64, device=dev)
        self.logits = torch.zeros(n_slots, self.vocab_size, dtype=torch.float32, device=dev)
        # compiled or captured steps exist once per bucket of row counts; an eager step takes any count
        self.buckets = _buckets(n_slots) if (self.cuda_graph or compile) else None
        self._fn = self._step_rows
        if compile:
            import torch._dynamo.config as dynamo_config
            step = torch.compile(self._step_rows, fullgraph=True, dynamic=False)
            name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
            limit = {name: max(getattr(dynamo_config, name), len(self.buckets) + 1)}

            def compiled(rows: int) -> None:       # one static-shape graph per bucket, past the default limit
                with dynamo_config.patch(**limit):
                    step(rows)
            self._fn = compiled
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None

    def state_bytes_per_slot(self) -> int:
        return sum(S[0].numel() * S.element_size() for S in self.states)

    # -- the step over the first `rows` rows, on the buffers -------------------------------------
    @torch.no_grad()
    def _step_rows(self, rows: int) -> None:
        states = [S[:rows] for S in self.states]                        # views of the buffers
        if self._fused is not None:
            self.logits[:rows].copy_(self._fused(self.ids[:rows], states, self.position[:rows]))
        else:
            logits, new = self.model.step(self.ids[:rows], RecurrentState(states, self.position[:rows]), inplace=True,
                                          decode_kernel=self.decode_path == "kernel")
            self.logits[:rows].copy_(logits)
            for buf, S in zip(states, new):
                if S.data_ptr() != buf.data_ptr():      # a layer that could not update in place (none today)
                    buf.copy_(S)
        self.position[:rows].add_(1)

    def _bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def capture(self, rows: int | None = None, warmup: int = 2) -> None:
        """Capture the CUDA graph of the bucket holding ``rows`` (every bucket when None); the buffers'
        contents are restored after the warm-up runs. A no-op without ``cuda_graph``."""
        if not self.cuda_graph:
            return
        todo = self.buckets if rows is None else [self._bucket(rows)]
        for b in todo:
            if b in self._graphs:
                continue
            bufs = [self.ids, self.position, self.logits, *self.states]
            saved = [t.clone() for t in bufs]
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self._fn(b)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool, capture_error_mode="thread_local"):   # other threads may use CUDA
                self._fn(b)
            for t, s in zip(bufs, saved):
                t.copy_(s)
            self._graphs[b] = g

    @torch.no_grad()
    def warmup(self) -> None:
        """One prefill and a step of every bucket (the first calls pay for lazy imports, compilation and
        kernel selection; on CUDA every graph is captured). Call it while no row is busy: it leaves every
        row free, at the zero state."""
        self.prefill_into(0, [self.pad_id])
        if self.cuda_graph:
            self.capture()
        else:
            for b in self.buckets or [1]:
                self._fn(b)
        for S in self.states:
            S.zero_()
        self.position.zero_()
        self.ids.fill_(self.pad_id)

    # -- the public face -------------------------------------------------------------------------
    def _check_row(self, row) -> None:
        if not isinstance(row, int) or isinstance(row, bool) or not 0 <= row < self.n_slots:
            raise ValueError(f"`row` must be an int in [0, {self.n_slots}), got {row!r}")

    @torch.no_grad()
    def prefill_into(self, row: int, prompt_ids: list[int] | Tensor) -> Tensor:
        """Blocked prefill of one prompt (batch 1, from the zero state) into ``row``; returns the logits
        [V] of its last position (fp32, on the model's device)."""
        self._check_row(row)
        ids = torch.as_tensor(prompt_ids, dtype=torch.int64).reshape(1, -1).to(self.device)
        if ids.shape[1] == 0:
            raise ValueError("`prompt_ids` must hold at least one token")
        logits, st = self.model.prefill(ids)
        for buf, S in zip(self.states, st):
            buf[row].copy_(S[0])
        self.position[row] = ids.shape[1]
        return logits[0, -1].float()

    @torch.no_grad()
    def prefill_rows(self, rows: list[int], prompts: list[list[int]]) -> Tensor:
        """One packed prefill of ``prompts`` (each from the zero state), prompt i loaded into ``rows[i]``;
        returns each prompt's last-position logits [N, V] (fp32, on the model's device)."""
        if not isinstance(rows, (list, tuple)) or not isinstance(prompts, (list, tuple)) or len(rows) != len(prompts) \
                or not rows:
            raise ValueError(f"`rows` and `prompts` must be non-empty lists of the same length, got "
                             f"{type(rows).__name__} of {len(rows) if hasattr(rows, '__len__') else '?'} and "
                             f"{type(prompts).__name__} of {len(prompts) if hasattr(prompts, '__len__') else '?'}")
        for r in rows:
            self._check_row(r)
        if len(set(rows)) != len(rows):
            raise ValueError(f"`rows` must be distinct, got {list(rows)}")
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError(f"every prompt must hold at least one token, prompt {lengths.index(0)} is empty")
        if len(prompts) == 1:
            return self.prefill_into(rows[0], prompts[0])[None]
        flat = [t for p in prompts for t in p]
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        ids = torch.tensor([flat], dtype=torch.int64).to(self.device, non_blocking=True)
        cu_seqlens = torch.tensor(cu, dtype=torch.int32).to(self.device, non_blocking=True)
        logits, st = self.model.prefill(ids, cu_seqlens=cu_seqlens, last_only=True)
        RecurrentState(self.states, self.position).load_rows(
            torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True), st)
        return logits[:, 0].float()

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """One token for each of the first ``rows = len(tokens)`` rows: ``tokens`` [rows] int64 (idle rows:
        any valid id, e.g. the pad id). Returns logits [rows, V] fp32, a view of the static buffer that the
        next ``step`` overwrites."""
        rows = int(tokens.shape[0])
        if tokens.dim() != 1 or not 1 <= rows <= self.n_slots:
            raise ValueError(f"`tokens` must be an int tensor [rows] with 1 <= rows <= {self.n_slots}, got "
                             f"{tuple(tokens.shape)}")
        if self.buckets is None:
            self.ids[:rows].copy_(tokens)
            self._fn(rows)
            return self.logits[:rows]
        b = self._bucket(rows)
        self.ids[:rows].copy_(tokens, non_blocking=True)
        if b > rows:
            self.ids[rows:b].fill_(self.pad_id)
        if not self.cuda_graph:
            self._fn(b)
            return self.logits[:rows]
        self.capture(b)
        self._graphs[b].replay()
        return self.logits[:rows]

    @torch.no_grad()
    def free(self, row: int) -> None:
        """Return ``row`` to the zero state at position 0."""
        self._check_row(row)
        for S in self.states:
            S[row].zero_()
        self.position[row] = 0
