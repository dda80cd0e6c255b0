"""One sampler (``sample_next``) and one generation loop (``generate``) for every decoder.

The loop drives a *decoder*, a small protocol:

* ``start(ids [B, T] int64, mask [B, T] | None) -> (logits [B, V], state)``: the prompt (left-padded where
  ``mask`` is 0), the logits of its last position;
* ``step(tokens [B], state) -> (logits [B, V], state)``: one token per row.

Logits are torch tensors (any device, any float dtype). ``TorchDecoder`` implements it for any model with
``prefill``/``step`` (TransNormerLLM, whose prefill is the parallel blocked form and step the recurrence, so
memory stays flat in the generated length; the Transformer baseline). ``tnllm.compile.CudaGraphDecoder``
and ``tnllm.export.OnnxRecurrentDecoder`` (through ``as_decoder()``) implement it too. A finished row
(it produced ``eos_token_id``) gets ``pad_token_id`` from then on, whichever decoder runs.

Left padding is exact for TransNormerLLM: padded tokens' k, v are zeroed and decay and LRPE are relative,
so a left-padded row generates what the same prompt alone generates.

Prompts of unequal length can also be passed as a list: a decoder with ``start_packed(ids [1, T], cu_seqlens)``
(``TorchDecoder`` over a model whose ``prefill`` takes ``cu_seqlens``: TransNormerLLM) prefills them packed end
to end in one call, without padding, each into its own state row at its own position; any other decoder gets
them left-padded.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
from torch import Tensor


# -- logits processing ----------------------------------------------------------------------------
def check_sampling(temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float) -> None:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if not isinstance(repetition_penalty, (int, float)) or repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be a number > 0 (1 = off), got {repetition_penalty!r}")


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style: a seen token's logit is divided by ``penalty`` when positive, multiplied when negative.
    ``seen`` [B, V] bool."""
    if penalty == 1.0:
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """logits [B, V] (fp32) -> next ids [B]. temperature 0: argmax (greedy)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        srt, idx = torch.sort(logits, dim=-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) >= top_p          # keep the smallest prefix whose mass reaches top_p
        srt = srt.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, srt)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# -- decoders -------------------------------------------------------------------------------------
class TorchDecoder:
    """The decoder protocol over a torch model with ``prefill(ids, attention_mask=...)`` and ``step(ids, state)``."""

    def __init__(self, model):
        self.model = model
        self.config = getattr(model, "config", None)
        p = next(iter(model.parameters()), None)
        self.device = p.device if p is not None else torch.device("cpu")

    def start(self, ids: Tensor, mask: Tensor | None):
        logits, state = self.model.prefill(ids.to(self.device),
                                           attention_mask=None if mask is None else mask.to(self.device))
        return logits[:, -1].float(), state

    @property
    def packs(self) -> bool:
        """Whether the model's prefill takes packed prompts (``cu_seqlens``)."""
        return "cu_seqlens" in inspect.signature(self.model.prefill).parameters

    def start_packed(self, ids: Tensor, cu_seqlens: Tensor):
        """N prompts end to end in ``ids`` [1, T], boundaries ``cu_seqlens`` [N + 1]: (logits [N, V] of each
        prompt's last position, a state of N rows, each at its own prompt's position)."""
        logits, state = self.model.prefill(ids.to(self.device), cu_seqlens=cu_seqlens.to(self.device),
                                           last_only=True)
        return logits[:, 0].float(), state

    def step(self, tokens: Tensor, state):
        logits, state = self.model.step(tokens.to(self.device), state)
        return logits.float(), state


def as_decoder(model):
    """``model`` as a decoder (see the module docstring): a model with ``prefill``/``step`` is wrapped in
    ``TorchDecoder``; an object with ``as_decoder()`` (``OnnxRecurrentDecoder``) gives its own; an object that
    already has ``start``/``step`` (``CudaGraphDecoder``) is used as it is."""
    if hasattr(model, "prefill") and hasattr(model, "parameters"):
        return TorchDecoder(model)
    if hasattr(model, "as_decoder"):
        return model.as_decoder()
    if hasattr(model, "start") and hasattr(model, "step"):
        return model
    raise TypeError(f"generate() needs a model with prefill/step (TransNormerLLM, TransformerLM), a decoder with "
                    f"start/step (CudaGraphDecoder) or an OnnxRecurrentDecoder, got {type(model).__name__}")


# -- the loop -------------------------------------------------------------------------------------
@torch.no_grad()    # not inference_mode: the returned ids must be usable in autograd code later
def generate(model, input_ids: Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             eos_token_id: int | None = None, attention_mask: Tensor | None = None,
             generator: torch.Generator | None = None, seed: int | None = None,
             streamer: Callable[[Tensor], None] | None = None, pad_token_id: int | None = None):
    """Continue ``input_ids`` [B, T] (left-padded when ``attention_mask`` [B, T] marks pads with 0) by up to
    ``max_new_tokens`` tokens; returns [B, T + n] int64 on the CPU, n <= max_new_tokens (shorter only when every
    row has produced ``eos_token_id``; finished rows are then filled with ``pad_token_id``).

    ``input_ids`` may also be a list of prompts of unequal length (1-D int tensors or lists of ids): they are
    prefilled packed, without padding, where the decoder can (``TorchDecoder.start_packed``), else left-padded;
    the result is then a list of 1-D tensors, prompt i followed by its n new tokens.

    temperature 0 is greedy; otherwise softmax sampling at that temperature, optionally restricted to the
    ``top_k`` tokens and/or the nucleus of mass ``top_p``; ``repetition_penalty`` > 1 discourages tokens already
    in the row. ``generator`` (or ``seed``) makes sampling reproducible. ``streamer(tokens [B])`` is called with
    each new column as soon as it is chosen.
    """
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
              repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, generator=generator, seed=seed,
              streamer=streamer, pad_token_id=pad_token_id)
    if isinstance(input_ids, (list, tuple)):
        if attention_mask is not None:
            raise ValueError("attention_mask is for a padded input_ids tensor; a list of prompts needs none")
        return _generate_list(model, input_ids, **kw)
    return _generate(model, input_ids, attention_mask=attention_mask, **kw)


def _generate(model, input_ids: Tensor, max_new_tokens: int, temperature: float, top_k, top_p,
              repetition_penalty: float, eos_token_id, attention_mask, generator, seed, streamer, pad_token_id,
              packed: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``generate`` for a tensor of prompts; ``packed`` (ids [1, T], cu_seqlens) the same prompts end to end,
    prefilled that way when the decoder can."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer tensor [B, T] or a list of prompts, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"input_ids must hold at least one token per row, got shape {(B, T)}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit is not None and T + max_new_tokens > limit:
        raise ValueError(f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"max_position_embeddings ({limit})")
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must be a tensor of input_ids' shape {(B, T)}, got "
                             f"{tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else attention_mask!r}")
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("attention_mask: prompts must be left-padded (the last position of every row kept)")
        if bool(attention_mask.all()):
            attention_mask = None
    if pad_token_id is None:
        pad_token_id = getattr(cfg, "pad_token_id", 0)
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(int(seed))

    ids = input_ids.detach().to("cpu", torch.int64)
    out = [ids]
    if max_new_tokens == 0:
        return ids
    dec = as_decoder(model)
    if packed is not None and getattr(dec, "packs", False):
        logits, state = dec.start_packed(*packed)
    else:
        logits, state = dec.start(ids, None if attention_mask is None else attention_mask.cpu())
    return _loop(dec, ids, attention_mask, logits, state, out, max_new_tokens, temperature, top_k, top_p,
                 repetition_penalty, eos_token_id, generator, streamer, pad_token_id)


def _loop(dec, ids, attention_mask, logits, state, out, max_new_tokens, temperature, top_k, top_p,
          repetition_penalty, eos_token_id, generator, streamer, pad_token_id) -> Tensor:
    """The token loop after the prompt: sample, stream, feed back, until max_new_tokens or every row ended."""
    B = ids.shape[0]
    seen = None
    finished = torch.zeros(B, dtype=torch.bool)
    for i in range(max_new_tokens):
        logits = logits.float().cpu()
        if repetition_penalty != 1.0:
            if seen is None:     # [B, V]: tokens in each row's prompt (pads excluded) and output so far
                V = logits.shape[-1]
                seen = torch.zeros(B, V, dtype=torch.bool)
                keep = ids if attention_mask is None else ids.masked_fill(attention_mask.cpu() == 0, -1)
                rows, cols = (keep >= 0).nonzero(as_tuple=True)
                seen[rows, keep[rows, cols].clamp_max(V - 1)] = True
            logits = apply_repetition_penalty(logits, seen, float(repetition_penalty))
        nxt = sample_next(logits, float(temperature), top_k, top_p, generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
        out.append(nxt[:, None])
        if seen is not None:
            seen[torch.arange(B), nxt] = True
        if streamer is not None:
            streamer(nxt)
        if eos_token_id is not None:
            finished |= nxt == eos_token_id
            if bool(finished.all()):
                break
        if i + 1 < max_new_tokens:
            logits, state = dec.step(nxt, state)
    return torch.cat(out, dim=1)


def _generate_list(model, prompts: Sequence, **kw) -> list[Tensor]:
    """``generate`` over a list of prompts of unequal length (see there): returns a list of 1-D tensors."""
    rows = []
    for i, p in enumerate(prompts):
        t = torch.as_tensor(p)
        if t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"input_ids[{i}] must be a 1-D sequence of token ids, got {t.dtype} {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"input_ids[{i}] is empty: every prompt needs at least one token")
        rows.append(t.to("cpu", torch.int64))
    if not rows:
        raise ValueError("input_ids is an empty list: pass at least one prompt")
    lengths = [r.numel() for r in rows]
    T = max(lengths)
    pad = kw.get("pad_token_id")
    if pad is None:
        pad = getattr(getattr(model, "config", None), "pad_token_id", 0)
    # the left-padded batch: the loop's view of the prompts (and the fallback for decoders that cannot pack)
    ids = torch.full((len(rows), T), pad, dtype=torch.int64)
    mask = torch.zeros(len(rows), T, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, T - r.numel():] = r
        mask[i, T - r.numel():] = 1
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    out = _generate(model, ids, attention_mask=mask, packed=(torch.cat(rows)[None], cu), **kw)
    return [torch.cat([r, out[i, T:]]) for i, r in enumerate(rows)]


class TextStreamer:
    """Turns the streamed ids of one row into text pieces as soon as they decode to whole characters
    (a multi-byte UTF-8 character, or a BPE token split across steps, is held back until complete)."""

    def __init__(self, tokenizer, emit: Callable[[str], None], row: int = 0, stop_ids=()):
        self.tok, self.emit, self.row = tokenizer, emit, row
        self.stop = set(stop_ids)
        self.ids: list[int] = []
        self.printed = 0
        self.done = False

    def __call__(self, tokens: Tensor) -> None:
        if self.done:
            return
        t = int(tokens[self.row])
        if t in self.stop:
            self.done = True
            return
        self.ids.append(t)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):           # an incomplete character: wait for the rest of it
            return
        self.emit(text[self.printed:])
        self.printed = len(text)

    def flush(self) -> None:
        text = self.tok.decode(self.ids)
        if len(text) > self.printed:
            self.emit(text[self.printed:])
            self.printed = len(text)
