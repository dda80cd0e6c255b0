"""Compile policies and the static-buffer decoder. The buffer logic runs on CPU (no graph); the CUDA
graph capture and the compiled step run under ``pytest -m gpu`` (and ``-m slow`` for CPU compile)."""
import pytest
import torch

from tnllm import RecurrentState, TransNormerConfig, TransNormerLLM
from tnllm.compile import CudaGraphDecoder, compile_model, is_compiled

V = 259


def _model(device="cpu", seed=0):
    torch.manual_seed(seed)
    m = TransNormerLLM(TransNormerConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(8.0)                      # logits far from uniform: greedy paths diverge on any error
    return m.to(device)


def _reference_greedy(model, ids, n):
    with torch.no_grad():
        logits, st = model.prefill(ids)
        out, tok = [ids], logits[:, -1].argmax(-1)
        for i in range(n):
            out.append(tok[:, None])
            if i + 1 < n:
                lg, st = model.step(tok, st)
                tok = lg.argmax(-1)
    return torch.cat(out, 1)


@pytest.fixture(scope="module")
def model():
    return _model()


def test_static_buffers_match_model_step(model):
    dec = CudaGraphDecoder(model, 3)
    assert not dec.cuda_graph and dec.graph is None
    ids = torch.randint(1, V, (3, 6))
    with torch.no_grad():
        lt, st = model.prefill(ids)
    last = dec.prefill(ids)
    assert torch.equal(last, lt[:, -1])
    assert dec.position.tolist() == [6, 6, 6]
    tok = last.argmax(-1)
    for _ in range(10):
        got = dec.step(tok)
        with torch.no_grad():
            want, st = model.step(tok, st)
        assert torch.equal(got, want)
        tok = got.argmax(-1)
    snap = dec.state()
    assert snap.offset == st.offset == 16
    assert all(torch.equal(a, b) for a, b in zip(snap, st))


def test_step_returns_fresh_logits(model):
    dec = CudaGraphDecoder(model, 2)
    a = dec.step(torch.tensor([1, 2]))
    b = dec.step(torch.tensor([3, 4]))
    assert not torch.equal(a, b) and a.data_ptr() != dec.logits.data_ptr()


def test_generate_matches_reference_and_tnllm_generate(model):
    from tnllm.generate import generate
    ids = torch.randint(1, V, (4, 5))
    want = _reference_greedy(model, ids, 12)
    dec = CudaGraphDecoder(model, 4)
    assert torch.equal(dec.generate(ids, 12), want)
    assert torch.equal(generate(dec, ids, max_new_tokens=12), want)     # generate()'s start/step protocol
    assert torch.equal(generate(model, ids, max_new_tokens=12), want)


def test_reset_with_per_row_positions(model):
    """Rows at different positions share one buffer set; each matches model.step at its offset."""
    B = 3
    states = [torch.randn(B, l.token_mixer.num_heads, l.token_mixer.key_dim, l.token_mixer.head_dim) * 0.3
              for l in model.model.layers]
    pos = torch.tensor([0, 17, 5000])
    dec = CudaGraphDecoder(model, B)
    dec.reset(RecurrentState(states, 0), position=pos)
    ids = torch.tensor([4, 8, 15])
    got = dec.step(ids)
    assert dec.position.tolist() == [1, 18, 5001]
    for r in range(B):
        with torch.no_grad():
            want, _ = model.step(ids[r:r + 1], RecurrentState([s[r:r + 1] for s in states], int(pos[r])))
        torch.testing.assert_close(got[r], want[0], atol=1e-5, rtol=1e-5)
    snap = dec.state()
    assert snap.position.tolist() == [1, 18, 5001] and snap.shared_offset is None
    with pytest.raises(ValueError, match="different positions"):
        snap.offset
    dec.reset()
    assert dec.position.tolist() == [0, 0, 0] and all(not b.any() for b in dec.states)


def test_decoder_bad_inputs(model):
    with pytest.raises(ValueError, match="batch_size"):
        CudaGraphDecoder(model, 0)
    with pytest.raises(TypeError, match="TransNormerLLM"):
        CudaGraphDecoder(torch.nn.Linear(2, 2), 1)
    with pytest.raises(ValueError, match="CUDA"):
        CudaGraphDecoder(model, 1, cuda_graph=True)
    with pytest.raises(ValueError, match="mode"):
        CudaGraphDecoder(model, 1, mode="fastest")
    dec = CudaGraphDecoder(model, 2)
    with pytest.raises(ValueError, match="2 rows"):
        dec.step(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="token ids outside"):
        dec.step(torch.tensor([1, V]))
    with pytest.raises(TypeError, match="integer"):
        dec.step(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="static buffers"):
        dec.step(torch.tensor([1, 2]), model.zero_state(2))
    with pytest.raises(ValueError, match="must have shape"):
        dec.reset([torch.zeros(2, 4, 16, 16), torch.zeros(2, 4, 16, 16)])      # layer 0 needs Dk = 32
    with pytest.raises(ValueError, match="position"):
        dec.reset(position=-1)
    with pytest.raises(ValueError, match="position"):
        dec.reset(position=torch.tensor([1, 2, 3]))
    assert dec.start(torch.tensor([[1, 2], [3, 4]]), None)[1] is dec.buffers


def test_compile_model_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="mode"):
        compile_model(model, mode="turbo")
    with pytest.raises(TypeError, match="model.layers"):
        compile_model(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_compile_model_and_compiled_decoder_cpu(request):
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("inductor compile on CPU takes minutes on 2 cores: run with -m slow")
    m = _model(seed=1)
    ids = torch.randint(1, V, (2, 9))
    with torch.no_grad():
        want = m(ids)
    want_gen = _reference_greedy(m, ids, 6)
    dec = CudaGraphDecoder(m, 2, compile=True)
    assert torch.equal(dec.generate(ids, 6), want_gen)
    compile_model(m)
    assert is_compiled(m)
    with torch.no_grad():
        torch.testing.assert_close(m(ids), want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_graph_decoder_matches_eager(compiled):
    m = _model("cuda", seed=2)
    ids = torch.randint(1, V, (3, 7), device="cuda")
    want = _reference_greedy(m, ids, 24)
    dec = CudaGraphDecoder(m, 3, compile=compiled)
    got = dec.generate(ids, 24)
    assert dec.graph is not None
    assert torch.equal(got, want)
    # replaying after a reset starts over: the graph reads the buffers, not captured values
    got2 = dec.generate(ids, 24)
    assert torch.equal(got2, want)
