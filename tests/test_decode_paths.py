"""The recurrent step's paths on CPU: the aten step and the fused decode op (``decode_kernel=True``; on
CPU the op runs its reference form, so the two are bit-identical), in place and functional, through
``model.step``, ``CudaGraphDecoder(decode_path=...)`` and torch.compile(fullgraph=True). The Triton
kernel itself runs through the model under TRITON_INTERPRET=1 in tests/interpret/test_decode_model_interpreted.py."""
import pytest
import torch

from tnllm import RecurrentState, TransNormerConfig, TransNormerLLM
from tnllm.compile import CudaGraphDecoder
from tnllm.testing import decode_against_step

V = 259


def _model(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    m = TransNormerLLM(TransNormerConfig.from_preset("tiny", **kw)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4.0)
    return m.to(dtype)


def _random_state(m, B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, *hkv, generator=g) * 0.3 for hkv in m.state_shapes()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
def test_kernel_step_equals_aten_step(dtype, per_row):
    m, B = _model(dtype=dtype), 3
    st0 = _random_state(m, B)
    pos = torch.tensor([0, 9, 100000]) if per_row else 41
    a = RecurrentState([S.clone() for S in st0], pos)
    k = RecurrentState([S.clone() for S in st0], pos)
    ids = torch.randint(1, V, (5, B))
    with torch.no_grad():
        for t in range(5):
            la, a = m.step(ids[t], a, decode_kernel=False)
            lk, k = m.step(ids[t], k, decode_kernel=True)
            assert torch.equal(la, lk), f"token {t}"
    assert all(torch.equal(x, y) for x, y in zip(a, k))
    assert torch.equal(a.position, k.position)


def test_inplace_step_writes_the_given_tensors():
    m, B = _model(), 2
    st0 = _random_state(m, B)
    for kernel in (False, True):
        bufs = [S.clone() for S in st0]
        st = RecurrentState(bufs, 7)
        with torch.no_grad():
            lg, new = m.step(torch.tensor([3, 4]), st, inplace=True, decode_kernel=kernel)
            want, ref = m.step(torch.tensor([3, 4]), RecurrentState([S.clone() for S in st0], 7))
        assert all(n is b for n, b in zip(new, bufs)) and new.offset == 8
        assert torch.equal(lg, want) and all(torch.equal(b, r) for b, r in zip(bufs, ref))


def test_auto_is_the_aten_step_on_cpu(monkeypatch):
    import tnllm.model as model_mod
    m = _model()

    def boom(*a, **k):
        raise AssertionError("the fused op ran on CPU under auto")
    monkeypatch.setattr(model_mod, "gla_decode_step", boom)
    with torch.no_grad():
        m.step(torch.tensor([1, 2]))                              # auto: aten on CPU
        with pytest.raises(AssertionError, match="fused op ran"):
            m.step(torch.tensor([1, 2]), decode_kernel=True)
    for layer in m.model.layers:
        assert not layer.token_mixer.uses_kernel(torch.zeros(1, 1, 64), torch.zeros(1, 4, 32, 16))


def test_module_attribute_forces_a_path():
    m = _model()
    tm = m.model.layers[0].token_mixer
    x, S = torch.zeros(1, 1, 64), torch.zeros(1, 4, 32, 16)
    tm.decode_kernel = True
    assert tm.uses_kernel(x, S) and not tm.uses_kernel(x, S, kernel=False)
    tm.decode_kernel = False
    assert not tm.uses_kernel(x, S) and tm.uses_kernel(x, S, kernel=True)
    tm.decode_kernel = "on"
    with pytest.raises(ValueError, match="`decode_kernel` must be None"):
        tm.uses_kernel(x, S)


def test_forcing_the_kernel_where_it_cannot_run_is_an_error():
    m = _model(norm_type="rmsnorm")
    with torch.no_grad(), pytest.raises(ValueError, match="rmsnorm"):
        m.step(torch.tensor([1]), decode_kernel=True)
    with pytest.raises(ValueError, match="decode_path='kernel'.*rmsnorm"):
        CudaGraphDecoder(m, 1, decode_path="kernel")
    assert CudaGraphDecoder(m, 1).decode_path == "aten"
    with pytest.raises(ValueError, match="`decode_kernel` must be None"):
        _model().step(torch.tensor([1]), decode_kernel="yes")
    with pytest.raises(ValueError, match="`decode_path` must be one of"):
        CudaGraphDecoder(_model(), 1, decode_path="triton")


@pytest.mark.parametrize("path", ["aten", "kernel"])
def test_decoder_paths_equal_model_step(path):
    m, B = _model(), 3
    dec = CudaGraphDecoder(m, B, decode_path=path)
    assert dec.decode_path == path
    assert CudaGraphDecoder(m, B).decode_path == "aten"              # auto on CPU
    pairs, got_states, want_states = decode_against_step(dec, m, torch.randint(1, V, (B, 4)), 6)
    assert all(torch.equal(got, want) for got, want in pairs)
    assert all(torch.equal(a, b) for a, b in zip(got_states, want_states))


def test_compiled_kernel_step_fullgraph():
    """model.step through the in-place op under torch.compile(fullgraph=True): one graph, no break,
    the state buffers updated in place, equal to the eager aten step (aot_eager: the ops' fake kernels
    and functionalization, without a C++ build)."""
    torch._dynamo.reset()
    m, B = _model(), 2
    st0 = _random_state(m, B)
    bufs, pos = [S.clone() for S in st0], torch.tensor([3, 70000])
    state = RecurrentState(bufs, pos)
    ids = torch.tensor([5, 6])

    def f(ids):
        return m.step(ids, state, inplace=True, decode_kernel=True)[0]
    with torch.no_grad():
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(ids)
        want, ref = m.step(ids, RecurrentState([S.clone() for S in st0], pos), decode_kernel=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all(torch.equal(b, r) for b, r in zip(bufs, ref))
    with torch.no_grad():
        expl = torch._dynamo.explain(f)(ids)
    assert expl.graph_break_count == 0 and expl.graph_count == 1


# -- the fused step (decode_path="fused"): the norms folded, l1|l2 stacked, residual adds in the GEMMs ----------
def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_fused_decoder_matches_model_step(dtype, tol):
    m, B = _model(dtype=dtype), 3
    dec = CudaGraphDecoder(m, B, decode_path="fused")
    assert dec.decode_path == "fused" and dec.fused.extra_bytes == sum(
        2 * 96 * 64 * m.lm_head.weight.element_size() for _ in m.model.layers) + 4 * 1 * 16 * 4
    ids = torch.randint(1, V, (B, 4))
    with torch.no_grad():
        _, st = m.prefill(ids)
    dec.prefill(ids)
    g = torch.Generator().manual_seed(3)
    for t in range(6):
        tok = torch.randint(1, V, (B,), generator=g)
        got = dec.step(tok)
        with torch.no_grad():
            want, st = m.step(tok, st)
        assert _rel(got, want.float()) <= tol, f"token {t}"
        if dtype == torch.float32:
            assert torch.equal(got.argmax(-1), want.argmax(-1))
    for a, b in zip(dec.state(), st):
        assert _rel(a, b) <= tol


def test_fused_step_follows_weight_updates():
    m, B = _model(), 2
    dec = CudaGraphDecoder(m, B, decode_path="fused")
    tok = torch.tensor([5, 9])
    assert dec.fused.refresh() == (0, False)               # nothing changed since it was built
    with torch.no_grad():
        m.model.layers[1].channel_mixer.l2.weight.mul_(-0.5)     # in place: the version counter moves
        m.model.layers[0].token_mixer.lrpe.theta.add_(0.01)
    got = dec.step(tok)                                       # step() re-copies the changed layers
    with torch.no_grad():
        want, _ = m.step(tok, RecurrentState(m.zero_state(B), 0))
    assert _rel(got, want) <= 2e-6
    assert dec.fused.refresh() == (0, False)


def test_fused_path_refuses_models_it_cannot_run():
    for kw, msg in ((dict(norm_type="rmsnorm"), "rmsnorm"), (dict(bias=True), "bias")):
        with pytest.raises(ValueError, match=f"decode_path='fused' cannot run this model: .*{msg}"):
            CudaGraphDecoder(_model(**kw), 1, decode_path="fused")
    assert CudaGraphDecoder(_model(bias=True), 1, decode_path="kernel").decode_path == "kernel"


def test_fused_step_compiles_fullgraph():
    from tnllm.compile import FusedDecodeStep
    torch._dynamo.reset()
    m, B = _model(), 2
    fs = FusedDecodeStep(m)
    st0 = _random_state(m, B)
    pos, ids = torch.tensor([4, 80000]), torch.tensor([7, 8])
    a, b = [S.clone() for S in st0], [S.clone() for S in st0]
    want = fs(ids, a, pos)
    got = torch.compile(fs.__call__, fullgraph=True, backend="aot_eager")(ids, b, pos)
    assert torch.equal(got, want) and all(torch.equal(x, y) for x, y in zip(a, b))
    expl = torch._dynamo.explain(fs.__call__)(ids, [S.clone() for S in st0], pos)
    assert expl.graph_break_count == 0 and expl.graph_count == 1


def test_stack_rows_of_int8_weights_is_exact():
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from tnllm.compile.fused_step import stack_rows
    lin = torch.nn.ModuleList([torch.nn.Linear(32, 48, bias=False), torch.nn.Linear(32, 40, bias=False)])
    lin = lin.to(torch.bfloat16)
    quantize_(lin, Int8WeightOnlyConfig())
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    w12 = stack_rows(lin[0].weight, lin[1].weight)
    assert tuple(w12.shape) == (88, 32) and type(w12) is type(lin[0].weight)
    assert torch.equal(torch.nn.functional.linear(x, w12), torch.cat([lin[0](x), lin[1](x)], -1))
