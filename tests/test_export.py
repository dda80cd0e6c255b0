"""Export of the recurrent step: ONNX (+ onnxruntime decoder, prefill graph, int8) and torch.export.

The oracle is the PyTorch model itself (``model.prefill`` / ``model.step``), fp32, "tiny" preset.
"""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tnllm import RecurrentState, TransNormerConfig, TransNormerLLM

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tnllm.export import (OnnxRecurrentDecoder, OnnxState, RecurrentStep, export_checkpoint_onnx,  # noqa: E402
                          export_onnx, export_onnx_prefill, export_program, load_program, run_program,
                          save_program)

pytestmark = pytest.mark.filterwarnings("ignore")
V = 259


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = TransNormerLLM(TransNormerConfig.from_preset("tiny")).eval()
    with torch.no_grad():     # larger weights than the init so logits are far from uniform
        for p in m.parameters():
            p.mul_(8.0)
    return m


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    return {"step": export_onnx(model, d / "step.onnx"), "prefill": export_onnx_prefill(model, d / "prefill.onnx"),
            "dir": d}


@pytest.fixture(scope="module")
def dec(files):
    return OnnxRecurrentDecoder(files["step"], threads=1)   # no spinning ORT threads beside torch's on 2 cores


def _random_state(model, B, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, l.token_mixer.num_heads, l.token_mixer.key_dim, l.token_mixer.head_dim, generator=g) * scale
            for l in model.model.layers]


# -- the graph ------------------------------------------------------------------------------------
def test_graph_signature(files, dec, model):
    import onnx
    m = onnx.load(str(files["step"]))
    names = [i.name for i in m.graph.input]
    assert names == ["ids", "position", "state_0", "state_1"]
    assert [o.name for o in m.graph.output] == ["logits", "new_state_0", "new_state_1"]
    assert all(i.type.tensor_type.shape.dim[0].dim_param for i in m.graph.input), "batch dim must be symbolic"
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert not any(n.domain.startswith("tnllm") for n in m.graph.node)
    assert dec.num_layers == 2 and dec.vocab_size == V
    assert dec.state_shapes == [(4, 32, 16), (4, 16, 16)]       # LRPE layer 0 has Dk = 2e
    assert dec.metadata["tnllm.kind"] == "step"


@pytest.mark.parametrize("B", [1, 3, 8])
def test_onnx_greedy_64_steps_match_torch(dec, model, B):
    """One exported file, several batch sizes: 64 greedy steps give identical tokens, logits within 1e-4."""
    torch.manual_seed(B)
    prompt = torch.randint(1, V, (B, 5))
    with torch.no_grad():
        lt, st_t = model.prefill(prompt)
    lo, st_o = dec.prefill(prompt.numpy())
    assert np.abs(lo - lt.numpy()).max() <= 1e-4
    tok_t = tok_o = lt[:, -1].argmax(-1)
    worst = 0.0
    for _ in range(64):
        with torch.no_grad():
            lt, st_t = model.step(tok_t, st_t)
        lo, st_o = dec.step(tok_o.numpy() if isinstance(tok_o, torch.Tensor) else tok_o, st_o)
        worst = max(worst, float(np.abs(lo - lt.numpy()).max()))
        tok_t, tok_o = lt.argmax(-1), lo.argmax(-1)
        assert np.array_equal(tok_t.numpy(), tok_o)
    assert worst <= 1e-4
    assert st_o.offset == st_t.offset == 5 + 64
    for a, b in zip(st_o, st_t):      # fp32 rounding accumulates over 69 updates: relative to the state's scale
        np.testing.assert_allclose(a, b.numpy(), atol=1e-5 * float(b.abs().max()), rtol=0)


@settings(max_examples=10)
@given(B=st.integers(1, 6), seed=st.integers(0, 2**16), pos=st.lists(st.integers(0, 100_000), min_size=6, max_size=6))
def test_onnx_step_per_row_positions(dec, model, B, seed, pos):
    """Rows at different positions in one batch: each equals the PyTorch step at its own offset."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B,), generator=g)
    states = _random_state(model, B, seed)
    lo, new = dec.step(ids.numpy(), OnnxState([s.numpy() for s in states], np.array(pos[:B])))
    assert new.position.tolist() == [p + 1 for p in pos[:B]]
    for r in range(B):
        with torch.no_grad():
            lt, st_t = model.step(ids[r:r + 1], RecurrentState([s[r:r + 1] for s in states], pos[r]))
        np.testing.assert_allclose(lo[r], lt[0].numpy(), atol=1e-4, rtol=1e-4)
        for a, b in zip(new, st_t):
            np.testing.assert_allclose(a[r], b[0].numpy(), atol=1e-4, rtol=1e-4)


def test_onnx_generate_matches_torch_generate(dec, model):
    from tnllm.generate import generate
    prompt = torch.randint(1, V, (2, 4))
    want = generate(model, prompt, max_new_tokens=12)
    got = dec.generate(prompt.numpy(), max_new_tokens=12)
    assert got.shape == (2, 16) and np.array_equal(got, want.numpy())
    eos = int(got[0, 6])
    first = 4 + list(got[0, 4:]).index(eos)
    early = dec.generate(prompt.numpy(), max_new_tokens=12, eos_token_id=eos)
    assert early.shape[1] <= 16 and early[0, first] == eos
    assert (early[0, first + 1:] == model.config.pad_token_id).all()     # the one finished-row rule: pad after eos
    s1 = dec.generate(prompt.numpy(), 8, temperature=1.0, top_k=5, seed=3)
    s2 = dec.generate(prompt.numpy(), 8, temperature=1.0, top_k=5, seed=3)
    assert np.array_equal(s1, s2)


def test_onnx_prefill_with_left_padding(dec, model):
    ids = torch.randint(1, V, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        lt, st_t = model.prefill(ids, attention_mask=mask)
    lo, st_o = dec.prefill(ids.numpy(), attention_mask=mask.numpy())
    np.testing.assert_allclose(lo[:, -1], lt[:, -1].numpy(), atol=1e-4)
    for a, b in zip(st_o, st_t):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-5)


@pytest.mark.parametrize("T,chunk", [(1, 256), (17, 256), (17, 4)])
def test_prefill_graph_dynamic_length(files, model, T, chunk):
    """The exported prefill graph (custom op decomposed to the quadratic form) == model.prefill, also
    continued from a state and in chunks."""
    d = OnnxRecurrentDecoder(files["step"], prefill_path=files["prefill"], threads=1)
    ids, more = torch.randint(1, V, (3, T)), torch.randint(1, V, (3, 3))
    with torch.no_grad():
        lt, st_t = model.prefill(ids)
        lt2, st_t2 = model.prefill(more, st_t)
    lo, st_o = d.prefill(ids.numpy(), chunk=chunk)
    lo2, st_o2 = d.prefill(more.numpy(), st_o)
    np.testing.assert_allclose(lo, lt.numpy(), atol=1e-4)
    np.testing.assert_allclose(lo2, lt2.numpy(), atol=1e-4)
    assert st_o2.offset == st_t2.offset == T + 3
    for a, b in zip(st_o2, st_t2):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4)


# -- bad inputs ------------------------------------------------------------------------------------
def test_onnx_bad_inputs(dec, model):
    good = dec.zero_state(2)
    with pytest.raises(ValueError, match="token ids outside"):
        dec.step(np.array([1, V]), good)
    with pytest.raises(ValueError, match="token ids outside"):
        dec.step(np.array([-1, 3]))
    with pytest.raises(TypeError, match="integer token ids"):
        dec.step(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        dec.step(np.array([[1, 2]]))
    with pytest.raises(ValueError, match="must hold 2 per-layer arrays"):
        dec.step(np.array([1, 2]), OnnxState(list(good)[:1], 0))
    with pytest.raises(TypeError, match="float32"):
        dec.step(np.array([1, 2]), OnnxState([s.astype(np.float64) for s in good], 0))
    with pytest.raises(ValueError, match=r"state\[1\]` must have shape"):
        dec.step(np.array([1, 2]), OnnxState([good[0], good[1][:, :2]], 0))
    with pytest.raises(ValueError, match=r"state\[0\]` must have shape"):
        dec.step(np.array([1, 2, 3]), good)                 # batch mismatch
    with pytest.raises(TypeError, match="without a position"):
        dec.step(np.array([1, 2]), list(good))
    with pytest.raises(ValueError, match="token ids outside"):
        dec.prefill(np.array([[1, 2, 400]]))
    # a torch RecurrentState is accepted (its offset is the position)
    lg, st_o = dec.step(np.array([1, 2]), model.zero_state(2))
    assert st_o.offset == 1


def test_torch_bad_inputs(model):
    step = RecurrentStep(model)
    ids, pos = torch.tensor([1, 2]), torch.tensor([0, 0])
    st_ok = tuple(model.zero_state(2))
    with pytest.raises(ValueError, match="token ids outside"):
        model.step(torch.tensor([1, V]), model.zero_state(2))
    with pytest.raises(ValueError, match="must have shape"):
        model.step(ids, [st_ok[0][:, :3], st_ok[1]])
    with pytest.raises(ValueError, match="sequence of 2"):
        model.step(ids, st_ok[:1])
    with pytest.raises(ValueError, match="token ids outside"):
        step(torch.tensor([-1, 2]), pos, st_ok)
    with pytest.raises(TypeError, match="must be fp32"):
        step(ids, pos, tuple(s.double() for s in st_ok))
    with pytest.raises(ValueError, match="must hold 2 per-layer"):
        step(ids, pos, st_ok[:1])
    with pytest.raises(ValueError, match=r"state_1` must have shape"):
        step(ids, pos, (st_ok[0], st_ok[1][:1]))
    with pytest.raises(TypeError, match="position"):
        step(ids, torch.tensor(0), st_ok)
    with pytest.raises(TypeError, match="int64"):
        step(ids.int(), pos, st_ok)


def test_export_rejects_bad_arguments(model, tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path / "x.onnx", opset=13)
    with pytest.raises(TypeError, match="TransNormerLLM"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="quantize"):
        export_checkpoint_onnx(tmp_path, tmp_path / "x.onnx", quantize="int4")
    with pytest.raises(FileNotFoundError):
        export_checkpoint_onnx(tmp_path / "missing", tmp_path / "x.onnx")
    with pytest.raises(FileNotFoundError):
        OnnxRecurrentDecoder(tmp_path / "missing.onnx")


# -- checkpoints and int8 ---------------------------------------------------------------------------
def test_export_checkpoint_with_int8(model, tmp_path):
    from tnllm.tokenizer import ByteTokenizer
    model.save_pretrained(tmp_path / "ckpt")
    ByteTokenizer().save(tmp_path / "ckpt")        # load_model returns (model, tokenizer)
    rep = export_checkpoint_onnx(tmp_path / "ckpt", tmp_path / "out" / "m.onnx", opset=18, quantize="int8")
    assert (tmp_path / "out" / "m.onnx").is_file() and (tmp_path / "out" / "m.int8.onnx").is_file()
    assert (tmp_path / "out" / "m.export.json").is_file()
    acc = rep["int8_accuracy"]
    assert acc["rel_rms_logit_err"] < 0.05 and acc["top1_agreement"] >= 0.9
    assert rep["int8_bytes"] < rep["bytes"]
    d = OnnxRecurrentDecoder(rep["path"])
    with torch.no_grad():
        lt, _ = model.step(torch.tensor([5, 9]))
    lo, _ = d.step(np.array([5, 9]))
    np.testing.assert_allclose(lo, lt.numpy(), atol=1e-4)


# -- torch.export ------------------------------------------------------------------------------------
def test_torch_export_round_trip_identical(model, tmp_path):
    ep = export_program(model)
    path = save_program(ep, tmp_path / "step.pt2")
    ep2 = load_program(path)
    for B in (1, 5):
        ids = torch.randint(0, V, (B,))
        pos = torch.arange(B) * 1000
        states = tuple(_random_state(model, B, B))
        with torch.no_grad():
            want_l, want_s = RecurrentStep(model)(ids, pos, states)
        for prog in (ep, ep2):
            got_l, got_s = run_program(prog, ids, pos, states)
            assert torch.equal(got_l, want_l)
            assert all(torch.equal(a, b) for a, b in zip(got_s, want_s))
    # a fresh process without tnllm imported loads and runs it (the step has no custom op)
    code = textwrap.dedent(f"""
        import torch
        ep = torch.export.load({str(path)!r})
        st = (torch.zeros(2, 4, 32, 16), torch.zeros(2, 4, 16, 16))
        lg, new = ep.module()(torch.tensor([3, 4]), torch.tensor([0, 0]), st)
        assert lg.shape == (2, {V}) and len(new) == 2
        import sys; assert "tnllm" not in sys.modules
        print("ok")""")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_recurrent_step_is_the_model_step(model):
    """The export module runs the model's own step: equal to model.step bit for bit."""
    ids = torch.randint(0, V, (3,))
    states = _random_state(model, 3)
    with torch.no_grad():
        a, sa = model.step(ids, RecurrentState(states, 42))
        b, sb = RecurrentStep(model)(ids, torch.full((3,), 42), tuple(states))
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(sa, sb))


def test_export_of_an_eval_model_does_not_warn_about_training_mode(model, tmp_path):
    # review: the RecurrentStep wrapper was a fresh Module in training mode, so torch.onnx warned
    # "Exporting a model while it is in training mode" for every eval() model
    import warnings
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        export_onnx(model, tmp_path / "step.onnx", verify=False)
    assert not [w for w in rec if "training mode" in str(w.message)]
    assert not model.training
