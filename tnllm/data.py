"""Corpora, the train/val split and packed fixed-length token batches with a resumable position.

* ``stdlib_corpus()``: the embedded default, the Python standard library's own ``.py`` sources (found from
  ``sysconfig``; site-packages and test folders skipped), in a fixed order (sha1 of the relative path), read
  lazily: a run reads only the files its token budget reaches.
* ``load_corpus(path)``: a text file, a folder of text files (recursively; ``.jsonl`` files inside are parsed),
  or a ``.jsonl`` file whose lines are objects with a ``"text"`` field (one document per line).
* ``split_corpus``: each document goes to val when the sha1 of its name falls in the first ``val_fraction``
  of the hash range, so the split does not depend on the order or on how much of the corpus a run reads.
* ``PackedLoader``: documents encoded as ``[bos] + ids + [eos]`` and concatenated into one stream (wrapping
  around at its end), read by one lane per batch row (lanes start spread over the corpus), each cut into rows
  of ``seq_len + 1`` tokens with stride ``seq_len``. ``state_dict()``/``load_state_dict()`` hold the lanes'
  positions (pass, document, token offset) for exact resumption. With ``documents=True`` it returns
  ``DocumentBatch``es: the same rows with the document boundaries inside them, for training without
  attention across documents.
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

IGNORE_INDEX = -100      # a target the loss skips (F.cross_entropy's default ignore_index)

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


@dataclass
class DocumentBatch:
    """A batch of rows cut from the document stream, with the documents inside each row marked.

    ``input_ids`` [B, T] int64; ``targets`` [B, T] int64, the next token, or ``IGNORE_INDEX`` where the next
    token starts another document (its first token is not predicted from the previous document);
    ``cu_seqlens`` int32 [N + 1], the boundaries of the N document pieces of all rows in the row-major
    flattened B*T inputs: every row start is one (a document that runs past a row's end continues in its lane's
    next row, where its rest is a piece of its own). ``TransNormerLLM.forward(input_ids, cu_seqlens=...)``
    runs every piece from the zero state at position 0, with no attention across a boundary."""
    input_ids: "torch.Tensor"
    targets: "torch.Tensor"
    cu_seqlens: "torch.Tensor"

    @classmethod
    def from_rows(cls, tokens: np.ndarray, starts: np.ndarray) -> "DocumentBatch":
        """``tokens`` [B, T + 1] and ``starts`` [B, T + 1] (True at the first token of a document)."""
        import torch
        B, T1 = tokens.shape
        T = T1 - 1
        targets = tokens[:, 1:].copy()
        targets[starts[:, 1:]] = IGNORE_INDEX
        first = starts[:, :T].copy()
        first[:, 0] = True                                  # a row always starts a piece
        bounds = np.concatenate([np.flatnonzero(first.reshape(-1)), [B * T]])
        dtype = np.int32 if B * T < 2 ** 31 else np.int64
        return cls(torch.from_numpy(np.ascontiguousarray(tokens[:, :T])), torch.from_numpy(targets),
                   torch.from_numpy(bounds.astype(dtype)))

    def to(self, device, non_blocking: bool = False) -> "DocumentBatch":
        return DocumentBatch(*(t.to(device, non_blocking=non_blocking)
                               for t in (self.input_ids, self.targets, self.cu_seqlens)))

    @property
    def num_documents(self) -> int:
        return self.cu_seqlens.shape[0] - 1


class PackedLoader:
    """Fixed-length rows ``[batch, seq_len + 1]`` (int64) from the packed token stream of ``docs``.

    Each row of a batch comes from its own *lane*: a read position in the stream (documents framed as
    ``[bos] + ids + [eos]``, wrapping around at the end). Lane b starts a fraction b / batch_size of the way
    through the documents, so the rows of one batch come from different files (contiguous rows of a single
    file would make every batch one highly correlated sample), and each lane advances ``seq_len`` tokens
    per batch, so its next row starts with the last token of its previous row: a token is a target once.

    ``encode(bytes) -> np.ndarray[int]`` tokenizes one document. ``rank``/``world_size`` keep this rank's rows
    (``rank::world_size``) of each global batch; every rank tracks every lane, so the state is the same on
    all ranks and resumes on any of them. ``documents=True``: ``next_batch`` returns a ``DocumentBatch`` (the
    same tokens, with the document boundaries the lanes crossed).
    """

    def __init__(self, docs: Sequence[Document], encode: Callable[[bytes], np.ndarray], seq_len: int,
                 batch_size: int, bos_id: int | None = None, eos_id: int | None = None,
                 rank: int = 0, world_size: int = 1, documents: bool = False):
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
        self.documents = bool(documents)
        self.lanes: list[list[int]] | None = None          # [epoch, doc, pos] per lane
        self._cache: dict[int, np.ndarray] = {}

    # -- the token stream ---------------------------------------------------------------------
    def _tokens(self, i: int) -> np.ndarray:
        toks = self._cache.get(i)
        if toks is None:
            ids = np.asarray(self.encode(self.docs[i].read_bytes()), dtype=np.int64)
            parts = ([np.array([self.bos_id])] if self.bos_id is not None else []) + [ids] + \
                    ([np.array([self.eos_id])] if self.eos_id is not None else [])
            toks = np.concatenate(parts).astype(np.int64)
            if len(self._cache) >= 2 * self.batch_size:     # lanes move forward: old documents are done
                self._cache.pop(next(iter(self._cache)))
            self._cache[i] = toks
        return toks

    def _start_lanes(self) -> list[list[int]]:
        N, B = len(self.docs), self.batch_size
        lanes = []
        for b in range(B):
            doc, rem = divmod(b * N, B)        # fractional part: how far into that document the lane starts
            lanes.append([0, doc, (rem * len(self._tokens(doc))) // B])
        return lanes

    def _read(self, lane: list[int], n: int, advance: bool, starts: list | None = None) -> np.ndarray:
        """The lane's next ``n`` tokens; ``starts``, when given, receives a bool array per piece (True at a
        document's first token)."""
        epoch, doc, pos = lane
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
            if starts is not None:
                st = np.zeros(len(take), dtype=bool)
                st[0] = pos == 0
                starts.append(st)
            got += len(take)
            pos += len(take)
        if advance:
            lane[:] = [epoch, doc, pos]
        return np.concatenate(out)

    def next_batch(self):
        """The next ``[batch_size // world_size, seq_len + 1]`` int64 tensor (this rank's rows); with
        ``documents``, a ``DocumentBatch`` of those rows."""
        import torch
        T = self.seq_len
        if self.lanes is None:
            self.lanes = self._start_lanes()
        rows, row_starts = [], []
        for b, lane in enumerate(self.lanes):
            if b % self.world_size == self.rank:
                st = [] if self.documents else None
                rows.append(np.concatenate([self._read(lane, T, advance=True, starts=st),
                                            self._read(lane, 1, advance=False, starts=st)]))
                if st is not None:
                    row_starts.append(np.concatenate(st))
            else:      # other ranks' rows: advance only (a cached length lookup for most steps)
                self._read(lane, T, advance=True)
        if self.documents:
            return DocumentBatch.from_rows(np.stack(rows), np.stack(row_starts))
        return torch.from_numpy(np.stack(rows))

    def __iter__(self):
        while True:
            yield self.next_batch()

    @property
    def epoch(self) -> int:
        """Passes completed by the slowest lane."""
        return 0 if self.lanes is None else min(lane[0] for lane in self.lanes)

    # -- resumable position -------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.lanes is None:
            self.lanes = self._start_lanes()
        return {"lanes": [list(lane) for lane in self.lanes], "num_docs": len(self.docs),
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_docs") != len(self.docs) or state.get("batch_size") != self.batch_size:
            raise ValueError(f"data loader state was saved for {state.get('num_docs')} documents and batch size "
                             f"{state.get('batch_size')}; this loader has {len(self.docs)} documents and batch size "
                             f"{self.batch_size}: resume with the same --data, split and --batch-size")
        self.lanes = [[int(x) for x in lane] for lane in state["lanes"]]


def corpus_texts(docs: Sequence[Document], max_bytes: int):
    """Texts of ``docs`` in order until ``max_bytes`` are reached (BPE training input)."""
    total = 0
    for d in docs:
        if total >= max_bytes:
            break
        t = d.text()
        total += len(t.encode("utf-8"))
        yield t
