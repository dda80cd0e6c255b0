"""The OpenAI completions request: validation into ``CompletionRequest``, with OpenAI-style errors."""
from __future__ import annotations

from dataclasses import dataclass

from .engine import SamplingParams

MAX_STOP = 16          # stop strings per request (each is searched for after every token)


class APIError(Exception):
    """An error returned as ``{"error": {"message", "type", "param", "code"}}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class CompletionRequest:
    prompts: list               # list of str or of list[int]
    params: SamplingParams
    model: str | None
    stream: bool
    include_usage: bool
    echo: bool
    return_token_ids: bool


# field -> (what is accepted, for the messages)
_FIELDS = {
    "model": "a string", "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "max_tokens": "an integer >= 0", "temperature": "a number >= 0", "top_p": "a number in (0, 1]",
    "top_k": "an integer >= 1", "stop": f"a string or a list of at most {MAX_STOP} non-empty strings",
    "seed": "an integer", "stream": "a boolean", "stream_options": 'an object {"include_usage": boolean}',
    "n": "1", "echo": "a boolean", "user": "a string", "logprobs": "null (log probabilities are not supported)",
    "best_of": "1", "presence_penalty": "0", "frequency_penalty": "0", "logit_bias": "null or {}",
    "suffix": "null (suffixes are not supported)", "repetition_penalty": "a number > 0 (1 = off)",
    "ignore_eos": "a boolean", "return_token_ids": "a boolean",
}


def _bad(param: str, got) -> APIError:
    shown = repr(got) if not isinstance(got, (list, dict)) or len(repr(got)) < 80 else type(got).__name__
    return APIError(400, f"'{param}' must be {_FIELDS[param]}, got {shown}", param=param, code="invalid_value")


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def parse_completion(body, *, max_tokens_limit: int) -> CompletionRequest:
    """Validate a decoded JSON body; raises ``APIError`` (400) naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    for k in body:
        if k not in _FIELDS:
            raise APIError(400, f"Unrecognized request argument supplied: {k}", param=k, code="unknown_parameter")
    get = lambda k, default=None: default if body.get(k) is None else body[k]    # noqa: E731 (null = default)

    model = get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", model)
    if "prompt" not in body or body["prompt"] is None:
        raise APIError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(_int(t) for t in prompt):
        prompts = [list(prompt)]
    elif (isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and all(_int(t) for t in p)
                                                      for p in prompt)):
        prompts = [list(p) for p in prompt]
    else:
        raise _bad("prompt", prompt)

    max_tokens = get("max_tokens", 16)
    if not _int(max_tokens) or max_tokens < 0:
        raise _bad("max_tokens", max_tokens)
    if max_tokens > max_tokens_limit:
        raise APIError(400, f"'max_tokens' is {max_tokens}, more than this server allows ({max_tokens_limit})",
                       param="max_tokens", code="invalid_value")
    temperature = get("temperature", 1.0)
    if not _num(temperature) or temperature < 0:
        raise _bad("temperature", temperature)
    top_p = get("top_p")
    if top_p is not None and (not _num(top_p) or not 0 < top_p <= 1):
        raise _bad("top_p", top_p)
    top_k = get("top_k")
    if top_k is not None and (not _int(top_k) or top_k < 1):
        raise _bad("top_k", top_k)
    rep = get("repetition_penalty", 1.0)
    if not _num(rep) or rep <= 0:
        raise _bad("repetition_penalty", rep)
    stop = get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOP
            or not all(isinstance(s, str) and s for s in stop)):
        raise _bad("stop", body.get("stop"))
    seed = get("seed")
    if seed is not None and (not _int(seed) or not -2 ** 63 <= seed < 2 ** 64):
        raise _bad("seed", seed)
    flags = {}
    for k in ("stream", "echo", "ignore_eos", "return_token_ids"):
        flags[k] = get(k, False)
        if not isinstance(flags[k], bool):
            raise _bad(k, flags[k])
    opts = get("stream_options", {})
    if (not isinstance(opts, dict) or set(opts) - {"include_usage"}
            or not isinstance(opts.get("include_usage", False), bool)):
        raise _bad("stream_options", opts)
    if opts and not flags["stream"]:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options",
                       code="invalid_value")
    if get("n", 1) != 1 or isinstance(get("n", 1), bool):
        raise APIError(400, f"'n' must be 1 (one completion per prompt), got {body['n']!r}", param="n",
                       code="invalid_value")
    if get("best_of", 1) != 1 or isinstance(get("best_of", 1), bool):
        raise _bad("best_of", body["best_of"])
    for k in ("presence_penalty", "frequency_penalty"):
        if get(k, 0) != 0 or isinstance(get(k, 0), bool):
            raise _bad(k, body[k])
    if get("logit_bias", {}) != {}:
        raise _bad("logit_bias", body["logit_bias"])
    if get("logprobs") is not None:
        raise _bad("logprobs", body["logprobs"])
    if get("suffix", "") != "":
        raise _bad("suffix", body["suffix"])
    if not isinstance(get("user", ""), str):
        raise _bad("user", body["user"])
    params = SamplingParams(max_tokens=max_tokens, temperature=float(temperature),
                            top_p=None if top_p is None else float(top_p), top_k=top_k,
                            repetition_penalty=float(rep), seed=seed, stop=tuple(stop),
                            ignore_eos=flags["ignore_eos"])
    return CompletionRequest(prompts, params, model, flags["stream"], bool(opts.get("include_usage", False)),
                             flags["echo"], flags["return_token_ids"])
