"""The tnllm command end to end (tnllm/cli.py), on tiny runs of a few steps."""
import json
import subprocess
import sys

import pytest

from tnllm.cli import main
from test_train import make_corpus

TINY = ["--preset", "tiny", "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--eval-every", "2",
        "--eval-batches", "2", "--warmup-steps", "1", "--no-progress", "--val-fraction", "0.2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("cli_corpus"))


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("cli_run") / "run"
    assert main(["train", *TINY, "--data", str(corpus), "--out", str(out)]) == 0
    return out


def test_train_output(run, capsys):
    assert (run / "latest").exists() and (run / "loss.png").exists()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in rows) == 4 and sum("val_loss" in r for r in rows) == 2


def test_generate_single_and_batched(run, capsys):
    assert main(["generate", "--ckpt", str(run), "--prompt", "def f", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def f") and "generated" in out.err
    assert main(["generate", "--ckpt", str(run), "--prompt", "def f", "--prompt", "return x * 3 +",
                 "--max-new-tokens", "6", "--temperature", "0.9", "--top-k", "20", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- prompt:") == 2


def test_resume_via_cli(tmp_path, corpus, run, capsys):
    out = tmp_path / "r"
    args = ["train", *TINY, "--data", str(corpus), "--out", str(out), "--save-every", "2"]
    assert main(args[:args.index("--steps") + 1] + ["4"] + args[args.index("--steps") + 2:]) == 0
    assert main([*args, "--resume"]) == 0            # already at step 4: nothing to train, same model
    a = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in a] == [r.get("loss") for r in b]


def test_compare(tmp_path, corpus, capsys):
    assert main(["compare", *TINY, "--steps", "2", "--eval-every", "0", "--data", str(corpus),
                 "--out", str(tmp_path / "cmp"), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "transnormer" in out and "transformer" in out and "val loss" in out
    res = json.loads((tmp_path / "cmp/compare.json").read_text())
    assert res["archs"] == ["transnormer", "transformer"] and [r["arch"] for r in res["runs"]] == res["archs"]


def test_list_presets(capsys):
    assert main(["train", "--list-presets"]) == 0
    assert "demo" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "/nonexistent/corpus.txt"], "does not exist"),
    (["train", "--preset", "galactic"], "unknown preset"),
    (["generate", "--ckpt", "/nonexistent/run", "--prompt", "x"], "does not exist"),
    (["generate", "--prompt", "x"], "--ckpt"),
])
def test_bad_inputs(tmp_path, args, message, capsys):
    assert main([*args, *(["--out", str(tmp_path / "o"), "--no-progress"] if args[0] == "train" else [])]) == 2
    assert message in capsys.readouterr().err


def test_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", *TINY, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "empty" in capsys.readouterr().err


def test_negative_temperature(run, capsys):
    assert main(["generate", "--ckpt", str(run), "--prompt", "x", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_prompt_longer_than_allowed(tmp_path, corpus, capsys):
    cfg = tmp_path / "model.json"
    cfg.write_text(json.dumps({"vocab_size": 259, "decoder_embed_dim": 32, "decoder_layers": 1,
                               "decoder_attention_heads": 2, "glu_dim": 48, "max_position_embeddings": 64}))
    out = tmp_path / "short"
    assert main(["train", *TINY, "--steps", "1", "--config", str(cfg), "--data", str(corpus),
                 "--out", str(out), "--no-plot"]) == 0
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(out), "--prompt", "x" * 80, "--max-new-tokens", "4"]) == 2
    assert "max_position_embeddings" in capsys.readouterr().err
    assert main(["generate", "--ckpt", str(out), "--prompt", "x" * 10, "--max-new-tokens", "4"]) == 0


def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "tnllm", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for cmd in ("demo", "train", "generate", "compare", "ablate", "convert", "export"):
        assert cmd in r.stdout
