"""Continuous batching over the static rows of a ``SlotBatch``, in one background thread that owns the model.

Each request takes a free row (slot) for its whole life: its prompt is prefilled into that row between two
decode steps (the requests admitted together share one packed prefill, their prompts end to end), then every decode step advances all busy rows together, each at
its own position. A request that finishes (max_tokens, the end-of-text token, a stop string) or is
cancelled (its client went away) gives its row back at once, and the next waiting request is prefilled
into it while the other rows keep decoding. Rows are handed out lowest first, and a step covers the rows
up to the highest busy one, so few idle rows are stepped.

Sampling is per request, on the CPU, with ``tnllm.generate``'s own functions in the same order
(repetition penalty, then ``sample_next`` with the request's temperature, top-k, top-p and its own
``torch.Generator`` seeded from ``seed``): a request's tokens are those ``tnllm.generate`` gives for the
same prompt, seed and settings, whatever else runs beside it. The logits themselves can differ from a
batch-1 run in the last bits (a matrix product of several rows is not rounded like one of a single
row), so an exact near-tie between two tokens can go the other way.

Requests talk to the engine through a bounded queue (``submit``) and a callback (``deliver``) that the
engine calls from its thread with a list of ``(request, Event)`` after each prefill round and each step.
"""
from __future__ import annotations

import collections
import heapq
import secrets
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..generate import apply_repetition_penalty, check_sampling, sample_next
from .backend import SlotBatch
from .text import TextStream


class QueueFull(RuntimeError):
    """The engine holds ``max_batch + max_queue`` requests already."""


class EngineStopped(RuntimeError):
    """The engine is shutting down or has stopped."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be an int >= 0, got {self.max_tokens!r}")
        check_sampling(self.temperature, self.top_k, self.top_p, self.repetition_penalty)


@dataclass
class Event:
    """What one request produced since the last event: new text (may be empty), the new token ids, and,
    on the last event, ``finish_reason`` ("stop" or "length"; "cancelled"; "error" with ``error``)."""
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    tag: object = None                       # the caller's handle, returned with its events
    id: int = 0
    row: int | None = None
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    t_submit: float = 0.0
    t_first: float | None = None
    _gen: torch.Generator | None = None
    _seen: torch.Tensor | None = None
    _text: TextStream | None = None
    _pending: list[int] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.generated)


class Engine:
    """Continuous batching over ``max_batch`` slots with a queue of at most ``max_queue`` waiting requests.

    Args:
        model: a ``TransNormerLLM`` (eval mode; its device is where the state lives).
        tokenizer: ``decode`` for the streamed text and ``eos_id``.
        max_batch: slots (rows of the batched state), i.e. requests decoded together.
        max_queue: requests that may wait for a slot; past ``max_batch + max_queue`` in flight,
            ``submit`` raises ``QueueFull``.
        deliver: ``deliver(list[(tag, Event)])``, called from the engine thread.
        prefill_budget: prompt tokens prefilled between two decode steps while other rows are busy
            (at least one prompt is always admitted): bounds the pause a burst of new prompts puts on
            the running streams.
        cuda_graph, compile, decode_path: passed to ``SlotBatch`` (``decode_path`` "auto": the fused step on
            CUDA where the model allows it, ``model.step`` elsewhere).
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_queue: int = 64,
                 deliver: Callable[[list], None] | None = None, prefill_budget: int = 4096,
                 cuda_graph: bool | None = None, compile: bool = False, decode_path: str = "auto"):
        if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 0:
            raise ValueError(f"max_queue must be an int >= 0, got {max_queue!r}")
        if not isinstance(prefill_budget, int) or prefill_budget < 1:
            raise ValueError(f"prefill_budget must be an int >= 1, got {prefill_budget!r}")
        self.slots = SlotBatch(model, max_batch, cuda_graph=cuda_graph, compile=compile, decode_path=decode_path)
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.vocab_size = model.config.vocab_size
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self.pad_id = self.slots.pad_id
        self.prefill_budget = prefill_budget
        self.deliver = deliver or (lambda events: None)
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._cancels: list[Request] = []
        self._active: dict[int, Request] = {}             # row -> request
        self._free = list(range(max_batch))                # a heap: lowest row first
        self._next_id = 0
        self._running = False
        self._thread: threading.Thread | None = None
        self.error: str | None = None                      # the last failure's traceback
        self.stopped: str | None = None                    # why the engine stopped itself (a device failure)
        self.stats = {"requests": 0, "finished": 0, "cancelled": 0, "rejected": 0, "steps": 0,
                      "prefill_batches": 0, "prefill_tokens": 0, "generated_tokens": 0}

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, warmup: bool = True) -> "Engine":
        """Start the engine thread; with ``warmup``, a first prefill and step run (and the CUDA graphs are
        captured) before this returns, so the first request does not pay for them."""
        if self._thread is not None:
            return self
        self._running = True
        ready = threading.Event()
        failure: list[BaseException] = []

        def main():
            try:
                if warmup:
                    self.slots.warmup()
            except BaseException as e:       # reported to start()'s caller
                failure.append(e)
                self._running = False
                ready.set()
                return
            ready.set()
            self._loop()

        self._thread = threading.Thread(target=main, name="tnllm-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the thread; waiting and running requests end with ``finish_reason="error"``."""
        with self._cv:
            self._running = False
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._running

    # -- requests (any thread) ---------------------------------------------------------------------
    def submit(self, items: Sequence[tuple[list[int], SamplingParams, object]]) -> list[Request]:
        """Queue requests ``(prompt_ids, params, tag)`` all together or none (``QueueFull``)."""
        reqs = []
        for ids, params, tag in items:
            if not ids:
                raise ValueError("a prompt must hold at least one token")
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got min {min(ids)}, "
                                 f"max {max(ids)}")
            reqs.append(Request(list(ids), params, tag))
        with self._cv:
            if not self._running:
                raise EngineStopped("the engine is not running")
            in_flight = len(self._waiting) + len(self._active)
            if in_flight + len(reqs) > self.max_batch + self.max_queue:
                self.stats["rejected"] += len(reqs)
                raise QueueFull(f"the server is at capacity: {len(self._active)} of {self.max_batch} slots busy "
                                f"and {len(self._waiting)} of {self.max_queue} queue places taken")
            now = time.perf_counter()
            for r in reqs:
                r.id, r.t_submit = self._next_id, now
                self._next_id += 1
                self._waiting.append(r)
            self.stats["requests"] += len(reqs)
            self._cv.notify_all()
        return reqs

    def cancel(self, req: Request) -> None:
        """Drop a request: a waiting one leaves the queue now, a running one frees its slot before the next
        step. No further events are delivered for it."""
        with self._cv:
            if req.done or req.cancelled:
                return
            req.cancelled = True
            try:
                self._waiting.remove(req)
                req.done = True
                self.stats["cancelled"] += 1
            except ValueError:
                self._cancels.append(req)
                self._cv.notify_all()

    def snapshot(self) -> dict:
        with self._cv:
            return {"slots": self.max_batch, "busy": len(self._active), "queued": len(self._waiting),
                    "max_queue": self.max_queue, "alive": self.alive, **self.stats,
                    **({"stopped": self.stopped} if self.stopped else {})}

    # -- the engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while self._running and not (self._waiting or self._cancels or self._active):
                    self._cv.wait()
                if not self._running:
                    break
                cancels, self._cancels = self._cancels, []
                for r in cancels:
                    if r.row is not None and self._active.get(r.row) is r:
                        self._release(r)
                        self.stats["cancelled"] += 1
                admit = []
                budget = self.prefill_budget if self._active else None
                while self._free and self._waiting:
                    if budget is not None and admit and budget < len(self._waiting[0].prompt_ids):
                        break
                    r = self._waiting.popleft()
                    r.row = heapq.heappop(self._free)
                    self._active[r.row] = r
                    admit.append(r)
                    if budget is not None:
                        budget -= len(r.prompt_ids)
            events = []
            if admit:
                try:
                    self._prefill(admit, events)
                except Exception as e:     # past the prefill itself (sampling, say): the admitted requests end
                    self.error = traceback.format_exc(limit=3)
                    hit = [r for r in admit if not r.done]      # the others have had their last event
                    with self._cv:
                        for r in hit:
                            self._release(r)
                    events += [(r.tag, Event("", [], "error", f"internal error: {type(e).__name__}: {e}"))
                               for r in hit]
            if events:
                self.deliver(events)
            try:
                events = []
                if self._active:
                    self._step(events)
                if events:
                    self.deliver(events)
            except Exception:              # a model failure ends the requests it touched, not the server
                msg = traceback.format_exc(limit=3)
                self.error = msg
                with self._cv:
                    victims = list(self._active.values())
                    for r in victims:
                        self._release(r)
                self.deliver([(r.tag, Event("", [], "error", "internal error: " + msg.strip().splitlines()[-1]))
                              for r in victims if not r.cancelled])
        with self._cv:
            victims = list(self._active.values()) + list(self._waiting)
            self._waiting.clear()
            for r in list(self._active.values()):
                self._release(r)
            for r in victims:
                r.done = True
        why = (self.stopped or "the server is shutting down").splitlines()[0]
        self.deliver([(r.tag, Event("", [], "error", why)) for r in victims if not r.cancelled])

    def _release(self, r: Request) -> None:
        """Free r's slot (under the lock). If the slot cannot be reset (the device failed: a CUDA error is
        sticky, every later launch fails too), the engine stops: every request still in flight ends with an
        error event, ``/health`` answers 503 and new requests are refused, instead of the thread dying and its
        streams hanging."""
        r.done = True
        if r.row is not None and self._active.get(r.row) is r:
            del self._active[r.row]
            try:
                self.slots.free(r.row)
            except Exception as e:
                if self._running:
                    self.stopped = f"the engine stopped: a slot could not be reset: {type(e).__name__}: {e}"
                    print(f"tnllm serve: {self.stopped}; the first error:\n{self.error}", file=sys.stderr, flush=True)
                self._running = False
                return                                  # the row's state is unknown: never handed out again
            heapq.heappush(self._free, r.row)

    def _prefill(self, admit: list[Request], events: list) -> None:
        """Prefill the admitted requests: all of them in one packed prefill (prompts end to end), each
        prompt's state loaded into its row, then one token sampled for each. If the packed prefill fails
        (out of memory, say), each prompt is retried alone, so only a prompt that fails by itself ends."""
        todo = []
        for r in admit:
            p = r.params
            r._gen = torch.Generator().manual_seed(int(p.seed) if p.seed is not None else secrets.randbits(63))
            r._text = TextStream(self.tokenizer, r.prompt_ids, p.stop)
            if p.repetition_penalty != 1.0:
                r._seen = torch.zeros(1, self.vocab_size, dtype=torch.bool)
                r._seen[0, torch.tensor(r.prompt_ids)] = True
            if p.max_tokens == 0:           # nothing to generate: the prompt is not even read
                self._finish(r, "length", events)
            else:
                todo.append(r)
        if not todo:
            return
        try:
            logits = self.slots.prefill_rows([r.row for r in todo], [r.prompt_ids for r in todo])
        except Exception:
            if len(todo) == 1:
                self._prefill_failed(todo[0], events)
                return
            ok, rows = [], []
            for r in todo:
                try:
                    rows.append(self.slots.prefill_into(r.row, r.prompt_ids))
                    ok.append(r)
                except Exception:
                    self._prefill_failed(r, events)
            if not ok:
                return
            todo, logits = ok, torch.stack(rows)
        self.stats["prefill_tokens"] += sum(len(r.prompt_ids) for r in todo)
        self.stats["prefill_batches"] += 1
        self._advance(todo, logits, events)

    def _prefill_failed(self, r: Request, events: list) -> None:
        e = sys.exc_info()[1]
        self.error = traceback.format_exc(limit=3)
        with self._cv:
            self._release(r)
        events.append((r.tag, Event("", [], "error", f"internal error: {type(e).__name__}: {e}")))

    def _step(self, events: list) -> None:
        rows = max(self._active) + 1
        tokens = [self.pad_id] * rows
        live = [self._active[i] for i in sorted(self._active)]
        for r in live:
            tokens[r.row] = r.generated[-1]
        logits = self.slots.step(torch.tensor(tokens, dtype=torch.int64).to(self.slots.device, non_blocking=True))
        self.stats["steps"] += 1
        self._advance(live, logits[[r.row for r in live]] if len(live) < rows else logits, events)

    def _advance(self, reqs: list[Request], logits: torch.Tensor, events: list) -> None:
        """Sample one token for each request from its logits row (logits [len(reqs), V])."""
        greedy = [i for i, r in enumerate(reqs) if r.params.temperature == 0 and r.params.repetition_penalty == 1.0]
        nxt = [0] * len(reqs)
        if greedy:
            g = logits if len(greedy) == len(reqs) else logits[greedy]
            for i, t in zip(greedy, g.argmax(-1).tolist()):
                nxt[i] = t
        if len(greedy) < len(reqs):
            g = set(greedy)
            rest = [i for i in range(len(reqs)) if i not in g]
            cpu = logits[rest].float().cpu()
            for j, i in enumerate(rest):
                r, p = reqs[i], reqs[i].params
                row = cpu[j:j + 1]
                if r._seen is not None:
                    row = apply_repetition_penalty(row, r._seen, float(p.repetition_penalty))
                nxt[i] = int(sample_next(row, float(p.temperature), p.top_k, p.top_p, r._gen)[0])
        now = time.perf_counter()
        self.stats["generated_tokens"] += len(reqs)
        for r, t in zip(reqs, nxt):
            r.generated.append(t)
            if r.t_first is None:
                r.t_first = now
            if r._seen is not None:
                r._seen[0, t] = True
            if t == self.eos_id and not r.params.ignore_eos:
                self._finish(r, "stop", events, [t])
                continue
            text, stopped = r._text.push(t)
            if stopped:
                self._finish(r, "stop", events, [t], text)
            elif len(r.generated) >= r.params.max_tokens:
                self._finish(r, "length", events, [t], text + r._text.finish())
            else:
                events.append((r.tag, Event(text, [t])))

    def _finish(self, r: Request, reason: str, events: list, ids: list[int] = (), text: str = "") -> None:
        with self._cv:
            self._release(r)
            self.stats["finished"] += 1
        if reason == "stop" and r._text is not None and not r._text.stopped:
            text += r._text.finish()          # end-of-text: what is held back for a stop string is text
        events.append((r.tag, Event(text, list(ids), reason)))
