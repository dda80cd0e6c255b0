"""Text to token ids and back: a dependency-free byte tokenizer, byte-level BPE (Hugging Face ``tokenizers``)
and SentencePiece (the released checkpoints' ``tokenizer.model``).

Every tokenizer has the same face: ``encode(str) -> list[int]``, ``decode(list[int]) -> str``, ``vocab_size``,
``pad_id``, ``bos_id``, ``eos_id`` and ``save(dir)``; ``load_tokenizer(path)`` reads any of them back.

Byte tokenizer ids: 0 pad, 1 bos, 2 eos (the config defaults ``pad/bos/eos_token_id``), then byte b at b + 3,
so the vocabulary is 259, the size of the "tiny"/"small"/"demo" presets.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

CONFIG_NAME = "tokenizer_config.json"
SPECIALS = ("<pad>", "<s>", "</s>")      # ids 0, 1, 2 in the byte tokenizer and in a BPE trained here


class ByteTokenizer:
    """UTF-8 bytes shifted by 3 past the specials (pad 0, bos 1, eos 2); vocab 259."""

    kind = "byte"
    offset = 3

    def __init__(self):
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.vocab_size = 256 + self.offset

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return [b + self.offset for b in text.encode("utf-8")]

    def encode_bytes(self, data: bytes):
        """Fast path for the data pipeline: bytes -> numpy int32 ids (no Python list)."""
        import numpy as np
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32) + self.offset

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for (empty for the special ids): ``decode`` of a sequence is the UTF-8
        decoding of its ids' bytes end to end, so a stream can decode them incrementally."""
        i = int(token_id)
        return bytes((i - self.offset,)) if self.offset <= i < self.vocab_size else b""

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def save(self, directory) -> None:
        _write_config(directory, {"type": self.kind, "pad_id": self.pad_id, "bos_id": self.bos_id,
                                  "eos_id": self.eos_id, "vocab_size": self.vocab_size})

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``)."""

    kind = "hf"

    def __init__(self, tok, pad_id: int | None = None, bos_id: int | None = None, eos_id: int | None = None):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        find = tok.token_to_id
        self.pad_id = pad_id if pad_id is not None else _first(find, ("<pad>", "<|pad|>", "[PAD]"), 0)
        self.bos_id = bos_id if bos_id is not None else _first(find, ("<s>", "<bos>", "<|begin_of_text|>"), None)
        self.eos_id = eos_id if eos_id is not None else _first(find, ("</s>", "<eos>", "<|endoftext|>"), None)

    @classmethod
    def from_file(cls, path, **ids) -> "HFTokenizer":
        from tokenizers import Tokenizer
        return cls(Tokenizer.from_file(str(path)), **ids)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._tok.save(str(Path(directory) / "tokenizer.json"))
        _write_config(directory, {"type": self.kind, "pad_id": self.pad_id, "bos_id": self.bos_id,
                                  "eos_id": self.eos_id, "vocab_size": self.vocab_size})

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size})"


class SentencePieceTokenizer:
    """A SentencePiece ``tokenizer.model`` (the released TransNormerLLM folders ship one)."""

    kind = "sentencepiece"

    def __init__(self, path, pad_id: int | None = None):
        try:
            import sentencepiece as spm
        except ImportError as e:     # an optional dependency (pip install sentencepiece)
            raise ImportError("reading a tokenizer.model needs the `sentencepiece` package: "
                              "pip install sentencepiece") from e
        self._path = Path(path)
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self._sp.get_piece_size()
        sp_pad = self._sp.pad_id()
        self.pad_id = pad_id if pad_id is not None else (sp_pad if sp_pad >= 0 else 0)
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return list(self._sp.encode(text))

    def decode(self, ids: Iterable[int]) -> str:
        # a model's vocabulary is often padded past the tokenizer's (64000 vs fewer pieces): ids
        # without a piece carry no text and are dropped instead of failing the whole decode
        return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def save(self, directory) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "tokenizer.model").write_bytes(self._sp.serialized_model_proto())
        _write_config(directory, {"type": self.kind, "pad_id": self.pad_id, "bos_id": self.bos_id,
                                  "eos_id": self.eos_id, "vocab_size": self.vocab_size})

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self._path.name}, vocab_size={self.vocab_size})"


Tokenizer = ByteTokenizer | HFTokenizer | SentencePieceTokenizer


def train_bpe(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2) -> HFTokenizer:
    """Train a byte-level BPE on ``texts`` (the training split); specials <pad>, <s>, </s> get ids 0, 1, 2."""
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIALS) + 1:
        raise ValueError(f"vocab_size for a byte-level BPE must be an int >= {256 + len(SPECIALS) + 1} "
                         f"(256 bytes + specials + merges), got {vocab_size!r}")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, pad_id=0, bos_id=1, eos_id=2)


def load_tokenizer(path) -> Tokenizer:
    """Load a tokenizer from a folder (tnllm checkpoint or released HF folder) or a file.

    Folder: ``tokenizer_config.json`` written by tnllm says which kind; otherwise ``tokenizer.json``
    (HF tokenizers) or ``tokenizer.model`` (SentencePiece). File: ``tokenizer.json`` / ``*.model``.
    The string ``"byte"`` gives the byte tokenizer.
    """
    if isinstance(path, str) and path == "byte":
        return ByteTokenizer()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path {str(p)!r} does not exist")
    if p.is_file():
        if p.suffix == ".json" and p.name != CONFIG_NAME:
            return HFTokenizer.from_file(p)
        if p.suffix == ".model":
            return SentencePieceTokenizer(p)
        if p.name == CONFIG_NAME:
            return load_tokenizer(p.parent)
        raise ValueError(f"tokenizer file {str(p)!r}: expected tokenizer.json (HF tokenizers) or "
                         f"tokenizer.model (SentencePiece)")
    cfg_path = p / CONFIG_NAME
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    kind = cfg.get("type")
    ids = {k: cfg[k] for k in ("pad_id", "bos_id", "eos_id") if k in cfg}
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf" or (kind is None and (p / "tokenizer.json").exists()):
        return HFTokenizer.from_file(p / "tokenizer.json", **ids)
    if kind == "sentencepiece" or (kind is None and (p / "tokenizer.model").exists()):
        return SentencePieceTokenizer(p / "tokenizer.model", pad_id=ids.get("pad_id"))
    raise FileNotFoundError(f"no tokenizer in {str(p)!r}: expected {CONFIG_NAME}, tokenizer.json or tokenizer.model")


def _write_config(directory, d: dict) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / CONFIG_NAME).write_text(json.dumps(d, indent=2) + "\n")


def _first(find, names, default):
    for n in names:
        i = find(n)
        if i is not None:
            return i
    return default
