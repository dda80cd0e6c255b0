"""generate() (tnllm/generate.py) on TransNormerLLM and the Transformer baseline."""
import numpy as np
import pytest
import torch

from tnllm import TransNormerConfig, TransNormerLLM, generate
from tnllm.baseline import TransformerLM, matched_config
from tnllm.generate import TextStreamer, sample_next
from tnllm.tokenizer import ByteTokenizer

PROMPTS = [[1, 50, 60, 70, 80, 90, 91], [1, 33], [1, 100, 101, 102, 7], [1, 200, 201, 202, 203, 204, 205]]


def _model(arch, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = TransNormerConfig.from_preset("tiny", init_std=0.2, **kw)     # larger init: peaked, decisive logits
    m = TransNormerLLM(cfg) if arch == "transnormer" else TransformerLM(matched_config(cfg))
    return m.eval()


def _left_pad(prompts, pad=0):
    T = max(map(len, prompts))
    ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask, T


@pytest.mark.parametrize("arch", ["transnormer", "transformer"])
def test_left_padded_batch_equals_one_by_one(arch):
    m = _model(arch)
    ids, mask, T = _left_pad(PROMPTS)
    batch = generate(m, ids, max_new_tokens=24, attention_mask=mask)
    assert batch.shape == (len(PROMPTS), T + 24)
    for i, p in enumerate(PROMPTS):
        one = generate(m, torch.tensor([p]), max_new_tokens=24)
        assert batch[i, T:].tolist() == one[0, len(p):].tolist()
    # and the logits behind them
    lb, _ = m.prefill(ids, attention_mask=mask)
    for i, p in enumerate(PROMPTS):
        lo, _ = m.prefill(torch.tensor([p]))
        torch.testing.assert_close(lb[i, T - len(p):], lo[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["transnormer", "transformer"])
def test_greedy_equals_full_forward_argmax(arch):
    m = _model(arch, seed=1)
    out = generate(m, torch.tensor([PROMPTS[0]]), max_new_tokens=12)
    logits = m(out[:, :-1])
    assert out[0, len(PROMPTS[0]):].tolist() == logits[0, len(PROMPTS[0]) - 1:].argmax(-1).tolist()


def test_state_does_not_grow():
    m = _model("transnormer")
    sizes = []

    class Spy:
        config = m.config

        def parameters(self):
            return m.parameters()

        def prefill(self, *a, **k):
            return m.prefill(*a, **k)

        def step(self, ids, state):
            sizes.append(sum(s.numel() for s in state))
            return m.step(ids, state)

    generate(Spy(), torch.tensor([PROMPTS[0]]), max_new_tokens=40)
    assert len(sizes) == 39 and len(set(sizes)) == 1


def test_sampling_reproducible_and_options():
    m = _model("transnormer")
    x = torch.tensor([PROMPTS[2]])
    a = generate(m, x, 20, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    b = generate(m, x, 20, temperature=1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(generate(m, x, 10, temperature=1.5, top_k=1, seed=3), generate(m, x, 10))   # top-1 = greedy
    assert torch.equal(generate(m, x, 10, temperature=0.7, top_p=1e-6, seed=3), generate(m, x, 10))
    rep = generate(m, x, 30, repetition_penalty=1e4)     # a huge penalty never repeats a seen token
    new = rep[0, len(PROMPTS[2]):].tolist()
    assert len(set(new)) == len(new) and not set(new) & set(PROMPTS[2])


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {0, 1}


def test_eos_stops_and_pads():
    m = _model("transnormer")
    x = torch.tensor([PROMPTS[0], PROMPTS[0][:1] + PROMPTS[3][1:7]])
    free = generate(m, x, 16)
    eos = int(free[0, x.shape[1] + 2])          # row 0's third new token plays the end-of-text token
    out = generate(m, x, 16, eos_token_id=eos, pad_token_id=0)
    row0 = out[0, x.shape[1]:].tolist()
    k = row0.index(eos)
    assert all(t == 0 for t in row0[k + 1:])
    assert out.shape[1] <= free.shape[1]


def test_streamer_sees_every_token():
    m = _model("transnormer")
    seen = []
    out = generate(m, torch.tensor(PROMPTS[:1]), 9, streamer=lambda t: seen.append(t.clone()))
    assert torch.equal(torch.stack(seen, 1), out[:, len(PROMPTS[0]):])


def test_text_streamer_holds_partial_utf8():
    tok = ByteTokenizer()
    pieces = []
    s = TextStreamer(tok, pieces.append, stop_ids=[2])
    for t in tok.encode("aé✓b") + [2, 70]:
        s(torch.tensor([t]))
    s.flush()
    assert "".join(pieces) == "aé✓b" and "\ufffd" not in "".join(pieces)


class _NumpyStep:
    """Stands in for tnllm.export.OnnxRecurrentDecoder: numpy step with a per-row position."""

    def __init__(self, model):
        self.m = model

    def step(self, ids, state=None):
        from tnllm.export import OnnxState
        from tnllm.model import RecurrentState
        B = ids.shape[0]
        if state is None:
            st = self.m.zero_state(B)
            pos = np.zeros(B, np.int64)
        else:
            pos = state.position
            st = RecurrentState([torch.from_numpy(s.copy()) for s in state], 0)
        outs, new = [], []
        for b in range(B):       # rows can sit at different positions
            row = RecurrentState([s[b:b + 1] for s in st], int(pos[b]))
            lg, ns = self.m.step(torch.from_numpy(ids[b:b + 1]), row)
            outs.append(lg)
            new.append(ns)
        states = [torch.cat([n[i] for n in new]).numpy() for i in range(len(st))]
        return torch.cat(outs).numpy(), OnnxState(states, pos + 1)


def test_numpy_step_decoder_left_padding_matches_torch():
    m = _model("transnormer")
    ids, mask, T = _left_pad(PROMPTS[:3])
    ref = generate(m, ids, 10, attention_mask=mask)
    from tnllm.export import OnnxDecoder
    got = generate(OnnxDecoder(_NumpyStep(m)), ids, 10, attention_mask=mask)
    assert torch.equal(ref, got)


def test_bad_inputs():
    m = _model("transnormer")
    x = torch.tensor([PROMPTS[0]])
    with pytest.raises(ValueError, match="temperature"):
        generate(m, x, 4, temperature=-0.5)
    with pytest.raises(ValueError, match="top_k"):
        generate(m, x, 4, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(m, x, 4, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="repetition_penalty"):
        generate(m, x, 4, repetition_penalty=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(m, x, -1)
    with pytest.raises(ValueError, match="at least one token"):
        generate(m, torch.zeros(1, 0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="input_ids"):
        generate(m, torch.tensor(PROMPTS[0]), 4)
    with pytest.raises(ValueError, match="left-padded"):
        generate(m, torch.tensor([[5, 6, 0]]), 4, attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(TypeError, match="prefill"):
        generate(object(), x, 4)
    short = _model("transnormer", max_position_embeddings=16)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(short, torch.ones(1, 10, dtype=torch.long), max_new_tokens=8)
    assert generate(short, torch.ones(1, 10, dtype=torch.long), max_new_tokens=6).shape == (1, 16)
