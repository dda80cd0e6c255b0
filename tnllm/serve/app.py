"""The HTTP face (Starlette, run by uvicorn): OpenAI-compatible ``POST /v1/completions`` (JSON or
server-sent events), ``GET /v1/models``, ``GET /health``.

Each prompt of a request is one engine request (one slot). Events come from the engine thread in one
batch per step and are handed to the event loop with a single ``call_soon_threadsafe``; each HTTP request
has one sink (a list and a future: one wakeup per step whatever the number of its events, no queue put per
token). A stream sends everything it has pending in one write, a prompt's pending events merged into one
chunk (their text and token ids joined), so a slow client gets fewer, larger chunks instead of falling
behind; the JSON of a chunk is the request's fixed head and tail around the encoded text. A stream whose client goes away is cancelled (its slot freed before the next decode step); a
non-streaming request checks for a disconnect twice a second while it waits.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import Engine, EngineStopped, Event, QueueFull
from .protocol import APIError, CompletionRequest, parse_completion

MAX_BODY = 8 * 2 ** 20          # bytes of a request body


def _error(e: APIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class _Sink:
    """Where one HTTP request's events land on the event loop: ``push`` appends (and wakes the waiter),
    ``take`` waits until something is there and returns all of it."""
    __slots__ = ("items", "waiter")

    def __init__(self):
        self.items: list = []
        self.waiter: asyncio.Future | None = None

    def push(self, item) -> None:
        self.items.append(item)
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def take(self, timeout: float | None = None) -> list:
        """Everything pending, waiting for it when there is none; [] after ``timeout`` seconds."""
        if not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                if timeout is None:
                    await self.waiter
                else:
                    await asyncio.wait_for(self.waiter, timeout)
            except asyncio.TimeoutError:
                return []
            finally:
                self.waiter = None
        items, self.items = self.items, []
        return items


class _Choice:
    """The engine's tag for one prompt of one HTTP request: where its events go."""
    __slots__ = ("sink", "index")

    def __init__(self, sink: _Sink, index: int):
        self.sink, self.index = sink, index


def merge_events(pending: list[tuple[int, Event]]) -> list[tuple[int, Event]]:
    """Each prompt's pending events as one (index, Event): the text and token ids joined in order, the
    last finish reason; the first error event stops the merge and comes last. Indices keep the order of
    their first event."""
    out: dict[int, Event] = {}
    for i, ev in pending:
        if ev.finish_reason == "error":
            return list(out.items()) + [(i, ev)]
        prev = out.get(i)
        if prev is None:
            out[i] = Event(ev.text, list(ev.token_ids), ev.finish_reason)
        else:
            prev.text += ev.text
            prev.token_ids += ev.token_ids
            prev.finish_reason = ev.finish_reason or prev.finish_reason
    return list(out.items())


class CompletionServer:
    """Routes over one started ``Engine``; ``app`` is the Starlette application."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, *, max_prompt_tokens: int,
                 max_tokens: int, max_positions: int | None = None):
        self.engine, self.tok, self.model_name = engine, tokenizer, model_name
        self.max_prompt_tokens, self.max_tokens, self.max_positions = max_prompt_tokens, max_tokens, max_positions
        self.created = int(time.time())
        self.loop: asyncio.AbstractEventLoop | None = None
        self.app = Starlette(
            routes=[Route("/v1/completions", self.completions, methods=["POST"]),
                    Route("/v1/models", self.models, methods=["GET"]),
                    Route("/v1/models/{model:path}", self.model_info, methods=["GET"]),
                    Route("/health", self.health, methods=["GET"])],
            exception_handlers={HTTPException: self._http_error, Exception: self._server_error},
            lifespan=self._lifespan)

    # -- plumbing -------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self.loop = asyncio.get_running_loop()
        self.engine.deliver = self._deliver
        yield
        self.engine.stop()

    def _deliver(self, events: list) -> None:          # engine thread
        self.loop.call_soon_threadsafe(self._dispatch, events)

    @staticmethod
    def _dispatch(events: list) -> None:               # event loop
        for choice, ev in events:
            choice.sink.push((choice.index, ev))

    async def _http_error(self, request, exc: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return _error(APIError(exc.status_code, msg.get(exc.status_code, str(exc.detail)), code=kind))

    async def _server_error(self, request, exc: Exception):
        return _error(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

    async def _json_body(self, request: Request):
        n = request.headers.get("content-length")
        if n is not None and n.isdigit() and int(n) > MAX_BODY:
            raise APIError(413, f"the request body is {n} bytes, more than {MAX_BODY}", code="request_too_large")
        chunks, size = [], 0
        async for c in request.stream():
            size += len(c)
            if size > MAX_BODY:
                raise APIError(413, f"the request body is more than {MAX_BODY} bytes", code="request_too_large")
            chunks.append(c)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    # -- routes -----------------------------------------------------------------------------------
    async def health(self, request):
        s = self.engine.snapshot()
        ok = s["alive"]
        return JSONResponse({"status": "ok" if ok else "error", "model": self.model_name, **s},
                            status_code=200 if ok else 503)

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "tnllm"}

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model_info(self, request):
        if request.path_params["model"] != self.model_name:
            return _error(APIError(404, f"The model '{request.path_params['model']}' does not exist",
                                   param="model", code="model_not_found"))
        return JSONResponse(self._model_card())

    def _encode(self, req: CompletionRequest) -> list[list[int]]:
        out, V, bos = [], self.engine.vocab_size, getattr(self.tok, "bos_id", None)
        for i, p in enumerate(req.prompts):
            if isinstance(p, str):
                ids = ([bos] if bos is not None else []) + self.tok.encode(p)
            else:
                ids = p
                if min(ids) < 0 or max(ids) >= V:
                    raise APIError(400, f"prompt {i}: token ids must be in [0, {V}), got min {min(ids)}, max "
                                        f"{max(ids)}", param="prompt", code="invalid_value")
            if not ids:
                raise APIError(400, f"prompt {i} is empty and the tokenizer has no beginning-of-text token",
                               param="prompt", code="invalid_value")
            if len(ids) > self.max_prompt_tokens:
                raise APIError(400, f"prompt {i} is {len(ids)} tokens, more than this server's limit of "
                                    f"{self.max_prompt_tokens}", param="prompt", code="context_length_exceeded")
            if self.max_positions is not None and len(ids) + req.params.max_tokens > self.max_positions:
                raise APIError(400, f"prompt {i} is {len(ids)} tokens; with max_tokens {req.params.max_tokens} it "
                                    f"exceeds the model's {self.max_positions} positions", param="max_tokens",
                               code="context_length_exceeded")
            out.append(ids)
        return out

    async def completions(self, request: Request):
        try:
            body = await self._json_body(request)
            req = parse_completion(body, max_tokens_limit=self.max_tokens)
            if req.model is not None and req.model != self.model_name:
                raise APIError(404, f"The model '{req.model}' does not exist (this server has '{self.model_name}')",
                               param="model", code="model_not_found")
            ids = self._encode(req)
            queue = _Sink()
            try:
                handles = self.engine.submit([(p, req.params, _Choice(queue, i)) for i, p in enumerate(ids)])
            except QueueFull as e:
                raise APIError(503, f"{e}; retry later", code="server_overloaded") from None
            except EngineStopped as e:
                raise APIError(503, str(e), code="engine_stopped") from None
        except APIError as e:
            return _error(e, {"Retry-After": "1"} if e.status == 503 else None)
        except ClientDisconnect:
            return Response(status_code=400)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name}
        if req.stream:
            return StreamingResponse(self._stream(req, ids, handles, queue, meta), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(request, req, ids, handles, queue, meta)

    def _cancel(self, handles) -> None:
        for h in handles:
            if not h.done:
                self.engine.cancel(h)

    @staticmethod
    def _usage(ids, handles) -> dict:
        p = sum(len(x) for x in ids)
        c = sum(h.completion_tokens for h in handles)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def _collect(self, request, req, ids, handles, queue, meta):
        n = len(ids)
        texts = [self.tok.decode(p) if req.echo else "" for p in ids]
        tokens: list[list[int]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        left, checked = n, time.monotonic()
        try:
            while left:
                got = await queue.take(0.5)
                if time.monotonic() - checked > 0.5:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return Response(status_code=499)     # nobody reads it; the slots are freed below
                for i, ev in got:
                    if ev.finish_reason == "error":
                        self._cancel(handles)
                        return _error(APIError(503 if "shutting down" in (ev.error or "") else 500, ev.error))
                    texts[i] += ev.text
                    tokens[i] += ev.token_ids
                    if ev.finish_reason:
                        finish[i] = ev.finish_reason
                        left -= 1
        finally:
            self._cancel(handles)
        choices = []
        for i in range(n):
            c = {"text": texts[i], "index": i, "logprobs": None, "finish_reason": finish[i]}
            if req.return_token_ids:
                c["prompt_token_ids"], c["token_ids"] = ids[i], tokens[i]
            choices.append(c)
        return JSONResponse({**meta, "choices": choices, "usage": self._usage(ids, handles)})

    async def _stream(self, req, ids, handles, queue, meta):
        head = "data: " + json.dumps(meta, ensure_ascii=False, separators=(",", ":"))[:-1] + ',"choices":[{"text":'
        with_ids = req.return_token_ids

        def chunk(i: int, text: str, finish: str | None, token_ids=None, prompt_ids=None) -> str:
            parts = [head, json.dumps(text, ensure_ascii=False), ',"index":', str(i), ',"logprobs":null,"finish_reason":',
                     "null" if finish is None else json.dumps(finish)]
            if with_ids:
                parts += [',"token_ids":[', ",".join(map(str, token_ids or ())), "]"]
                if prompt_ids is not None:
                    parts += [',"prompt_token_ids":[', ",".join(map(str, prompt_ids)), "]"]
            parts.append("}]}\n\n")
            return "".join(parts)

        left = len(ids)
        try:
            first = [chunk(i, self.tok.decode(p), None, prompt_ids=p) for i, p in enumerate(ids)] if req.echo else []
            if first:
                yield "".join(first)
            while left:
                out = []
                for i, ev in merge_events(await queue.take()):
                    if ev.finish_reason == "error":
                        err = APIError(503 if "shutting down" in (ev.error or "") else 500, ev.error)
                        out.append("data: " + json.dumps(err.body()) + "\n\ndata: [DONE]\n\n")
                        yield "".join(out)
                        return
                    if ev.text or ev.finish_reason or (with_ids and ev.token_ids):
                        out.append(chunk(i, ev.text, ev.finish_reason, ev.token_ids))
                    if ev.finish_reason:
                        left -= 1
                if req.include_usage and not left:
                    out.append("data: " + json.dumps({**meta, "choices": [], "usage": self._usage(ids, handles)})
                               + "\n\n")
                if not left:
                    out.append("data: [DONE]\n\n")
                if out:
                    yield "".join(out)
        finally:        # a client that went away (or any early exit) gives its slots back now
            self._cancel(handles)
