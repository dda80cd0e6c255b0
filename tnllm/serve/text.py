"""Token ids to streamed text, and stop strings.

``TextStream`` turns one request's generated ids into text pieces as soon as they decode to whole
characters, and ends the text before the first stop string. Decoding looks at a short window of recent
ids (plus the end of the prompt as context), so each token costs O(1) whatever the length generated, and
tokenizers whose decode depends on the neighbours (SentencePiece's leading space, a BPE token split
across two steps, a multi-byte UTF-8 character split across bytes) come out right.

A tokenizer with ``token_bytes(id) -> bytes`` (``ByteTokenizer``), whose decode is the UTF-8 decoding of
its ids' bytes end to end, is decoded incrementally instead: one ``codecs`` UTF-8 decoder per stream, no
window decodes (the text is the same: an incremental UTF-8 decoder gives what one decode of all the bytes
gives).
"""
from __future__ import annotations

import codecs

from typing import Sequence


class TextStream:
    """Incremental detokenizer with stop strings.

    ``push(token_id) -> (text, stopped)``: the new text that is certain (a piece that might be the start of
    a stop string is held back), and whether a stop string has now appeared (then ``text`` ends right
    before it and nothing more is produced). ``finish() -> text``: everything still held back.
    """

    CONTEXT = 5      # prompt ids decoded as context before the first generated one

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()):
        self.tok = tokenizer
        self.ids = list(prompt_ids[-self.CONTEXT:])
        self.prefix = 0              # ids[prefix:read] decoded to what is already accounted for
        self.read = len(self.ids)
        self.text = ""               # the full generated text decoded so far
        self.sent = 0                # text[:sent] has been returned
        self.stop = tuple(s for s in stop if s)
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.stopped = False
        self._token_bytes = getattr(tokenizer, "token_bytes", None)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace") if self._token_bytes is not None else None

    def _decode_new(self) -> str:
        prev = self.tok.decode(self.ids[self.prefix:self.read])
        new = self.tok.decode(self.ids[self.prefix:])
        if len(new) > len(prev) and not new.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return new[len(prev):]
        return ""

    def push(self, token_id: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if self._utf8 is not None:
            piece = self._utf8.decode(self._token_bytes(token_id))
        else:
            self.ids.append(int(token_id))
            piece = self._decode_new()
        if not piece:
            return "", False
        return self._add(piece)

    def _add(self, piece: str) -> tuple[str, bool]:
        start = max(0, len(self.text) - self.max_stop + 1)
        self.text += piece
        if self.stop:
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                out = self.text[self.sent:end]
                self.text, self.sent, self.stopped = self.text[:end], end, True
                return out, True
            hold = self._held()
        else:
            hold = 0
        end = len(self.text) - hold
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out, False

    def _held(self) -> int:
        """Length of the longest end of ``text`` that is a proper start of some stop string."""
        t = self.text
        for n in range(min(self.max_stop - 1, len(t)), 0, -1):
            tail = t[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def finish(self) -> str:
        """The rest: held-back characters (an incomplete character decodes as U+FFFD) and any held stop
        prefix. Call once when generation ends without a stop string."""
        if self.stopped:
            return ""
        if self._utf8 is not None:
            rest = self._utf8.decode(b"", final=True)
        else:
            prev = self.tok.decode(self.ids[self.prefix:self.read])
            new = self.tok.decode(self.ids[self.prefix:])
            rest = new[len(prev):] if len(new) > len(prev) else ""
        out, stopped = self._add(rest) if rest else ("", False)
        if stopped:
            return out
        out += self.text[self.sent:]
        self.sent = len(self.text)
        return out
