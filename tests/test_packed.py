"""Packed documents and prompts: DocumentBatch from the loader, the model's forward / prefill with cu_seqlens
(equal to one call per document or prompt: no attention across a boundary, LRPE positions restarting),
the loss that skips cross-document targets, training with --pack-documents, generate over unequal prompts."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tnllm import TransNormerConfig, TransNormerLLM, generate
from tnllm.baseline import TransformerLM
from tnllm.data import IGNORE_INDEX, Document, DocumentBatch, PackedLoader
from tnllm.train.loop import TrainConfig, Trainer, lm_loss

CFG = dict(vocab_size=97, decoder_embed_dim=64, decoder_layers=3, decoder_attention_heads=4, glu_dim=96)


def bounds(lengths):
    return torch.tensor([0] + np.cumsum(lengths).tolist())


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TransNormerLLM(TransNormerConfig(**CFG)).double().eval()


def pieces(ids, cu):
    flat = ids.reshape(-1)
    return [flat[a:b] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]


# ---- the model ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["transnormer", "transformer"])
def test_packed_logits_equal_the_per_document_forward(model, arch):
    torch.manual_seed(1)
    m = model if arch == "transnormer" else TransformerLM(TransNormerConfig(**CFG)).double().eval()
    ids = torch.randint(3, 97, (3, 40))
    cu = torch.tensor([0, 7, 7, 8, 40, 80, 81, 99, 120])      # row starts 0, 40, 80; an empty and one-token documents
    got = m(ids, cu_seqlens=cu)
    ref = torch.cat([m(p[None]) if p.numel() else torch.zeros(1, 0, 97, dtype=torch.float64)
                     for p in pieces(ids, cu)], dim=1).reshape(3, 40, -1)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.hidden_states(ids, cu_seqlens=cu).reshape(1, 120, -1)[:, 8:40],
                               m.hidden_states(ids[:1, 8:]), rtol=1e-10, atol=1e-10)


def test_packed_gradients_equal_the_per_document_ones(model):
    ids = torch.randint(3, 97, (1, 50))
    cu = bounds([20, 1, 29])
    model.zero_grad()
    model(ids, cu_seqlens=cu).sin().sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sum(model(p[None]).sin().sum() for p in pieces(ids, cu)).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)
    model.zero_grad()


def test_tokens_never_cross_a_boundary(model):
    """Changing the first document leaves the second's logits bit-identical."""
    ids = torch.randint(3, 97, (1, 30))
    cu = bounds([12, 18])
    a = model(ids, cu_seqlens=cu)
    ids2 = ids.clone()
    ids2[0, :12] = torch.randint(3, 97, (12,))
    b = model(ids2, cu_seqlens=cu)
    assert torch.equal(a[:, 12:], b[:, 12:]) and not torch.equal(a[:, :12], b[:, :12])


def test_packed_input_errors(model):
    ids = torch.randint(3, 97, (2, 10))
    with pytest.raises(ValueError, match="every row start b\\*T .* missing \\[10\\]"):
        model(ids, cu_seqlens=torch.tensor([0, 4, 20]))
    with pytest.raises(ValueError, match="not both"):
        model(ids, attention_mask=torch.ones(2, 10), cu_seqlens=torch.tensor([0, 10, 20]))
    with pytest.raises(ValueError, match="end at the packed length T = 20"):
        model(ids, cu_seqlens=torch.tensor([0, 10, 19]))
    with pytest.raises(TypeError, match="`cu_seqlens` must be a 1-D integer tensor"):
        model(ids, cu_seqlens=[0, 10, 20])
    with pytest.raises(ValueError, match="`state` must be a RecurrentState or a sequence of 3"):
        model.prefill(ids[:1], [torch.zeros(1)], cu_seqlens=torch.tensor([0, 4, 10]))


# ---- batched prefill of unequal prompts ------------------------------------------------------------------------

def test_packed_prefill_rows_equal_each_prompt_alone(model):
    prompts = [torch.randint(3, 97, (n,)) for n in (5, 17, 1, 40)]
    ids, cu = torch.cat(prompts)[None], bounds([len(p) for p in prompts])
    logits, state = model.prefill(ids, cu_seqlens=cu, last_only=True)
    full, _ = model.prefill(ids, cu_seqlens=cu)
    assert logits.shape == (4, 1, 97) and full.shape == (1, 63, 97)
    assert state.batch_size == 4 and state.position.tolist() == [5, 17, 1, 40]
    for i, p in enumerate(prompts):
        ref, S = model.prefill(p[None])
        torch.testing.assert_close(logits[i], ref[0, -1:], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(full[0, cu[i]:cu[i + 1]], ref[0], rtol=1e-10, atol=1e-10)
        for a, b in zip(state, S):
            torch.testing.assert_close(a[i:i + 1], b, rtol=1e-10, atol=1e-12)
    # continuing every row from its own position: packed chunked prefill == each prompt's second chunk alone
    more = [torch.randint(3, 97, (n,)) for n in (3, 0, 8, 2)]
    logits2, state2 = model.prefill(torch.cat(more)[None], state, cu_seqlens=bounds([len(p) for p in more]),
                                    last_only=True)
    assert state2.position.tolist() == [8, 17, 9, 42]
    assert torch.isnan(logits2[1]).all()                        # an empty chunk has no last position
    for i in (0, 2, 3):
        ref, _ = model.prefill(torch.cat([prompts[i], more[i]])[None])
        torch.testing.assert_close(logits2[i], ref[0, -1:], rtol=1e-9, atol=1e-10)
    nxt = torch.randint(3, 97, (4,))
    step, _ = model.step(nxt, state2)
    for i in (0, 2, 3):
        ref, _ = model.prefill(torch.cat([prompts[i], more[i], nxt[i:i + 1]])[None])
        torch.testing.assert_close(step[i], ref[0, -1], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("eos", [None, 7])
def test_generate_unequal_prompts_equals_each_alone(model, eos):
    prompts = [torch.randint(3, 97, (n,)) for n in (6, 1, 23)] + [[5, 9, 11]]
    out = generate(model, prompts, max_new_tokens=9, temperature=0.0, eos_token_id=eos)
    assert isinstance(out, list) and len(out) == 4
    n = out[0].numel() - 6
    for p, o in zip(prompts, out):
        p = torch.as_tensor(p)
        alone = generate(model, p[None], max_new_tokens=9, temperature=0.0, eos_token_id=eos)[0]
        assert o.numel() == p.numel() + n
        if eos is None:
            assert torch.equal(o, alone)
        else:       # the batch runs as long as its longest row: after its eos a row holds the pad id
            k = min(alone.numel(), o.numel())
            assert torch.equal(o[:k], alone[:k]) and (o[k:] == model.config.pad_token_id).all()


def test_generate_unequal_prompts_without_packed_prefill_pads():
    """A model whose prefill takes no cu_seqlens (the Transformer baseline) gets left-padded prompts."""
    torch.manual_seed(2)
    m = TransformerLM(TransNormerConfig(**CFG)).double().eval()
    prompts = [torch.randint(3, 97, (n,)) for n in (4, 11)]
    out = generate(m, prompts, max_new_tokens=5)
    for p, o in zip(prompts, out):
        assert torch.equal(o, generate(m, p[None], max_new_tokens=5)[0])
    with pytest.raises(ValueError, match="at least one token"):
        generate(m, [torch.tensor([3, 4]), torch.tensor([], dtype=torch.long)], max_new_tokens=2)


# ---- data and loss -----------------------------------------------------------------------------------------------

def _loader(docs, documents, **kw):
    enc = lambda b: np.frombuffer(b, dtype=np.uint8).astype(np.int64) % 90 + 3  # noqa: E731
    return PackedLoader(docs, enc, 16, 3, bos_id=1, eos_id=2, documents=documents, **kw)


DOCS = [Document(name=f"d{i}", inline="abcdefghijklmnopqrstuvwxyz"[: n]) for i, n in enumerate([3, 20, 1, 7, 0, 5, 9])]


def test_document_batches_mark_every_document_start():
    plain, docs = _loader(DOCS, False), _loader(DOCS, True)
    for _ in range(4):
        rows, b = plain.next_batch(), docs.next_batch()
        assert isinstance(b, DocumentBatch)
        assert torch.equal(b.input_ids, rows[:, :-1])                 # the same token stream
        ign = b.targets == IGNORE_INDEX
        assert torch.equal(torch.where(ign, rows[:, 1:], b.targets), rows[:, 1:])
        assert torch.equal(ign, rows[:, 1:] == 1)                     # skipped exactly where a document starts (bos)
        cu = b.cu_seqlens.tolist()
        starts = set(cu[:-1])
        flat = b.input_ids.reshape(-1).tolist()
        assert cu[-1] == 48 and {0, 16, 32} <= starts
        assert starts == {0, 16, 32} | {i for i, t in enumerate(flat) if t == 1}
        assert b.cu_seqlens.dtype == torch.int32
    assert docs.state_dict() == plain.state_dict()


def test_loss_skips_cross_document_targets(model):
    b = _loader(DOCS, True).next_batch()
    loss = lm_loss(model, b, chunk_tokens=10_000)
    chunked = lm_loss(model, b, chunk_tokens=7)
    # by hand: every piece alone, its targets the next tokens of the row, those that start a document dropped
    total, count = 0.0, 0
    x, y = b.input_ids.reshape(-1), b.targets.reshape(-1)
    cu = b.cu_seqlens.tolist()
    for a, e in zip(cu[:-1], cu[1:]):
        if e > a:
            lg = model(x[a:e][None])[0]
            keep = y[a:e] != IGNORE_INDEX
            total = total + F.cross_entropy(lg[keep].float(), y[a:e][keep], reduction="sum")
            count += int(keep.sum())
    torch.testing.assert_close(loss, total / count, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked, loss, rtol=1e-6, atol=1e-6)


def test_train_with_pack_documents(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(8):
        (corpus / f"m{d}.py").write_text("".join(f"x{d} = {i}\n" for i in range(3 + 5 * d)))
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), preset="tiny", data=str(corpus), seq_len=32, batch_size=4,
                      steps=4, warmup_steps=1, eval_every=2, eval_batches=1, progress=False, plot=False,
                      val_fraction=0.3, device="cpu", pack_documents=True)
    t = Trainer(cfg, log=lambda m: None)
    summary = t.fit()
    assert isinstance(t.val_batches[0], DocumentBatch)
    losses = [r["loss"] for r in t.history if "loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses)) and np.isfinite(summary["val_loss"])
    with pytest.raises(ValueError, match="pack_documents must be a bool"):
        TrainConfig(pack_documents="yes").validate()


def test_cli_pack_documents_flag(tmp_path):
    from tnllm.cli import main
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i}\n" for i in range(300)))
    rc = main(["train", "--preset", "tiny", "--data", str(corpus), "--steps", "2", "--seq-len", "16",
               "--batch-size", "2", "--eval-batches", "1", "--out", str(tmp_path / "r"), "--no-progress",
               "--no-plot", "--device", "cpu", "--pack-documents"])
    assert rc in (0, None)
    from tnllm import checkpoints as ckpt
    assert ckpt.load_trainer_state(tmp_path / "r")["train_config"]["pack_documents"] is True


def test_packed_paths_trace_without_graph_breaks(model):
    """forward and packed prefill with cu_seqlens trace as one graph (the boundary checks are in-graph)."""
    ids, cu = torch.randint(3, 97, (2, 20)), torch.tensor([0, 5, 20, 33, 40])
    e = torch._dynamo.explain(model)(ids, cu_seqlens=cu)
    assert (e.graph_count, e.graph_break_count) == (1, 0), e.break_reasons
    e = torch._dynamo.explain(lambda i, c: model.prefill(i, cu_seqlens=c, last_only=True)[0])(ids[:1], cu[:3])
    assert (e.graph_count, e.graph_break_count) == (1, 0), e.break_reasons
