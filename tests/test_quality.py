"""The ablation options of the model (decay_type, norm_type "rmsnorm", glu_act), the parameter match of the
Transformer baseline, and the quality experiments (tnllm/train/quality.py, `tnllm compare` / `tnllm ablate`)."""
import dataclasses
import json
import math

import pytest
import torch

from tnllm import TransNormerConfig, TransNormerLLM
from tnllm.baseline import TransformerLM, matched_config, transformer_num_params
from tnllm.cli import main
from tnllm.config import PRESETS, alibi_slopes
from tnllm.model import RMSNorm, decay_rates
from tnllm.ops import srms_norm
from tnllm.train.loop import Trainer
from tnllm.train.quality import (ABLATIONS, ablate, ablation_overrides, compare_grid, mean_std, parse_lrs,
                                 parse_seeds)
from test_train import make_corpus, quiet, tiny_cfg, train_losses


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("quality_corpus"))


def small(**kw):
    base = dict(vocab_size=37, decoder_embed_dim=32, decoder_layers=3, decoder_attention_heads=2, glu_dim=48)
    return TransNormerConfig(**dict(base, **kw))


# -- config fields -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [("decay_type", "exponential"), ("decay_type", None),
                                          ("norm_type", "layernorm"), ("glu_act", "gelu")])
def test_bad_option_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"TransNormerConfig.{field}"):
        small(**{field: value})


def test_defaults_are_the_released_model():
    c = TransNormerConfig.from_preset("385M")
    assert (c.decay_type, c.norm_type, c.glu_act) == ("layer", "simplermsnorm", "none")
    assert TransNormerConfig.from_dict(c.to_dict()) == c
    r = TransNormerConfig.from_dict(dict(c.to_dict(), decay_type="uniform", norm_type="rmsnorm"))
    assert (r.decay_type, r.norm_type) == ("uniform", "rmsnorm")


# -- decay -------------------------------------------------------------------------------------------------
def test_decay_rates_by_type():
    L, H = 4, 4
    slopes = torch.tensor(alibi_slopes(H), dtype=torch.float32)
    layer = small(decay_type="layer", decoder_layers=L, decoder_attention_heads=H)
    for i in range(L):   # the released schedule, unchanged
        assert torch.equal(decay_rates(layer, i), slopes * (1 - i / (L - 1) + 1e-5))
    uni = dataclasses.replace(layer, decay_type="uniform")
    assert all(torch.equal(decay_rates(uni, i), slopes) for i in range(L))
    none = dataclasses.replace(layer, decay_type="none")
    assert all(torch.equal(decay_rates(none, i), torch.zeros(H)) for i in range(L))
    m = TransNormerLLM(none)
    assert all(float(l.token_mixer.s.abs().max()) == 0.0 for l in m.model.layers)
    assert not any(k.endswith(".s") for k in m.state_dict())        # still a non-persistent buffer


@pytest.mark.parametrize("kw", [dict(decay_type="none"), dict(decay_type="uniform"), dict(norm_type="rmsnorm"),
                                dict(glu_act="silu"), dict(linear_use_lrpe_list=[0, 0, 0])])
def test_variant_forms_agree(kw):
    """Each variant keeps parallel forward == chunked prefill == recurrent steps (fp64)."""
    torch.manual_seed(0)
    m = TransNormerLLM(small(block_size=4, **kw)).double()
    if kw.get("norm_type") == "rmsnorm":      # non-trivial weights, so a skipped weight would show
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() == 1:
                    p.uniform_(0.5, 1.5)
    ids = torch.randint(3, 37, (2, 11))
    full = m(ids)
    lp, st = m.prefill(ids[:, :5])
    steps = []
    for t in range(5, 11):
        lt, st = m.step(ids[:, t], st)
        steps.append(lt)
    torch.testing.assert_close(lp, full[:, :5], rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 5:], rtol=0, atol=1e-10)


def test_no_decay_differs_from_layer_schedule():
    torch.manual_seed(0)
    a = TransNormerLLM(small())
    b = TransNormerLLM(small(decay_type="none"))
    b.load_state_dict(a.state_dict())
    ids = torch.randint(3, 37, (1, 16))
    assert not torch.allclose(a(ids), b(ids))


# -- norm --------------------------------------------------------------------------------------------------
def test_rmsnorm_module():
    n = RMSNorm(8)
    x = torch.randn(3, 8)
    assert torch.equal(n(x), srms_norm(x))                        # weight 1 at init
    with torch.no_grad():
        n.weight.copy_(torch.arange(8.0))
    torch.testing.assert_close(n(x), srms_norm(x) * torch.arange(8.0))
    assert n(x.bfloat16()).dtype == torch.bfloat16


def test_rmsnorm_model_params_and_init():
    torch.manual_seed(0)
    a = TransNormerLLM(small())
    torch.manual_seed(0)
    b = TransNormerLLM(small(norm_type="rmsnorm"))
    c = b.config
    extra = {k for k in b.state_dict()} - {k for k in a.state_dict()}
    assert extra == ({f"model.layers.{i}.{n}.weight" for i in range(3) for n in ("token_norm", "channel_norm",
                                                                                   "token_mixer.norm")}
                     | {"model.final_norm.weight"})
    assert b.num_params() == c.num_params() == a.num_params() + 3 * (2 * 32 + 32) + 32
    ids = torch.randint(3, 37, (2, 9))
    assert torch.equal(a(ids), b(ids))         # same seed, weights 1: the same function at init
    loss = b(ids).square().mean()
    loss.backward()
    assert all(b.get_parameter(k).grad is not None and b.get_parameter(k).grad.abs().sum() > 0 for k in extra)


def test_rmsnorm_checkpoint_round_trip(tmp_path):
    m = TransNormerLLM(small(norm_type="rmsnorm", decay_type="uniform"))
    with torch.no_grad():
        m.model.final_norm.weight.fill_(0.7)
    m.save_pretrained(tmp_path / "m")
    r = TransNormerLLM.from_pretrained(tmp_path / "m")
    assert (r.config.norm_type, r.config.decay_type) == ("rmsnorm", "uniform")
    ids = torch.randint(3, 37, (1, 7))
    torch.testing.assert_close(r(ids), m.eval()(ids), rtol=0, atol=0)


def test_swiglu_is_silu_gate():
    m = TransNormerLLM(small(glu_act="silu"))
    glu = m.model.layers[0].channel_mixer
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(glu(x), glu.l3(torch.nn.functional.silu(glu.l1(x)) * glu.l2(x)))


# -- parameter match ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRESETS))
def test_matched_within_one_percent(name):
    c = TransNormerConfig.from_preset(name)
    assert abs(transformer_num_params(matched_config(c)) / c.num_params() - 1) < 0.01


@pytest.mark.parametrize("kw", [dict(), dict(bias=True), dict(norm_type="rmsnorm"), dict(decoder_embed_dim=40),
                                dict(tie_word_embeddings=False)])
def test_transformer_param_formula(kw):
    c = small(**kw)
    m = matched_config(c)
    assert TransformerLM(m).num_params() == transformer_num_params(m)
    assert abs(transformer_num_params(m) / TransNormerLLM(c).num_params() - 1) < 0.01


# -- experiment helpers ------------------------------------------------------------------------------------
def test_parse_seeds_and_lrs():
    assert parse_seeds("3", 5) == [5, 6, 7] and parse_seeds("0,4") == [0, 4]
    for bad in ("0", "-1", "a", "1,1", "1,-2", ""):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)
    assert parse_lrs("1e-3, 3e-3") == [1e-3, 3e-3]
    for bad in ("0", "x", "1e-3,1e-3", "-1e-3", "nan", ""):
        with pytest.raises(ValueError, match="--lr-sweep"):
            parse_lrs(bad)
    assert mean_std([1.0]) == (1.0, 0.0)
    m, s = mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)


def test_measure_step_time_leaves_the_run_unchanged(tmp_path, corpus):
    ref = Trainer(tiny_cfg(tmp_path / "a", corpus, checkpoint=False), log=quiet)
    ref.fit()
    t = Trainer(tiny_cfg(tmp_path / "b", corpus, checkpoint=False), log=quiet)
    t.setup()
    assert t.measure_step_time(2, 2) > 0
    t.fit()
    assert train_losses(t.history) == train_losses(ref.history)      # bit-exact on CPU
    assert not (tmp_path / "b" / "latest").exists()                    # checkpoint=False writes none


def test_compare_grid_sweep_and_seeds(tmp_path, corpus):
    cfg = tiny_cfg(tmp_path / "cmp", corpus, steps=3, eval_every=0, checkpoint=False, plot=True)
    res = compare_grid(cfg, seeds=[0, 1], lrs=[1e-3, 3e-3], log=quiet)
    runs = res["runs"]
    assert len(runs) == 2 * (2 + 1)                    # per arch: the sweep on seed 0, then seed 1 at the best lr
    for a in ("transnormer", "transformer"):
        sw = res["sweep"][a]
        assert [x["lr"] for x in sw] == [1e-3, 3e-3]
        assert res["best_lr"][a] == min(sw, key=lambda x: x["val_loss"])["lr"]
        sel = [r for r in runs if r["arch"] == a and r["lr"] == res["best_lr"][a]]
        assert sorted(r["seed"] for r in sel) == [0, 1]
        s = res["summary"][a]
        assert s["val_loss_mean"] == pytest.approx(sum(r["val_loss"] for r in sel) / 2)
        assert s["val_loss_std"] > 0 and math.isfinite(s["val_ppl_mean"])
    assert abs(res["params"]["transformer"] / res["params"]["transnormer"] - 1) < 0.01
    assert res["tokens_per_run"] == 3 * 4 * 32
    saved = json.loads((tmp_path / "cmp/compare.json").read_text())
    assert saved["summary"] == res["summary"] and (tmp_path / "cmp/compare.png").stat().st_size > 0


def test_compare_grid_time_budget(tmp_path, corpus, monkeypatch):
    from tnllm.train.loop import Trainer
    # the measured step times, fixed (a loaded machine made the real ones exceed the budget): 0.1 s and 0.2 s
    monkeypatch.setattr(Trainer, "measure_step_time",
                        lambda self, *a, **k: 0.1 if self.cfg.arch == "transnormer" else 0.2)
    cfg = tiny_cfg(tmp_path / "tb", corpus, steps=1000, eval_every=0, checkpoint=False)
    res = compare_grid(cfg, seeds=[0], time_budget=0.5, log=quiet)
    assert res["steps"] == 2 and res["step_time_s"] == {"transnormer": 0.1, "transformer": 0.2}
    assert 1 <= res["steps"] < 1000 and set(res["step_time_s"]) == {"transnormer", "transformer"}
    assert res["steps"] == int(0.5 // max(res["step_time_s"].values()))
    assert all(r["steps"] == res["steps"] for r in res["runs"])
    with pytest.raises(ValueError, match="time-budget"):
        compare_grid(cfg, seeds=[0], time_budget=1e-6, log=quiet)
    with pytest.raises(ValueError, match="time-budget"):
        compare_grid(cfg, seeds=[0], time_budget=0, log=quiet)


def test_ablate_variants(tmp_path, corpus):
    cfg = tiny_cfg(tmp_path / "abl", corpus, steps=2, eval_every=0, checkpoint=False)
    res = ablate(cfg, seeds=[0, 1], variants=["released", "no_lrpe", "rmsnorm"], log=quiet)
    assert list(res["summary"]) == ["released", "no_lrpe", "rmsnorm"] and len(res["runs"]) == 6
    assert res["summary"]["released"]["delta_val_loss"] == 0.0
    assert res["summary"]["rmsnorm"]["params"] > res["summary"]["released"]["params"]
    assert "| no_lrpe |" in res["table"] and (tmp_path / "abl/ablate.md").read_text().strip() == res["table"]
    assert [r["overrides"] for r in res["runs"] if r["name"] == "no_lrpe"] == [{"linear_use_lrpe_list": [0, 0]}] * 2
    assert (tmp_path / "abl/no_lrpe/lr0.003-seed1/metrics.jsonl").exists()
    base = TransNormerConfig.from_preset("tiny")
    for v in ABLATIONS:     # each variant is one valid config, different from the released one
        c = dataclasses.replace(base, **ablation_overrides(v, base))
        assert (c == base) == (v == "released")
    with pytest.raises(ValueError, match="unknown ablation"):
        ablate(cfg, seeds=[0], variants=["no_ffn"], log=quiet)
    with pytest.raises(ValueError, match="arch"):
        ablate(dataclasses.replace(cfg, arch="transformer"), seeds=[0], log=quiet)


# -- the command line --------------------------------------------------------------------------------------
TINY = ["--preset", "tiny", "--steps", "2", "--batch-size", "4", "--seq-len", "32", "--eval-every", "0",
        "--eval-batches", "2", "--warmup-steps", "1", "--no-progress", "--val-fraction", "0.2"]


def test_cli_compare_seeds_sweep(tmp_path, corpus, capsys):
    assert main(["compare", *TINY, "--data", str(corpus), "--out", str(tmp_path / "c"), "--seeds", "2",
                 "--lr-sweep", "1e-3,3e-3"]) == 0
    out = capsys.readouterr().out
    assert "val loss (mean ± std, 2 seeds)" in out and "| transnormer |" in out and "| transformer |" in out
    res = json.loads((tmp_path / "c/compare.json").read_text())
    assert res["seeds"] == [0, 1] and res["lr_sweep"] == [1e-3, 3e-3]
    assert (tmp_path / "c/compare.png").exists()


def test_cli_ablate(tmp_path, corpus, capsys):
    assert main(["ablate", *TINY, "--data", str(corpus), "--out", str(tmp_path / "a"), "--seeds", "0,3",
                 "--variants", "released,no_decay,swiglu"]) == 0
    out = capsys.readouterr().out
    assert "| no_decay |" in out and "| swiglu |" in out and "Δ vs released" in out
    assert (tmp_path / "a/ablate.png").exists() and (tmp_path / "a/ablate.md").exists()
    assert main(["ablate", "--list-variants"]) == 0
    assert "uniform_decay" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["compare", "--seeds", "0"], "--seeds"),
    (["compare", "--lr-sweep", "fast"], "--lr-sweep"),
    (["compare", "--time-budget", "-5"], "--time-budget"),
    (["ablate", "--variants", "no_ffn"], "unknown ablation"),
    (["ablate", "--resume"], "--resume"),
])
def test_cli_bad_experiment_args(tmp_path, corpus, args, message, capsys):
    assert main([*args, *TINY, "--data", str(corpus), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_cli_one_arch_and_replot(tmp_path, corpus, capsys):
    assert main(["compare", *TINY, "--data", str(corpus), "--out", str(tmp_path / "c"), "--archs", "transformer",
                 "--no-plot"]) == 0
    res = json.loads((tmp_path / "c/compare.json").read_text())
    assert res["archs"] == ["transformer"] and res["complete"] and list(res["summary"]) == ["transformer"]
    png = tmp_path / "c/compare.png"
    assert not png.exists()                  # --no-plot
    assert main(["compare", "--replot", str(tmp_path / "c/compare.json")]) == 0
    assert png.stat().st_size > 0
    assert main(["compare", "--replot", str(tmp_path / "nothing.json")]) == 2
    assert main(["compare", "--archs", "rnn", *TINY, "--data", str(corpus), "--out", str(tmp_path / "o")]) == 2
    assert "--archs" in capsys.readouterr().err
