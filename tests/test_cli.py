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


# -- the defects a new user hit (issue 12) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_of_run(run, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    path = tmp_path_factory.mktemp("cli_onnx") / "step.onnx"
    assert main(["export", "onnx", "--ckpt", str(run), "--out", str(path)]) == 0
    return path


def test_export_onnx_progress_and_summary(run, onnx_of_run, tmp_path, capsys):
    path = tmp_path / "again.onnx"
    assert main(["export", "onnx", "--ckpt", str(run), "--out", str(path)]) == 0
    out = capsys.readouterr()
    assert "[export] loading" in out.err and "[export] tracing" in out.err
    assert f"wrote {path} (" in out.out and "MiB" in out.out and "M params" in out.out


def test_onnx_generate_matches_torch_and_checks_the_checkpoint(run, onnx_of_run, tmp_path, corpus, capsys):
    args = ["--prompt", "def f", "--max-new-tokens", "6", "--temperature", "0", "--no-stream"]
    assert main(["generate", "--ckpt", str(run), *args]) == 0
    want = capsys.readouterr().out
    assert main(["generate", "--backend", "onnxruntime", "--onnx", str(onnx_of_run), "--ckpt", str(run), *args]) == 0
    assert capsys.readouterr().out == want
    # another checkpoint (another config) with this graph: a clear error, not the other model's text
    cfg = tmp_path / "model.json"
    cfg.write_text(json.dumps({"vocab_size": 259, "decoder_embed_dim": 32, "decoder_layers": 1,
                               "decoder_attention_heads": 2, "glu_dim": 48}))
    other = tmp_path / "other"
    assert main(["train", *TINY, "--steps", "1", "--config", str(cfg), "--data", str(corpus), "--out", str(other),
                 "--no-plot"]) == 0
    capsys.readouterr()
    assert main(["generate", "--backend", "onnxruntime", "--onnx", str(onnx_of_run), "--ckpt", str(other),
                 *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tnllm generate: error:") and "exported from another model" in err and "decoder_layers" in err


def test_corrupt_onnx_is_a_clear_error(run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not a protobuf at all" * 3)
    assert main(["generate", "--backend", "onnxruntime", "--onnx", str(bad), "--ckpt", str(run),
                 "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tnllm generate: error:") and str(bad) in err and "not a readable ONNX graph" in err


def test_onnx_without_backend_is_an_error(run, capsys):
    assert main(["generate", "--onnx", "x.onnx", "--ckpt", str(run), "--prompt", "x"]) == 2
    assert "--backend onnxruntime" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(run, tmp_path, capsys):
    assert main(["generate", "--ckpt", str(run), "--prompt", "x", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tnllm generate: error: --device cuda:") and "--device cpu" in err
    assert main(["train", *TINY, "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    assert "tnllm train: error: --device cuda:" in capsys.readouterr().err


def test_broken_config_names_the_file(run, tmp_path, capsys):
    import shutil
    folder = tmp_path / "ckpt"
    shutil.copytree(run / (run / "latest").read_text().strip(), folder)
    (folder / "config.json").write_text('{"vocab_size": 259,')
    assert main(["generate", "--ckpt", str(folder), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert str(folder / "config.json") in err and "not valid JSON" in err


def test_latest_naming_a_missing_step(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest").write_text("step-0000099\n")
    assert main(["generate", "--ckpt", str(tmp_path / "run"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "latest names the checkpoint 'step-0000099'" in err and "does not exist" in err


def test_convert_accepts_a_run_folder(run, tmp_path, capsys):
    dst = tmp_path / "released"
    assert main(["convert", str(run), str(dst)]) == 0
    assert "tnllm->released" in capsys.readouterr().out
    assert (dst / "config.json").exists() and (dst / "model.safetensors").exists()
    assert "arch" not in json.loads((dst / "config.json").read_text())


def test_every_option_has_help_and_default():
    import argparse
    from tnllm.cli import build_parser

    def parsers(p):
        yield p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sp in a.choices.values():
                    yield from parsers(sp)

    seen = 0
    for p in parsers(build_parser()):
        assert issubclass(p.formatter_class, argparse.ArgumentDefaultsHelpFormatter), p.prog
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert a.help, f"{p.prog} {a.option_strings or a.dest}: no help"
            seen += 1
        text = p.format_help()
        if "--temperature" in text:
            assert "greedy (default: 0.8)" in " ".join(text.split())
    assert seen > 50


def test_resume_with_no_steps_left_says_so(tmp_path, corpus, capsys):
    out = tmp_path / "r"
    args = ["train", *TINY, "--steps", "2", "--eval-every", "0", "--data", str(corpus), "--out", str(out), "--no-plot"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    text = "".join(capsys.readouterr())
    assert "no steps left to train" in text and "raise --steps" in text


def test_train_fused_loss_flag():
    """The fused head + loss is the default; --no-fused-loss turns it off."""
    from tnllm.cli import _train_config, build_parser
    p = build_parser()
    assert _train_config(p.parse_args(["train", *TINY])).fused_loss is True
    assert _train_config(p.parse_args(["train", *TINY, "--no-fused-loss"])).fused_loss is False


def test_train_compile_mode_flag_implies_compile():
    from tnllm.cli import _train_config, build_parser
    p = build_parser()
    c = _train_config(p.parse_args(["train", *TINY]))
    assert (c.compile, c.compile_mode) == (False, "default")
    c = _train_config(p.parse_args(["train", *TINY, "--compile-mode", "reduce-overhead"]))
    assert (c.compile, c.compile_mode) == (True, "reduce-overhead")
    with pytest.raises(SystemExit):
        p.parse_args(["train", *TINY, "--compile-mode", "turbo"])
