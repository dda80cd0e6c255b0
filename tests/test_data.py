"""Corpora, split and packing (tnllm/data.py)."""
import json

import numpy as np
import pytest
import torch

from tnllm.data import Document, PackedLoader, load_corpus, split_corpus, stdlib_corpus
from tnllm.tokenizer import ByteTokenizer


def _docs(n, size=50):
    return [Document(name=f"d{i}", inline=f"doc {i} " + "x" * (size + i)) for i in range(n)]


def test_stdlib_corpus_is_embedded_and_ordered():
    docs = stdlib_corpus()
    assert len(docs) > 300
    names = [d.name for d in docs]
    assert names == [d.name for d in stdlib_corpus()]              # deterministic
    assert not any("site-packages" in n or "/test/" in f"/{n}" for n in names)
    assert all(n.endswith(".py") for n in names)
    assert "def " in docs[0].text() or "import" in docs[0].text() or docs[0].text() == ""


def test_load_file_folder_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello\nworld\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.md").write_text("second")
    (sub / "c.jsonl").write_text(json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": "fourth"}) + "\n")
    (sub / "blob.txt").write_bytes(b"\0\1\2binary")
    (tmp_path / ".hidden.txt").write_text("hidden")
    docs = load_corpus(tmp_path)
    assert [d.text() for d in docs] == ["hello\nworld\n", "second", "third", "fourth"]
    assert [d.text() for d in load_corpus(sub / "c.jsonl")] == ["third", "fourth"]
    assert [d.text() for d in load_corpus(tmp_path / "a.txt")] == ["hello\nworld\n"]


def test_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_corpus(empty)
    (empty / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_corpus(bad)
    bad.write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="text"):
        load_corpus(bad)
    one = tmp_path / "ws.txt"
    one.write_text("   \n\n")
    with pytest.raises(ValueError, match="empty"):
        split_corpus(load_corpus(one))


def test_split_is_deterministic_and_disjoint():
    docs = _docs(200)
    tr, va = split_corpus(docs, 0.1)
    assert {d.name for d in tr}.isdisjoint({d.name for d in va})
    assert len(tr) + len(va) == 200 and 5 <= len(va) <= 40
    # by name, not by order or by how many documents there are
    tr2, va2 = split_corpus(list(reversed(docs)), 0.1)
    assert {d.name for d in va} == {d.name for d in va2}
    tr3, va3 = split_corpus(docs[:100], 0.1)
    assert {d.name for d in va3} == {d.name for d in va if int(d.name[1:]) < 100}


def test_split_small_corpora():
    tr, va = split_corpus(_docs(2), 0.05)
    assert len(tr) >= 1 and len(va) >= 1
    one = [Document("one", inline="line a\nline b\nline c\nline d\n" * 10)]
    tr, va = split_corpus(one, 0.1)
    assert tr[0].text() + va[0].text() == one[0].text()
    assert tr[0].text().endswith("\n") and va[0].text()
    with pytest.raises(ValueError, match="val_fraction"):
        split_corpus(one, 1.5)


def test_packing_lanes_framing_and_resume():
    tok = ByteTokenizer()
    docs = _docs(8, 30)
    ld = PackedLoader(docs, tok.encode_bytes, seq_len=16, batch_size=4, bos_id=1, eos_id=2)
    stream = np.concatenate([np.r_[1, tok.encode_bytes(d.read_bytes()), 2] for d in docs])
    starts = np.cumsum([0] + [len(d.read_bytes()) + 2 for d in docs])
    b = ld.next_batch()
    assert b.shape == (4, 17) and b.dtype == torch.int64
    # lane r starts at document 2r (8 documents over 4 lanes), framed by bos
    for r in range(4):
        assert b[r].tolist() == stream[starts[2 * r]:starts[2 * r] + 17].tolist() and b[r, 0] == 1
    state = ld.state_dict()
    nxt = [ld.next_batch() for _ in range(12)]       # lanes wrap around the end of the corpus
    assert torch.equal(nxt[0][:, 0], b[:, -1])       # stride seq_len: each token is a target once per lane
    assert all(torch.equal(x[:, -1], y[:, 0]) for x, y in zip(nxt, nxt[1:]))
    assert ld.epoch == 0 and max(lane[0] for lane in ld.lanes) == 1      # the last lane wrapped
    again = PackedLoader(docs, tok.encode_bytes, seq_len=16, batch_size=4, bos_id=1, eos_id=2)
    again.load_state_dict(state)
    assert all(torch.equal(x, again.next_batch()) for x in nxt)
    with pytest.raises(ValueError, match="documents"):
        PackedLoader(docs[:3], tok.encode_bytes, 16, 4).load_state_dict(state)


def test_fewer_documents_than_rows():
    tok = ByteTokenizer()
    one = [Document("one", inline=" ".join(str(i) for i in range(60)))]
    b = PackedLoader(one, tok.encode_bytes, seq_len=8, batch_size=4, bos_id=1, eos_id=2).next_batch()
    assert len(set(map(tuple, b.tolist()))) == 4                 # lanes start at different offsets
    framed = [1] + tok.encode(one[0].text()) + [2]
    L = len(framed)
    assert b[0, 0] == 1 and b[2].tolist() == framed[L // 2:L // 2 + 9]


def test_rank_sharding():
    tok = ByteTokenizer()
    docs = _docs(4, 100)
    full = PackedLoader(docs, tok.encode_bytes, 8, 4).next_batch()
    parts = [PackedLoader(docs, tok.encode_bytes, 8, 4, rank=r, world_size=2).next_batch() for r in range(2)]
    assert torch.equal(parts[0], full[0::2]) and torch.equal(parts[1], full[1::2])
    with pytest.raises(ValueError, match="divisible"):
        PackedLoader(docs, tok.encode_bytes, 8, 3, world_size=2)
    with pytest.raises(ValueError, match="seq_len"):
        PackedLoader(docs, tok.encode_bytes, 0, 4)


def test_all_empty_documents():
    ld = PackedLoader([Document("e", inline="")], ByteTokenizer().encode_bytes, 4, 1)
    with pytest.raises(ValueError, match="empty"):
        ld.next_batch()
