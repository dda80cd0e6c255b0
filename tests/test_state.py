"""RecurrentState's per-row positions and continuous batching: a new sequence put into one row of a running
batch (``reset_rows`` / ``load_rows``) decodes exactly as it would alone, while the other rows keep going;
through the model's step and through CudaGraphDecoder's static buffers (the HTTP server's path)."""
import pytest
import torch

from tnllm import RecurrentState, TransNormerConfig, TransNormerLLM
from tnllm.compile import CudaGraphDecoder

CFG = dict(vocab_size=61, decoder_embed_dim=32, decoder_layers=2, decoder_attention_heads=4, glu_dim=48,
           linear_use_lrpe_list=[1, 0])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TransNormerLLM(TransNormerConfig(**CFG)).eval()


def _alone(model, prompt, tokens):
    """Logits of each of ``tokens`` after ``prompt``, the sequence alone in a batch of one."""
    with torch.no_grad():
        _, st = model.prefill(prompt[None])
        out = []
        for t in tokens:
            lg, st = model.step(t.view(1), st)
            out.append(lg[0])
    return torch.stack(out)


def test_positions_and_offset():
    S = [torch.zeros(3, 2, 4, 4)]
    st = RecurrentState(S, 5)
    assert st.shared_offset == 5 and st.offset == 5 and st.position.tolist() == [5, 5, 5]
    assert st.position.dtype == torch.int64
    assert st.advanced(S, 2).shared_offset == 7
    per_row = RecurrentState(S, torch.tensor([1, 2, 3]))
    assert per_row.shared_offset is None and per_row.advanced(S, 1).position.tolist() == [2, 3, 4]
    with pytest.raises(ValueError, match="different positions"):
        per_row.offset
    assert RecurrentState(S, torch.tensor([4, 4, 4])).offset == 4
    for bad in (-1, 1.5, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="position"):
            RecurrentState(S, bad)


def test_reset_and_load_rows_in_place():
    S = [torch.ones(3, 2, 4, 4), torch.ones(3, 2, 4, 4)]
    st = RecurrentState(S, 9)
    assert st.reset_rows([1]) is st
    assert st.position.tolist() == [9, 0, 9] and st.shared_offset is None
    assert not S[0][1].any() and S[0][0].all() and not S[1][1].any()
    src = RecurrentState([torch.full((1, 2, 4, 4), 2.0), torch.full((1, 2, 4, 4), 3.0)], 4)
    st.load_rows(torch.tensor([False, False, True]), src)
    assert st.position.tolist() == [9, 0, 4] and S[0][2].eq(2).all() and S[1][2].eq(3).all()
    with pytest.raises(ValueError, match="out of range"):
        st.reset_rows([3])
    with pytest.raises(ValueError, match="rows"):
        st.load_rows([0, 1], src)
    with pytest.raises(ValueError, match="mask"):
        st.reset_rows(torch.tensor([True, False]))


def _continuous_batching(model, start, step, reset_rows, load_rows):
    """Rows 0 and 2 run prompts a and c; after 3 steps row 1 (prompt b) is replaced by prompt d, then
    after 2 more steps row 0 restarts from nothing. Returns per-row logits and the sequences they belong to."""
    g = torch.Generator().manual_seed(3)
    a, b, c, d = (torch.randint(3, 61, (n,), generator=g) for n in (7, 7, 7, 4))
    toks = torch.randint(3, 61, (8, 3), generator=g)
    start(torch.stack([a, b, c]))
    got = [[], [], []]
    for i in range(8):
        if i == 3:
            with torch.no_grad():
                _, st = model.prefill(d[None].to(model.lm_head.weight.device))
            load_rows([1], st)
        if i == 5:
            reset_rows(torch.tensor([True, False, False]))
        lg = step(toks[i])
        for r in range(3):
            got[r].append(lg[r])
    return got, (a, b, c, d), toks


@pytest.mark.parametrize("via", ["model", "decoder"])
def test_a_new_sequence_in_one_row_of_a_running_batch(model, via):
    if via == "model":
        box = {}

        def start(ids):
            with torch.no_grad():
                box["st"] = model.prefill(ids)[1]

        def step(t):
            with torch.no_grad():
                lg, box["st"] = model.step(t, box["st"])
            return lg

        reset_rows = lambda rows: box["st"].reset_rows(rows)
        load_rows = lambda rows, st: box["st"].load_rows(rows, st)
    else:
        dec = CudaGraphDecoder(model, 3)
        start, step, reset_rows, load_rows = dec.prefill, dec.step, dec.reset_rows, dec.load_rows
    got, (a, b, c, d), toks = _continuous_batching(model, start, step, reset_rows, load_rows)
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(got[2]), _alone(model, c, toks[:, 2]), **close)      # untouched row
    torch.testing.assert_close(torch.stack(got[1][:3]), _alone(model, b, toks[:3, 1]), **close)
    torch.testing.assert_close(torch.stack(got[1][3:]), _alone(model, d, toks[3:, 1]), **close)  # the new sequence
    torch.testing.assert_close(torch.stack(got[0][:5]), _alone(model, a, toks[:5, 0]), **close)
    with torch.no_grad():           # row 0 restarted: position 0, zero state
        st, ref = None, []
        for t in toks[5:, 0]:
            lg, st = model.step(t.view(1), st)
            ref.append(lg[0])
    torch.testing.assert_close(torch.stack(got[0][5:]), torch.stack(ref), **close)


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_continuous_batching_in_a_cuda_graph(compiled):
    """reset_rows / load_rows on the static buffers between graph replays (no re-capture) give each row
    what it gets alone, the captured graph included."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    m = TransNormerLLM(TransNormerConfig(**CFG)).eval().cuda()
    dec = CudaGraphDecoder(m, 3, compile=compiled)
    assert dec.cuda_graph
    got, (a, b, c, d), toks = _continuous_batching(
        m, lambda ids: dec.prefill(ids.cuda()), lambda t: dec.step(t.cuda()).cpu(), dec.reset_rows,
        lambda rows, st: dec.load_rows(rows, st))
    graph = dec.graph
    assert graph is not None
    mc = m.cpu()
    close = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.stack(got[2]), _alone(mc, c, toks[:, 2]), **close)
    torch.testing.assert_close(torch.stack(got[1][3:]), _alone(mc, d, toks[3:, 1]), **close)
    torch.testing.assert_close(torch.stack(got[0][:5]), _alone(mc, a, toks[:5, 0]), **close)
