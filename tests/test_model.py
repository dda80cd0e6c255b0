"""TransNormerLLM: exact to the released model; parallel == prefill == step; compile; presets; bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from tnllm import RecurrentState, TransNormerConfig, TransNormerLLM, decay_rates
from tnllm.config import alibi_slopes


def tiny(**kw):
    base = dict(vocab_size=97, decoder_embed_dim=64, decoder_layers=3, decoder_attention_heads=4, glu_dim=96)
    base.update(kw)
    return TransNormerConfig(**base)


def model64(seed=0, **kw):
    torch.manual_seed(seed)
    m = TransNormerLLM(tiny(init_std=0.2, **kw)).double().eval()
    return m


def reference_logits(m: TransNormerLLM, ids):
    """The released model's maths written out literally with the quadratic masked form, independent of tnllm.ops."""
    cfg = m.config
    L, H, e = cfg.decoder_layers, cfg.decoder_attention_heads, cfg.head_dim
    rms = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    x = m.model.embed_tokens.weight[ids] * (1.0 if cfg.no_scale_embedding else math.sqrt(cfg.decoder_embed_dim))
    B, T, _ = x.shape
    t = torch.arange(T, dtype=torch.float64)
    slopes = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], dtype=torch.float64)
    for l, layer in enumerate(m.model.layers):
        tm = layer.token_mixer
        q, k, v, u = F.linear(rms(x), tm.qkvu_proj.weight).chunk(4, -1)
        q, k, v = (a.reshape(B, T, H, e).transpose(1, 2) for a in (q, k, v))
        q, k = F.silu(q), F.silu(k)
        if l == 0:
            ang = tm.lrpe.theta.double() * t[:, None]
            q = torch.cat([q * ang.cos(), q * ang.sin()], -1)
            k = torch.cat([k * ang.cos(), k * ang.sin()], -1)
        s = (slopes * (1 - l / (L - 1) + 1e-5)).float().double()   # the rate is an fp32 tensor
        dist = (t[:, None] - t[None, :])
        mask = torch.exp(-s[:, None, None] * dist.clamp(min=0)) * (dist >= 0)
        o = ((q @ k.transpose(-1, -2)) * mask) @ v
        o = o.transpose(1, 2).reshape(B, T, -1)
        x = x + F.linear(u * rms(o), tm.out_proj.weight)
        ch = layer.channel_mixer
        y = rms(x)
        x = x + F.linear(F.linear(y, ch.l1.weight) * F.linear(y, ch.l2.weight), ch.l3.weight)
    return F.linear(rms(x), m.model.embed_tokens.weight)


def test_forward_matches_literal_spec():
    m = model64()
    ids = torch.randint(1, 97, (2, 50))
    torch.testing.assert_close(m(ids), reference_logits(m, ids), rtol=1e-9, atol=1e-9)


def test_parallel_equals_prefill_and_steps():
    m = model64(1)
    ids = torch.randint(0, 97, (2, 40))
    full = m(ids)
    lp, st = m.prefill(ids[:, :17])
    torch.testing.assert_close(lp, full[:, :17], rtol=1e-8, atol=1e-8)
    for t in range(17, 40):
        lt, st = m.step(ids[:, t], st)
        torch.testing.assert_close(lt, full[:, t], rtol=1e-8, atol=1e-8)
    assert isinstance(st, RecurrentState) and st.offset == 40 and len(st) == 3
    want = [(2, *hkv) for hkv in m.state_shapes()]
    assert [tuple(S.shape) for S in st] == want and all(S.dtype == torch.float64 for S in st)
    assert want[0] == (2, 4, 32, 16) and want[1] == (2, 4, 16, 16)      # LRPE layer 0: Dk = 2 e


@pytest.mark.parametrize("tokens", [[5, 6, 7, 8, 9, 10, 11, 12] * 12, [5, 6, 7, 8]])
def test_nan_embedding_row_stays_causal(tokens):
    """A NaN embedding row used at position 3 leaves the logits at positions 0-2 finite and bit-equal
    to the clean run (every form of Lightning Attention masks with wheres, not 0 * NaN)."""
    torch.manual_seed(0)
    m = TransNormerLLM(tiny(tie_word_embeddings=False)).eval()
    ids = torch.tensor([tokens, [9] * len(tokens)])
    clean = m(ids)
    clean_pre, _ = m.prefill(ids)
    with torch.no_grad():
        m.model.embed_tokens.weight[8] = float("nan")
    bad = m(ids)
    assert torch.isfinite(bad[0, :3]).all() and torch.equal(bad[0, :3], clean[0, :3])
    assert not torch.isfinite(bad[0, 3]).all()
    assert torch.equal(bad[1], clean[1])                 # the other row never sees token 8
    bad_pre, _ = m.prefill(ids)
    assert torch.equal(bad_pre[0, :3], clean_pre[0, :3])


def test_step_from_scratch_equals_parallel():
    m = model64(2)
    ids = torch.randint(0, 97, (3, 12))
    full = m(ids)
    st = None
    for t in range(12):
        lt, st = m.step(ids[:, t], st)
        torch.testing.assert_close(lt, full[:, t], rtol=1e-8, atol=1e-8)


def test_split_prefill_equals_full_prefill():
    m = model64(3)
    ids = torch.randint(0, 97, (2, 90))
    lf, sf = m.prefill(ids)
    la, sa = m.prefill(ids[:, :33])
    lb, sb = m.prefill(ids[:, 33:70], sa)
    lc, sc = m.prefill(ids[:, 70:], sb)
    torch.testing.assert_close(torch.cat([la, lb, lc], 1), lf, rtol=1e-8, atol=1e-8)
    for a, b in zip(sc, sf):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)
    assert sc.offset == sf.offset == 90


def test_state_dtype_is_fp32_for_fp32_model():
    m = TransNormerLLM(tiny())
    _, st = m.prefill(torch.randint(0, 97, (2, 5)))
    assert all(S.dtype == torch.float32 for S in st)
    assert st[0].shape == (2, 4, 32, 16) and st[1].shape == (2, 4, 16, 16)


def test_padded_continuation_is_refused():
    m = model64(6)
    ids = torch.randint(3, 97, (2, 10))
    _, st = m.prefill(ids)
    mask = torch.ones(2, 4)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        m.prefill(ids[:, :4], st, attention_mask=mask)
    m.prefill(ids[:, :4], st, attention_mask=torch.ones(2, 4))      # no padding: fine
    m.prefill(ids[:, :4], m.zero_state(2), attention_mask=mask)      # from the zero state: fine


def test_left_padding_mask_keeps_rows_exact():
    m = model64(4)
    ids = torch.randint(3, 97, (1, 20))
    pad = torch.cat([torch.zeros(1, 7, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 7), torch.ones(1, 20)], 1)
    torch.testing.assert_close(m(pad, attention_mask=mask)[:, 7:], m(ids), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("act", ["silu", "swish", "relu", "none"])
@pytest.mark.parametrize("scale", [True, False])
def test_config_variants_agree_across_paths(act, scale):
    m = model64(5, linear_act_fun=act, no_scale_embedding=not scale, linear_use_lrpe_list=[1, 0, 1])
    ids = torch.randint(0, 97, (2, 9))
    full = m(ids)
    _, st = m.prefill(ids[:, :4])
    for t in range(4, 9):
        lt, st = m.step(ids[:, t], st)
    torch.testing.assert_close(lt, full[:, -1], rtol=1e-8, atol=1e-8)


def test_decay_schedule():
    assert alibi_slopes(8) == [2 ** (-(h + 1)) for h in range(8)]
    assert alibi_slopes(4) == [2 ** (-2 * (h + 1)) for h in range(4)]
    # non power of two: slopes of 8, then every other slope of 16, first 12 - 8 of them
    s12 = alibi_slopes(12)
    s16 = [2 ** (-0.5 * (h + 1)) for h in range(16)]
    assert s12 == pytest.approx([2 ** (-(h + 1)) for h in range(8)] + s16[0::2][:4])
    cfg = TransNormerConfig.from_preset("tiny")  # L = 2
    torch.testing.assert_close(decay_rates(cfg, 0), torch.tensor(alibi_slopes(4)) * (1 + 1e-5))
    torch.testing.assert_close(decay_rates(cfg, 1), torch.tensor(alibi_slopes(4)) * 1e-5)
    one = TransNormerConfig(vocab_size=10, decoder_embed_dim=8, decoder_layers=1, decoder_attention_heads=2, glu_dim=8)
    assert torch.isfinite(decay_rates(one, 0)).all()


def test_decay_not_in_state_dict_and_no_grad():
    m = TransNormerLLM(tiny())
    sd = m.state_dict()
    assert not any(k.endswith(".s") for k in sd)
    assert "model.layers.0.token_mixer.lrpe.theta" in sd and sd["model.layers.0.token_mixer.lrpe.theta"].shape == (4, 1, 16)
    assert "model.layers.1.token_mixer.lrpe.theta" not in sd
    assert all(not b.requires_grad for b in m.buffers())
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_released_key_names():
    m = TransNormerLLM(tiny())
    keys = set(m.state_dict())
    want = {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.token_mixer.lrpe.theta"}
    for i in range(3):
        want |= {f"model.layers.{i}.token_mixer.qkvu_proj.weight", f"model.layers.{i}.token_mixer.out_proj.weight"}
        want |= {f"model.layers.{i}.channel_mixer.{n}.weight" for n in ("l1", "l2", "l3")}
    assert keys == want


def test_init():
    torch.manual_seed(0)
    m = TransNormerLLM(TransNormerConfig.from_preset("small"))
    w = m.model.layers[1].channel_mixer.l1.weight
    assert abs(float(w.std()) - 0.02) < 1e-3
    assert float(m.model.embed_tokens.weight[0].abs().max()) == 0.0
    th = m.model.layers[0].token_mixer.lrpe.theta.flatten()
    n = th.numel()
    torch.testing.assert_close(th, 10000 ** (-2 * torch.arange(n, dtype=torch.float32) / n))


@pytest.mark.parametrize("name,count", [("1B", 1.020e9), ("7B", 6.84e9)])
def test_preset_param_counts(name, count):
    cfg = TransNormerConfig.from_preset(name)
    with torch.device("meta"):
        m = TransNormerLLM(cfg)
    assert m.num_params() == cfg.num_params()
    assert abs(m.num_params() - count) / count < 2e-3, m.num_params()


def test_presets_and_config_roundtrip(tmp_path):
    for name in ("385M", "1B", "3B", "7B"):
        cfg = TransNormerConfig.from_preset(name)
        assert cfg.head_dim == 128
        assert TransNormerConfig.from_dict(cfg.to_dict()) == cfg
    assert TransNormerConfig.from_preset("1B").no_scale_embedding is False
    assert TransNormerConfig.from_preset("7B").no_scale_embedding is True
    cfg = TransNormerConfig.from_dict({**tiny().to_dict(), "some_released_field": 3})
    cfg.to_json(tmp_path / "c.json")
    back = TransNormerConfig.from_json(tmp_path / "c.json")
    assert back == cfg and back.extra == {"some_released_field": 3}
    with pytest.raises(ValueError, match="unknown preset"):
        TransNormerConfig.from_preset("2B")


@pytest.mark.parametrize("kw,exc,match", [
    (dict(decoder_attention_heads=5), ValueError, "divisible"),
    (dict(linear_act_fun="gelu"), ValueError, "linear_act_fun"),
    (dict(decoder_layers=2.5), TypeError, "decoder_layers"),
    (dict(linear_use_lrpe_list=[1]), ValueError, "linear_use_lrpe_list"),
    (dict(no_scale_embedding="yes"), TypeError, "no_scale_embedding"),
    (dict(vocab_size=0), ValueError, "vocab_size"),
])
def test_bad_config(kw, exc, match):
    with pytest.raises(exc, match=match):
        tiny(**kw)


def test_bad_model_input():
    m = TransNormerLLM(tiny())
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match="input_ids"):
        m(torch.rand(1, 3))
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.tensor([1, 2]))
    _, st = m.prefill(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="token_ids"):
        m.step(torch.tensor([[1]]), st)
    with pytest.raises(ValueError, match=r"state\[0\]"):
        m.step(torch.tensor([1, 2]), st)          # batch 2 vs state batch 1
    with pytest.raises(ValueError, match="state"):
        m.step(torch.tensor([1]), st[:2])
    with pytest.raises(TypeError, match=r"state\[1\]"):
        m.step(torch.tensor([1]), [st[0], st[1].half(), st[2]])
    with pytest.raises(ValueError, match=r"state\[0\]` is on meta"):
        m.step(torch.tensor([1]), [S.to("meta") for S in st])
    with pytest.raises(ValueError, match="position is unknown"):
        m.step(torch.tensor([1]), [S.clone() for S in st])      # a plain list of non-zero states
    m.step(torch.tensor([1]), [torch.zeros_like(S) for S in st])  # zeros: the start of a sequence
    lr, _ = m.step(torch.tensor([1]), RecurrentState([S.clone() for S in st], st.offset))
    torch.testing.assert_close(lr, m.step(torch.tensor([1]), st)[0])
    with pytest.raises(TypeError, match="TransNormerConfig"):
        TransNormerLLM({"vocab_size": 3})


def test_compile_matches_eager_no_graph_break_no_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = TransNormerLLM(tiny())
    ref = TransNormerLLM(tiny())
    ref.load_state_dict(m.state_dict())
    cnt = CompileCounterWithBackend("inductor")
    m.compile(backend=cnt)
    frames = []
    for T in (21, 40, 77):
        ids = torch.randint(0, 97, (2, T))
        out = m(ids)
        frames.append(cnt.frame_count)
        out.float().square().mean().backward()
        r = ref(ids)
        r.float().square().mean().backward()
        torch.testing.assert_close(out, r, rtol=1e-5, atol=1e-5)
        for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert frames[0] >= 1 and frames[-1] == frames[0], f"recompiled for a new length: frames {frames}"
    assert set(m.state_dict()) == set(ref.state_dict())
    expl = torch._dynamo.explain(ref.forward)(ids)
    assert expl.graph_break_count == 0, expl.break_reasons


def test_empty_length_and_batch_are_valid():
    # review: T = 0 (e.g. model.prefill(ids[:, k:]) with k = T) and B = 0 crashed in a reshape deep inside
    m = model64()
    ids = torch.randint(1, 97, (2, 6))
    assert m(ids[:, :0]).shape == (2, 0, 97)
    _, st = m.prefill(ids)
    logits, st2 = m.prefill(ids[:, :0], st)
    assert logits.shape == (2, 0, 97) and st2.offset == st.offset
    for a, b in zip(st, st2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    logits, st0 = m.step(ids[:0, 0])
    assert logits.shape == (0, 97) and st0[0].shape[0] == 0


def test_bad_attention_mask_is_a_clear_error():
    m = TransNormerLLM(tiny())
    ids = torch.randint(1, 97, (2, 6))
    with pytest.raises(ValueError, match="attention_mask"):
        m(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        m.prefill(ids, attention_mask=torch.ones(6))
    with pytest.raises(TypeError, match="attention_mask"):
        m.hidden_states(ids, attention_mask=[[1] * 6] * 2)


from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_HYP_MODEL = model64(11, linear_use_lrpe_list=[1, 0, 1])


@given(T=st.integers(2, 70), data=st.data())
def test_any_chunking_equals_parallel(T, data):
    """Property: cutting a sequence into any chunks (prefill) and single steps gives the parallel logits."""
    m = _HYP_MODEL
    seed = data.draw(st.integers(0, 2**31 - 1))
    ids = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(seed))
    full = m(ids)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, T - 1), max_size=4))))
    bounds = [0] + cuts + [T]
    state, outs = None, []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a == 1 and data.draw(st.booleans()):
            lt, state = m.step(ids[:, a], state)
            outs.append(lt[:, None])
        else:
            lp, state = m.prefill(ids[:, a:b], state)
            outs.append(lp)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-8, atol=1e-8)
    assert state.offset == T
