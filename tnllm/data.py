"""Corpora, the train/val split and packed fixed-length token batches with a resumable position.

* ``stdlib_corpus()``: the embedded default, the Python standard library's own ``.py`` sources (found from
  ``sysconfig``; site-packages and test folders skipped), in a fixed order (sha1 of the relative path), read
  lazily: a run reads only the files its token budget reaches.
* ``load_corpus(path)``: a text file, a folder of text files (recursively; ``.jsonl`` files inside are parsed),
  or a ``.jsonl`` file whose lines are objects with a ``"text"`` field (one document per line).
* ``split_corpus``: each document goes to val when the sha1 of its name falls in the first ``val_fraction``
  of the hash range, so the split does not depend on the order or on how much of the corpus a run reads.
* ``PackedLoader``: documents encoded as ``[bos] + ids + [eos]`` and concatenated into one stream (wrapping
  around at its end), cut into rows of ``seq_len + 1`` tokens with stride ``seq_len``, so every token is a
  target exactly once per pass. ``state_dict()``/``load_state_dict()`` hold the position (pass, document,
  token offset) for exact resumption.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".jsonl", ".json", ".csv", ".tex", ".html", ".xml", ".c", ".h",
                  ".cpp", ".js", ".ts", ".java", ".go", ".rs", ".sh", ".toml", ".yaml", ".yml", ".cfg", ".ini", ""}


@dataclass(frozen=True)
class Document:
    """One document: a stable ``name`` (used by the split) and its text, read on first use."""
    name: str
    path: str | None = None
    inline: str | None = None

    def read_bytes(self) -> bytes:
        if self.inline is not None:
            return self.inline.encode("utf-8")
        try:
            data = Path(self.path).read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read corpus file {self.path!r}: {e}") from e
        # a few stdlib files are not UTF-8 (e.g. latin-1 test fixtures): normalise so byte ids decode
        return data.decode("utf-8", errors="replace").encode("utf-8")

    def text(self) -> str:
        return self.read_bytes().decode("utf-8")


def _hash01(name: str) -> float:
    return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus() -> list[Document]:
    """The standard library's ``.py`` files (not site-packages, not test folders), in sha1 order of their
    relative paths, so a budget-capped read samples all of the library rather than its first letters."""
    root = stdlib_root()
    if not root.is_dir():
        raise ValueError(f"the Python standard library folder {str(root)!r} was not found; pass --data PATH")
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for f in filenames:
            if f.endswith(".py"):
                p = Path(dirpath) / f
                docs.append(Document(name=p.relative_to(root).as_posix(), path=str(p)))
    if not docs:
        raise ValueError(f"the Python standard library folder {str(root)!r} holds no .py files; pass --data PATH")
    return sorted(docs, key=lambda d: (hashlib.sha1(d.name.encode()).hexdigest(), d.name))


def _jsonl_docs(path: Path, prefix: str) -> list[Document]:
    docs = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); a .jsonl corpus needs one JSON "
                                 f"object with a \"text\" field per line") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a string \"text\" field")
            if obj["text"]:
                docs.append(Document(name=f"{prefix}:{lineno}", inline=obj["text"]))
    return docs


def load_corpus(path) -> list[Document]:
    """Documents of a text file, a folder of text files, or a .jsonl file (``"text"`` field), in a fixed order."""
    if path is None:
        return stdlib_corpus()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--data path {str(p)!r} does not exist (a text file, a folder of text files, "
                                f"or a .jsonl file with a \"text\" field)")
    if p.is_file():
        docs = _jsonl_docs(p, p.name) if p.suffix == ".jsonl" else [Document(name=p.name, path=str(p))]
    else:
        docs = []
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            rel = f.relative_to(p)
            if any(part.startswith(".") for part in rel.parts) or f.suffix.lower() not in _TEXT_SUFFIXES:
                continue
            if f.suffix == ".jsonl":
                docs.extend(_jsonl_docs(f, rel.as_posix()))
            elif f.stat().st_size:
                head = f.read_bytes()[:4096]
                if b"\0" not in head:        # binary files are not text
                    docs.append(Document(name=rel.as_posix(), path=str(f)))
    if not docs:
        raise ValueError(f"--data {str(p)!r} holds no text: the corpus is empty")
    return docs


def split_corpus(docs: Sequence[Document], val_fraction: float = 0.05) -> tuple[list[Document], list[Document]]:
    """Deterministic split by document name hash. Fewer than two documents: one is cut at a line boundary
    (first ``1 - val_fraction`` train, rest val); when the hash puts every document on one side, the last
    document goes to val (or the first to train)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if not docs:
        raise ValueError("the corpus is empty: no documents to split")
    if len(docs) == 1:
        text = docs[0].text()
        if not text.strip():
            raise ValueError(f"the corpus is empty: document {docs[0].name!r} has no text")
        cut = text.rfind("\n", 0, max(1, int(len(text) * (1 - val_fraction))))
        cut = cut + 1 if cut > 0 else max(1, int(len(text) * (1 - val_fraction)))
        head, tail = text[:cut], text[cut:]
        if not tail.strip():           # no line break late enough: cut by characters
            k = max(1, int(len(text) * (1 - val_fraction)))
            head, tail = text[:k], text[k:] or text[-1:]
        return [Document(f"{docs[0].name}#train", inline=head)], [Document(f"{docs[0].name}#val", inline=tail)]
    train = [d for d in docs if _hash01(d.name) >= val_fraction]
    val = [d for d in docs if _hash01(d.name) < val_fraction]
    if not val:
        train, val = train[:-1], train[-1:]
    elif not train:
        train, val = val[:1], val[1:]
    return train, val


class PackedLoader:
    """Fixed-length rows ``[batch, seq_len + 1]`` (int64) from the packed token stream of ``docs``.

    ``encode(bytes) -> np.ndarray[int]`` tokenizes one document; ``bos_id``/``eos_id`` frame it (None: left
    out). ``rank``/``world_size`` keep every ``world_size``-th row of each global batch (data parallel); all
    ranks advance the same position, so the state is the same on every rank.
    """

    def __init__(self, docs: Sequence[Document], encode: Callable[[bytes], np.ndarray], seq_len: int,
                 batch_size: int, bos_id: int | None = None, eos_id: int | None = None,
                 rank: int = 0, world_size: int = 1):
        if not docs:
            raise ValueError("PackedLoader needs at least one document")
        for name, v in (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if batch_size % world_size:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by world_size ({world_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.docs, self.encode = list(docs), encode
        self.seq_len, self.batch_size = seq_len, batch_size
        self.bos_id, self.eos_id = bos_id, eos_id
        self.rank, self.world_size = rank, world_size
        self.epoch, self.doc, self.pos = 0, 0, 0
        self._cache: tuple[int, np.ndarray] | None = None
        self._empty_run = 0

    # -- the token stream ---------------------------------------------------------------------
    def _tokens(self, i: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != i:
            ids = np.asarray(self.encode(self.docs[i].read_bytes()), dtype=np.int64)
            parts = ([np.array([self.bos_id])] if self.bos_id is not None else []) + [ids] + \
                    ([np.array([self.eos_id])] if self.eos_id is not None else [])
            self._cache = (i, np.concatenate(parts).astype(np.int64))
        return self._cache[1]

    def _read(self, n: int, advance: bool) -> np.ndarray:
        epoch, doc, pos = self.epoch, self.doc, self.pos
        out, got, empty = [], 0, 0
        while got < n:
            toks = self._tokens(doc)
            if pos >= len(toks):
                empty = empty + 1 if len(toks) == 0 else 0
                if empty > len(self.docs):
                    raise ValueError("the corpus is empty: every document encodes to zero tokens")
                doc, pos = doc + 1, 0
                if doc == len(self.docs):
                    epoch, doc = epoch + 1, 0
                continue
            take = toks[pos:pos + n - got]
            out.append(take)
            got += len(take)
            pos += len(take)
        if advance:
            self.epoch, self.doc, self.pos = epoch, doc, pos
        return np.concatenate(out)

    def next_batch(self):
        """The next ``[batch_size // world_size, seq_len + 1]`` int64 tensor (this rank's rows)."""
        import torch
        B, T = self.batch_size, self.seq_len
        flat = np.concatenate([self._read(B * T, advance=True), self._read(1, advance=False)])
        rows = np.lib.stride_tricks.sliding_window_view(flat, T + 1)[::T]          # [B, T + 1], stride T
        return torch.from_numpy(np.ascontiguousarray(rows[self.rank::self.world_size]))

    def __iter__(self):
        while True:
            yield self.next_batch()

    # -- resumable position -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "doc": self.doc, "pos": self.pos, "num_docs": len(self.docs)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_docs", len(self.docs)) != len(self.docs):
            raise ValueError(f"data loader state was saved for {state['num_docs']} documents, this corpus has "
                             f"{len(self.docs)}: resume with the same --data and split")
        self.epoch, self.doc, self.pos = int(state["epoch"]), int(state["doc"]), int(state["pos"])


def corpus_texts(docs: Sequence[Document], max_bytes: int):
    """Texts of ``docs`` in order until ``max_bytes`` are reached (BPE training input)."""
    total = 0
    for d in docs:
        if total >= max_bytes:
            break
        t = d.text()
        total += len(t.encode("utf-8"))
        yield t
