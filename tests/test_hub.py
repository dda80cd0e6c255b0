"""Released-checkpoint compatibility (tnllm/hub.py, issue 7).

Synthetic folders in the released Hugging Face layout are written here with the official key names and
shapes of the released model, independently of tnllm's modules. They are loaded with ``from_pretrained`` and
compared (a) with a ``TransNormerLLM`` whose weights are placed by hand, attribute by attribute
(logits bit-equal) and (b) with an fp64 re-implementation of the released forward written from the raw
tensors (quadratic masked form, ALiBi decay), which checks that the key names mean what the released code
means by them.
"""
import json
import logging
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tnllm import TransNormerConfig, TransNormerLLM
from tnllm.checkpoints import convert, load_pretrained
from tnllm.hub import save_pretrained

from tnllm.testing import rel_err as rel_rms

V, D, L, H, G = 67, 32, 3, 4, 48


# ------------------------------------------------------------------------------------------------
# synthetic released folders
# ------------------------------------------------------------------------------------------------
def released_config(**kw):
    """A config.json as the released models ship it (extra HF fields included)."""
    c = {"architectures": ["TransnormerForCausalLM"], "auto_map": {"AutoConfig": "configuration_transnormer.TransnormerConfig"},
         "model_type": "transnormer", "transformers_version": "4.31.0", "torch_dtype": "bfloat16", "use_cache": True,
         "add_bos_token": False, "init_std": 0.02, "bias": False, "norm_type": "simplermsnorm",
         "vocab_size": V, "decoder_embed_dim": D, "decoder_layers": L, "decoder_attention_heads": H,
         "hidden_dim": D, "glu_dim": G, "linear_act_fun": "swish", "linear_use_lrpe_list": [1] + [0] * (L - 1),
         "no_scale_embedding": False, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    c.update(kw)
    return c


def released_weights(c, seed=0, head=True, untied=False):
    """Official keys and shapes of the released checkpoints, random values (theta at its closed-form init)."""
    g = torch.Generator().manual_seed(seed)
    d, h, n_heads, glu, vocab = c["decoder_embed_dim"], c["hidden_dim"], c["decoder_attention_heads"], c["glu_dim"], c["vocab_size"]
    e = h // n_heads

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    sd = {"model.embed_tokens.weight": w(vocab, d)}
    for i in range(c["decoder_layers"]):
        p = f"model.layers.{i}."
        sd[p + "token_mixer.qkvu_proj.weight"] = w(4 * h, d)
        sd[p + "token_mixer.out_proj.weight"] = w(d, h)
        if c["linear_use_lrpe_list"][i]:
            n = n_heads * e
            theta = 10000 ** (-2 / n * torch.arange(n, dtype=torch.float32))
            sd[p + "token_mixer.lrpe.theta"] = (theta * (1 + 0.1 * torch.rand(n, generator=g))).reshape(n_heads, 1, e)
        sd[p + "channel_mixer.l1.weight"] = w(glu, d)
        sd[p + "channel_mixer.l2.weight"] = w(glu, d)
        sd[p + "channel_mixer.l3.weight"] = w(d, glu)
    if untied:
        sd["lm_head.weight"] = w(vocab, d)
    elif head:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    return sd


def write_folder(folder, c, sd, fmt="safetensors", shards=1, dtype=None, extra_files=()):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(c))
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    keys = list(sd)
    if shards == 1:
        if fmt == "safetensors":
            save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        else:
            torch.save(sd, folder / "pytorch_model.bin")
    else:
        stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
        wmap = {}
        for j in range(shards):
            name = f"{stem}-{j + 1:05d}-of-{shards:05d}.{ext}"
            part = {k: sd[k] for k in keys[j::shards]}
            if fmt == "safetensors":
                save_file(part, str(folder / name), metadata={"format": "pt"})
            else:
                torch.save(part, folder / name)
            wmap.update({k: name for k in part})
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())}, "weight_map": wmap}
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index))
    for name, text in extra_files:
        (folder / name).write_text(text)
    return folder


# ------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------
def place_by_hand(c, sd):
    """A TransNormerLLM with the tensors set attribute by attribute (no state_dict machinery)."""
    cfg = TransNormerConfig.from_dict({k: v for k, v in c.items()})
    m = TransNormerLLM(cfg).eval()
    with torch.no_grad():
        m.model.embed_tokens.weight.copy_(sd["model.embed_tokens.weight"])
        for i, layer in enumerate(m.model.layers):
            p = f"model.layers.{i}."
            layer.token_mixer.qkvu_proj.weight.copy_(sd[p + "token_mixer.qkvu_proj.weight"])
            layer.token_mixer.out_proj.weight.copy_(sd[p + "token_mixer.out_proj.weight"])
            if layer.token_mixer.lrpe is not None:
                layer.token_mixer.lrpe.theta.copy_(sd[p + "token_mixer.lrpe.theta"])
            for n in ("l1", "l2", "l3"):
                getattr(layer.channel_mixer, n).weight.copy_(sd[p + f"channel_mixer.{n}.weight"])
        if not cfg.tie_word_embeddings:
            m.lm_head.weight.copy_(sd["lm_head.weight"])
    return m


def _alibi(n):
    if math.log2(n).is_integer():
        return [2 ** (-8 * (h + 1) / n) for h in range(n)]
    c = 2 ** math.floor(math.log2(n))
    return _alibi(c) + _alibi(2 * c)[0::2][: n - c]


def released_forward(c, sd, ids):
    """The released TransnormerForCausalLM forward in fp64, written from the raw tensors."""
    sd = {k: v.double() for k, v in sd.items()}
    d, n_heads, layers = c["decoder_embed_dim"], c["decoder_attention_heads"], c["decoder_layers"]
    act = {"swish": F.silu, "silu": F.silu, "relu": F.relu, "none": lambda x: x}[c["linear_act_fun"]]

    def srms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    B, T = ids.shape
    x = sd["model.embed_tokens.weight"][ids] * (1.0 if c["no_scale_embedding"] else math.sqrt(d))
    slopes = torch.tensor(_alibi(n_heads), dtype=torch.float64).reshape(n_heads, 1, 1)
    t = torch.arange(T, dtype=torch.float64)
    dist = t[:, None] - t[None, :]
    for i in range(layers):
        p = f"model.layers.{i}."
        q, k, v, u = (srms(x) @ sd[p + "token_mixer.qkvu_proj.weight"].T).chunk(4, -1)
        q, k, v = (z.reshape(B, T, n_heads, -1).transpose(1, 2) for z in (q, k, v))
        q, k = act(q), act(k)
        if c["linear_use_lrpe_list"][i]:
            ang = sd[p + "token_mixer.lrpe.theta"] * t[:, None]            # [H, T, e]
            q = torch.cat([q * torch.cos(ang), q * torch.sin(ang)], -1)
            k = torch.cat([k * torch.cos(ang), k * torch.sin(ang)], -1)
        s = slopes * (1 - i / (layers - 1) + 1e-5)
        decay = torch.where(dist >= 0, torch.exp(-s * dist.clamp_min(0)), torch.zeros(()))
        o = ((q @ k.transpose(-1, -2)) * decay) @ v
        o = srms(o.transpose(1, 2).reshape(B, T, -1)) * u
        x = x + o @ sd[p + "token_mixer.out_proj.weight"].T
        y = srms(x)
        x = x + ((y @ sd[p + "channel_mixer.l1.weight"].T) * (y @ sd[p + "channel_mixer.l2.weight"].T)) \
            @ sd[p + "channel_mixer.l3.weight"].T
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return srms(x) @ head.T


IDS = torch.tensor([[1, 5, 9, 33, 2, 60, 7, 7, 12, 3, 44, 0, 18], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]])


def check_against_references(model, c, sd):
    with torch.no_grad():
        got = model(IDS)
        assert torch.equal(got, place_by_hand(c, sd)(IDS)), "loaded != placed by hand"
        err = rel_rms(got, released_forward(c, sd, IDS))
    assert err < 2e-5, f"loaded model vs fp64 released forward: rel RMS {err:.2e}"


# ------------------------------------------------------------------------------------------------
# loading released layouts
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,shards", [("safetensors", 1), ("bin", 1), ("safetensors", 3), ("bin", 2)],
                         ids=["st", "bin", "st-sharded3", "bin-sharded2"])
@pytest.mark.parametrize("head", [True, False], ids=["head-in-file", "head-absent"])
def test_load_released_layouts(tmp_path, fmt, shards, head):
    c = released_config()
    sd = released_weights(c, head=head)
    folder = write_folder(tmp_path / "ck", c, sd, fmt=fmt, shards=shards)
    model = TransNormerLLM.from_pretrained(folder)
    assert not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.float32
    assert model.config.extra["auto_map"] == c["auto_map"]       # unknown released fields are kept
    theta = model.model.layers[0].token_mixer.lrpe.theta
    assert tuple(theta.shape) == (H, 1, D // H) and torch.equal(theta, sd["model.layers.0.token_mixer.lrpe.theta"])
    check_against_references(model, c, sd)


@pytest.mark.parametrize("no_scale", [False, True])
@pytest.mark.parametrize("act", ["swish", "silu", "none", "relu"])
def test_config_variants(tmp_path, no_scale, act):
    c = released_config(no_scale_embedding=no_scale, linear_act_fun=act)
    sd = released_weights(c, seed=1)
    model = load_pretrained(write_folder(tmp_path / "ck", c, sd))
    assert model.model.embed_scale == (1.0 if no_scale else math.sqrt(D))
    check_against_references(model, c, sd)


@pytest.mark.parametrize("lrpe", [[1, 0, 0], [0, 0, 0], [1, 1, 1], [0, 1, 0]], ids=lambda l: "".join(map(str, l)))
def test_lrpe_list_variants(tmp_path, lrpe):
    c = released_config(linear_use_lrpe_list=lrpe)
    sd = released_weights(c, seed=2)
    model = load_pretrained(write_folder(tmp_path / "ck", c, sd))
    assert [layer.token_mixer.lrpe is not None for layer in model.model.layers] == [bool(f) for f in lrpe]
    check_against_references(model, c, sd)


def test_non_power_of_two_heads(tmp_path):
    c = released_config(decoder_attention_heads=6, decoder_embed_dim=48, hidden_dim=48)
    sd = released_weights(c, seed=3)
    check_against_references(load_pretrained(write_folder(tmp_path / "ck", c, sd)), c, sd)


def test_untied_head(tmp_path):
    c = released_config(tie_word_embeddings=False)
    sd = released_weights(c, untied=True)
    model = load_pretrained(write_folder(tmp_path / "ck", c, sd))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"])
    check_against_references(model, c, sd)


def test_bf16_file(tmp_path):
    c = released_config()
    sd = {k: v.to(torch.bfloat16) for k, v in released_weights(c, seed=4).items()}
    folder = write_folder(tmp_path / "ck", c, sd, fmt="bin", shards=2)
    m32 = load_pretrained(folder)                              # default: fp32, exact upcast
    assert all(p.dtype == torch.float32 for p in m32.parameters())
    check_against_references(m32, c, {k: v.float() for k, v in sd.items()})
    m16 = load_pretrained(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    for k, v in m16.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert m16.model.layers[1].token_mixer.s.dtype == torch.float32   # decay stays fp32
    mauto = load_pretrained(folder, dtype="auto")
    assert mauto.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert rel_rms(m16(IDS), m32(IDS)) < 3e-2


def test_mixed_dtype_file_auto_keeps_each(tmp_path):
    c = released_config()
    sd = {k: (v if k.endswith("theta") else v.to(torch.bfloat16)) for k, v in released_weights(c).items()}
    model = load_pretrained(write_folder(tmp_path / "ck", c, sd), dtype="auto")
    for k, v in model.state_dict().items():
        assert v.dtype == sd[k].dtype and torch.equal(v, sd[k]), k
    with torch.no_grad():
        assert torch.isfinite(model(IDS)).all()


def test_legacy_bin_format(tmp_path):
    """Old (pre-zip) torch.save files cannot be memory-mapped; they load through the plain path."""
    c = released_config()
    sd = released_weights(c)
    folder = _folder(tmp_path, sd={})
    (folder / "model.safetensors").unlink()
    torch.save(sd, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    check_against_references(load_pretrained(folder), c, sd)


def test_harmless_keys_ignored_with_note(tmp_path, caplog):
    c = released_config()
    sd = released_weights(c)
    sd["decoder.version"] = torch.tensor([3.0])
    sd["model.decoder.version"] = torch.tensor([3.0])
    sd["model._linear_attn_mask"] = torch.zeros(H, 8, 8)
    sd["model.layers.0.token_mixer.lrpe.index"] = torch.arange(8.0)
    with caplog.at_level(logging.INFO, logger="tnllm"):
        model = load_pretrained(write_folder(tmp_path / "ck", c, sd, fmt="bin"))
    assert "decoder.version" in caplog.text and "_linear_attn_mask" in caplog.text
    check_against_references(model, c, {k: v for k, v in sd.items() if "version" not in k and "index" not in k
                                        and "mask" not in k})


def test_device_argument(tmp_path):
    c = released_config()
    model = load_pretrained(write_folder(tmp_path / "ck", c, released_weights(c)), device="cpu")
    assert {t.device.type for t in list(model.parameters()) + list(model.buffers())} == {"cpu"}


@pytest.mark.gpu
def test_load_to_cuda_bf16(tmp_path):
    c = released_config()
    sd = released_weights(c)
    folder = write_folder(tmp_path / "ck", c, sd, dtype=torch.bfloat16)
    model = load_pretrained(folder, dtype=torch.bfloat16, device="cuda")
    assert {t.device.type for t in list(model.parameters()) + list(model.buffers())} == {"cuda"}
    assert model.model.layers[0].token_mixer.s.dtype == torch.float32
    ref = released_forward(c, {k: v.to(torch.bfloat16) for k, v in sd.items()}, IDS)
    with torch.no_grad():
        assert rel_rms(model(IDS.cuda()).float().cpu(), ref) < 3e-2


def test_released_glu_dim_minus_one(tmp_path):
    c = released_config(glu_dim=-1)
    c2 = dict(c, glu_dim=D)
    sd = released_weights(c2)
    model = load_pretrained(write_folder(tmp_path / "ck", c, sd))
    assert model.config.glu_dim == D
    check_against_references(model, c2, sd)


def test_trainer_folder_layout_loads(tmp_path):
    c = released_config(arch="transnormer")
    sd = released_weights(c)
    folder = write_folder(tmp_path / "ck", c, sd, extra_files=[("metrics.jsonl", "{}\n"), ("tokenizer.json", "{}")])
    torch.save({"step": 10}, folder / "trainer_state.pt")
    check_against_references(load_pretrained(folder), c, sd)


# ------------------------------------------------------------------------------------------------
# save -> load
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("safe,shard", [(True, None), (False, None), (True, "20KB"), (False, 30000)],
                         ids=["st", "bin", "st-sharded", "bin-sharded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_save_load_round_trip_bit_exact(tmp_path, safe, shard, dtype):
    torch.manual_seed(0)
    cfg = TransNormerConfig(vocab_size=V, decoder_embed_dim=D, decoder_layers=L, decoder_attention_heads=H,
                            glu_dim=G, no_scale_embedding=True, linear_act_fun="relu")
    m = TransNormerLLM(cfg).to(dtype).eval()
    for layer in m.model.layers:      # keep the decay fp32 (.to(dtype) casts buffers too)
        layer.token_mixer.s = layer.token_mixer.s.float()
    save_pretrained(m, tmp_path / "out", safe_serialization=safe, max_shard_size=shard)
    files = os.listdir(tmp_path / "out")
    if shard is not None:
        assert any("-of-" in f for f in files) and any(f.endswith(".index.json") for f in files)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == ["TransnormerForCausalLM"] and written["model_type"] == "transnormer"
    m2 = load_pretrained(tmp_path / "out", dtype="auto")
    assert m2.config.to_dict() == {**m.config.to_dict(), **{k: written[k] for k in ("architectures", "model_type", "torch_dtype")}}
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert list(sd1) == list(sd2)
    for k in sd1:
        assert sd1[k].dtype == sd2[k].dtype and torch.equal(sd1[k], sd2[k]), k
    with torch.no_grad():
        assert torch.equal(m(IDS), m2(IDS))
    # saving again over the same folder (other layout) leaves no stale weights behind
    save_pretrained(m2, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]


def test_model_save_pretrained_method_and_released_keys(tmp_path):
    from safetensors import safe_open
    c = released_config()
    sd = released_weights(c)
    model = load_pretrained(write_folder(tmp_path / "src", c, sd))
    model.save_pretrained(tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert keys == set(sd)                                  # same official keys, tied head written
        assert torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("model.embed_tokens.weight"))
    check_against_references(load_pretrained(tmp_path / "out"), c, sd)


def test_untied_round_trip(tmp_path):
    c = released_config(tie_word_embeddings=False)
    sd = released_weights(c, untied=True)
    m = load_pretrained(write_folder(tmp_path / "src", c, sd))
    save_pretrained(m, tmp_path / "out")
    m2 = load_pretrained(tmp_path / "out")
    assert m2.lm_head.weight is not m2.model.embed_tokens.weight
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


# ------------------------------------------------------------------------------------------------
# errors: all raised before any model is touched
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def no_model_touched(monkeypatch):
    calls = []
    orig = TransNormerLLM.load_state_dict

    def spy(self, *a, **kw):
        calls.append(1)
        return orig(self, *a, **kw)

    monkeypatch.setattr(TransNormerLLM, "load_state_dict", spy)
    yield
    assert not calls, "load_state_dict was called although loading failed"


def _folder(tmp_path, c=None, sd=None, **kw):
    """A folder with config ``c`` (default: the good one) and weights ``sd`` (default: the good config's)."""
    sd = sd if sd is not None else released_weights(released_config())
    return write_folder(tmp_path / "ck", c or released_config(), sd, **kw)


def test_error_unknown_key(tmp_path, no_model_touched):
    sd = released_weights(released_config())
    sd["model.layers.1.token_mixer.gate.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"unknown keys.*model\.layers\.1\.token_mixer\.gate\.weight"):
        load_pretrained(_folder(tmp_path, sd=sd))


def test_error_unprefixed_keys_get_a_hint(tmp_path, no_model_touched):
    sd = {k.removeprefix("model."): v for k, v in released_weights(released_config()).items()}
    with pytest.raises(ValueError, match=r"start with 'model\.'"):
        load_pretrained(_folder(tmp_path, sd=sd))


def test_error_lrpe_on_unflagged_layer(tmp_path, no_model_touched):
    c = released_config()
    sd = released_weights(dict(c, linear_use_lrpe_list=[1, 1, 0]))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.token_mixer\.lrpe\.theta.*linear_use_lrpe_list"):
        load_pretrained(_folder(tmp_path, c=c, sd=sd))


@pytest.mark.parametrize("key,shape", [("model.layers.2.channel_mixer.l3.weight", [D, G]),
                                       ("model.layers.0.token_mixer.lrpe.theta", [H, 1, D // H])])
def test_error_missing_key(tmp_path, no_model_touched, key, shape):
    sd = released_weights(released_config())
    del sd[key]
    with pytest.raises(ValueError, match=rf"missing keys: {re.escape(key)} with shape .*= {re.escape(str(shape))}"):
        load_pretrained(_folder(tmp_path, sd=sd))


def test_error_missing_untied_head(tmp_path, no_model_touched):
    c = released_config(tie_word_embeddings=False)
    with pytest.raises(ValueError, match=r"missing keys: lm_head\.weight.*tie_word_embeddings false"):
        load_pretrained(_folder(tmp_path, c=c, sd=released_weights(c, head=False)))


@pytest.mark.parametrize("key,bad,want", [
    ("model.layers.0.token_mixer.qkvu_proj.weight", (4 * D, D + 1), r"\[4 \* hidden_dim, decoder_embed_dim\] = \[128, 32\]"),
    ("model.layers.0.token_mixer.lrpe.theta", (H, D // H), r"\[decoder_attention_heads, 1, .*\] = \[4, 1, 8\]"),
    ("model.embed_tokens.weight", (V + 1, D), r"\[vocab_size, decoder_embed_dim\] = \[67, 32\]"),
])
def test_error_wrong_shape(tmp_path, no_model_touched, key, bad, want):
    sd = released_weights(released_config(), head=False)
    sd[key] = torch.zeros(bad)
    with pytest.raises(ValueError, match=rf"{re.escape(key)} has shape .*expects {want}"):
        load_pretrained(_folder(tmp_path, sd=sd, fmt="safetensors", shards=2))


@pytest.mark.parametrize("field,value", [("decoder_layers", "3"), ("vocab_size", 67.0), ("no_scale_embedding", "false"),
                                         ("linear_act_fun", 1), ("linear_use_lrpe_list", [1, "0", 0]),
                                         ("decoder_embed_dim", True), ("init_std", "0.02"), ("bias", 0)])
def test_error_wrong_type_config_field(tmp_path, no_model_touched, field, value):
    with pytest.raises(TypeError, match=rf"config\.json.*'{field}' must be"):
        load_pretrained(_folder(tmp_path, c=released_config(**{field: value})))


@pytest.mark.parametrize("field,value,match", [("linear_act_fun", "gelu", "linear_act_fun must be one of"),
                                               ("norm_type", "layernorm", "norm_type"),
                                               ("linear_use_lrpe_list", [1, 0], "linear_use_lrpe_list"),
                                               ("hidden_dim", 30, "divisible")])
def test_error_bad_config_value(tmp_path, no_model_touched, field, value, match):
    with pytest.raises(ValueError, match=rf"config\.json.*{match}"):
        load_pretrained(_folder(tmp_path, c=released_config(**{field: value})))


def test_error_missing_config(tmp_path):
    folder = _folder(tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(folder)


def test_error_invalid_json(tmp_path):
    folder = _folder(tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pretrained(folder)


def test_error_no_weights(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(released_config()))
    with pytest.raises(FileNotFoundError, match=r"no weights.*model\.safetensors.*pytorch_model\.bin"):
        load_pretrained(folder)


def test_error_missing_folder_and_file_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    folder = _folder(tmp_path)
    with pytest.raises(ValueError, match="must be a checkpoint folder"):
        load_pretrained(folder / "model.safetensors")
    with pytest.raises(TypeError, match="`path`"):
        load_pretrained(3)
    with pytest.raises(ValueError, match="`dtype`"):
        load_pretrained(folder, dtype="int8")
    with pytest.raises(TypeError, match="`dtype`"):
        load_pretrained(folder, dtype=torch.int64)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_error_pickle_with_arbitrary_object_refused(tmp_path, no_model_touched):
    marker = str(tmp_path / "pwned")
    sd = released_weights(released_config())
    sd["model.embed_tokens.weight"] = _Evil(marker)
    folder = _folder(tmp_path, sd={})
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"refused to load.*weights_only=True.*os\.makedirs"):
        load_pretrained(folder)
    assert not os.path.exists(marker), "the pickle's payload ran"


def test_error_tied_head_differs(tmp_path, no_model_touched):
    sd = released_weights(released_config())
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    with pytest.raises(ValueError, match=r"lm_head\.weight differs.*tie_word_embeddings\": false"):
        load_pretrained(_folder(tmp_path, sd=sd))


def test_error_integer_tensor(tmp_path, no_model_touched):
    sd = released_weights(released_config())
    sd["model.layers.0.channel_mixer.l1.weight"] = torch.zeros(G, D, dtype=torch.int32)
    with pytest.raises(TypeError, match=r"l1\.weight has dtype"):
        load_pretrained(_folder(tmp_path, sd=sd))


def test_error_index_problems(tmp_path, no_model_touched):
    folder = _folder(tmp_path, fmt="safetensors", shards=2)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    good = json.dumps(index)
    index["weight_map"]["model.layers.0.token_mixer.out_proj.weight"] = "model-00001-of-00002.safetensors" \
        if index["weight_map"]["model.layers.0.token_mixer.out_proj.weight"].startswith("model-00002") \
        else "model-00002-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"maps 'model\.layers\.0\.token_mixer\.out_proj\.weight' to .* no such tensor"):
        load_pretrained(folder)
    index = json.loads(good)
    index["weight_map"]["model.embed_tokens.weight"] = "model-00009-of-00009.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00009-of-00009"):
        load_pretrained(folder)
    index = json.loads(good)
    index["weight_map"]["model.embed_tokens.weight"] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="must be a file name in the same folder"):
        load_pretrained(folder)
    index = json.loads(good)
    del index["weight_map"]["model.embed_tokens.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"does not list.*model\.embed_tokens\.weight"):
        load_pretrained(folder)


def test_error_corrupt_safetensors(tmp_path, no_model_touched):
    folder = _folder(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_pretrained(folder)


def test_error_transformer_arch_points_to_trainer(tmp_path):
    folder = _folder(tmp_path, c=released_config(arch="transformer"))
    with pytest.raises(ValueError, match=r"tnllm\.checkpoints\.load_model"):
        load_pretrained(folder)


def test_error_save_bad_args(tmp_path):
    m = TransNormerLLM(TransNormerConfig.from_preset("tiny"))
    with pytest.raises(TypeError, match="TransNormerLLM"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "x")
    with pytest.raises(ValueError, match="max_shard_size"):
        save_pretrained(m, tmp_path / "x", max_shard_size="lots")
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="must be a folder"):
        save_pretrained(m, tmp_path / "f")


# ------------------------------------------------------------------------------------------------
# convert
# ------------------------------------------------------------------------------------------------
TOK_FILES = [("tokenizer.model", "sp-model-bytes"), ("tokenizer_config.json", '{"add_bos_token": false}'),
             ("special_tokens_map.json", '{"bos_token": "<s>"}')]


def test_convert_released_to_tnllm_and_back(tmp_path):
    c = released_config()
    sd = {k: v.to(torch.bfloat16) for k, v in released_weights(c, head=False).items()}
    src = write_folder(tmp_path / "released", c, sd, fmt="bin", shards=2, extra_files=TOK_FILES)
    assert convert(src, tmp_path / "tn") == "released->tnllm"
    tn = tmp_path / "tn"
    assert sorted(os.listdir(tn)) == sorted(["config.json", "model.safetensors"] + [n for n, _ in TOK_FILES])
    assert json.loads((tn / "config.json").read_text())["arch"] == "transnormer"
    for n, text in TOK_FILES:
        assert (tn / n).read_text() == text
    m = load_pretrained(tn, dtype="auto")
    for k, v in sd.items():                                     # lossless: bf16 kept
        assert m.state_dict()[k].dtype == torch.bfloat16 and torch.equal(m.state_dict()[k], v), k

    # the trainer adds its state and metrics; converting back drops them and the "arch" tag
    torch.save({"step": 3}, tn / "trainer_state.pt")
    (tn / "metrics.jsonl").write_text("{}\n")
    assert convert(tn, tmp_path / "back") == "tnllm->released"
    back = tmp_path / "back"
    assert sorted(os.listdir(back)) == sorted(["config.json", "model.safetensors"] + [n for n, _ in TOK_FILES])
    cfg = json.loads((back / "config.json").read_text())
    assert "arch" not in cfg and cfg["architectures"] == ["TransnormerForCausalLM"]
    assert cfg["auto_map"] == c["auto_map"]
    check_against_references(load_pretrained(back), c, {k: v.float() for k, v in sd.items()})


def test_convert_errors(tmp_path):
    c = released_config()
    src = write_folder(tmp_path / "src", c, released_weights(c))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert(tmp_path / "missing", tmp_path / "dst")
    with pytest.raises(ValueError, match="same folder"):
        convert(src, src)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        convert(src, dst)
    assert convert(src, dst, overwrite=True) == "released->tnllm"
    assert (dst / "model.safetensors").is_file() and (dst / "keep.txt").is_file()
    bad = write_folder(tmp_path / "bad", c, {**released_weights(c), "junk": torch.zeros(1)})
    with pytest.raises(ValueError, match="junk"):
        convert(bad, tmp_path / "dst2")
    assert not (tmp_path / "dst2").exists()                    # nothing written on error
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert(tmp_path / "empty", tmp_path / "dst3")
