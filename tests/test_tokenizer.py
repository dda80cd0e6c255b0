"""Tokenizers (tnllm/tokenizer.py): byte ids, BPE training round trip, SentencePiece, load by path."""
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tnllm.tokenizer import (ByteTokenizer, HFTokenizer, SentencePieceTokenizer, load_tokenizer, train_bpe)

CODE = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nprint(os.path.join('a', 'b'))  # ünïcödé ✓\n",
    "for i in range(10):\n    if i % 2:\n        print(i)\n",
] * 20


def test_byte_ids_match_config_specials():
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
    assert tok.encode("A") == [ord("A") + 3]
    assert min(tok.encode("\x00")) == 3 and max(tok.encode("\xff")) < 259
    assert tok.decode([1, 68, 2, 0]) == "A"          # specials are dropped on decode


@given(st.text(max_size=200))
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(3 <= i < 259 for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_bytes(text.encode("utf-8")).tolist() == ids


def test_byte_save_load(tmp_path):
    ByteTokenizer().save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["type"] == "byte"


def test_bpe_round_trip_and_reload(tmp_path):
    tok = train_bpe(CODE, vocab_size=400)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert 300 < tok.vocab_size <= 400
    for text in CODE[:4] + ["unseen: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and \t tabs \n"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert len(tok.encode(CODE[0])) < len(CODE[0].encode())       # merges compress the training text
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    again = load_tokenizer(tmp_path)
    assert isinstance(again, HFTokenizer)
    assert again.encode(CODE[1]) == tok.encode(CODE[1])
    assert (again.pad_id, again.bos_id, again.eos_id, again.vocab_size) == (0, 1, 2, tok.vocab_size)
    assert isinstance(load_tokenizer(tmp_path / "tokenizer.json"), HFTokenizer)


def test_bpe_bad_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(CODE, vocab_size=100)


def test_sentencepiece_folder(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(CODE))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=120,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=3, pad_id=0, minloglevel=2)
    tok = load_tokenizer(tmp_path)                  # a released folder ships tokenizer.model
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 120)
    assert tok.decode(tok.encode("def add(a, b):")) == "def add(a, b):"
    out = tmp_path / "saved"
    tok.save(out)
    assert load_tokenizer(out).encode("class Point") == tok.encode("class Point")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "vocab.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(bad)
    with pytest.raises(TypeError, match="str"):
        ByteTokenizer().encode(b"bytes")
