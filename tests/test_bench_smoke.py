"""Every benchmark script runs on the CPU at a tiny size (the same code paths as on the GPU), so a
change that breaks a benchmark fails CI instead of the next H200 run."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def run(args, tmp_path, timeout=600):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(BENCH))
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_attention_bench_cpu(tmp_path):
    out = run([BENCH / "attention.py", "--device", "cpu", "--out", tmp_path / "a", "--nonfinite-modes", "0,2",
               "--auto-split", "--chunks", "32", "--peers",
               "naive,tnllm_prepass0,tnllm_noprefix,tnllm_prepass0noprefix_graph,tnllm_tm"], tmp_path)
    recs = [json.loads(line) for line in (tmp_path / "a" / "attention.json").read_text().splitlines()]
    rows = {r["impl"]: r for r in recs if not r.get("meta")}
    assert set(rows) == {"tnllm", "tnllm_api", "naive", "tnllm_nf0", "tnllm_nf2", "tnllm_autosplit", "tnllm_chunk32",
                         "tnllm_prepass0", "tnllm_noprefix", "tnllm_prepass0noprefix_graph", "tnllm_tm"}, rows
    for r in rows.values():
        assert "error" not in r and r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0, r
    assert max(rows["tnllm"]["check_rel_err"].values()) < 1e-2
    assert set(rows["tnllm_api"]["check_rel_err"]) == {"o", "dq", "dk", "dv"}      # the public call is checked too
    assert max(rows["tnllm_api"]["check_rel_err"].values()) < 1e-2
    assert max(rows["tnllm_autosplit"]["check_rel_err"].values()) < 1e-2
    assert max(rows["tnllm_chunk32"]["check_rel_err"].values()) < 1e-2
    for name in ("tnllm_prepass0", "tnllm_noprefix", "tnllm_prepass0noprefix_graph", "tnllm_tm"):
        assert max(rows[name]["check_rel_err"].values()) < 1e-2, name
    assert "| tiny B1 H2 T100" in out


def test_attention_bench_variants_change_only_restored_settings(monkeypatch):
    """Every setting a tnllm_* variant of bench/attention.py changes is among those ``main`` restores after the
    variant's row: a setting left changed would silently apply to every later row (as KDEC_ON_C, UNMASKED_WHERE
    and EVEN_TILES once did)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import attention
    from tnllm.ops.lightning_attn import triton as tri
    variants = ["tnllm_nf0", "tnllm_autosplit", "tnllm_separate", "tnllm_chunk32", "tnllm_cfg128x32w8",
                "tnllm_cfgnone", "tnllm_prepass0noprefix", "tnllm_prefix", "tnllm_kdecb", "tnllm_noeven",
                "tnllm_alleven", "tnllm_statet", "tnllm_diag", "tnllm_stdiag", "tnllm_wide1", "tnllm_wide1stdiag",
                "tnllm_split2", "tnllm_wideda64x32w8"]
    before = dict(vars(tri))
    restored = attention.triton_settings(tri)
    try:
        for name in variants:
            attention._set_variant(name)
            changed = {k for k, v in vars(tri).items() if before.get(k, object()) is not v and k not in ("_CONFIG_MEMO",)}
            assert changed <= set(restored), (name, changed - set(restored))
            for k, v in restored.items():
                setattr(tri, k, v)
    finally:
        for k, v in restored.items():
            setattr(tri, k, v)
    assert all(vars(tri)[k] is v for k, v in restored.items())


def test_train_step_bench_cpu(tmp_path):
    for impl, loss in (("tnllm", "naive"), ("sdpa", "naive"), ("tnllm", "fused")):
        run([BENCH / "train_step.py", "--device", "cpu", "--impl", impl, "--preset", "tiny", "--T", "32", "--B", "2",
             "--steps", "2", "--warmup", "1", "--no-compile", "--loss", loss, "--loss-chunk-tokens", "16",
             "--out", tmp_path / "t"], tmp_path)
    recs = [json.loads(line) for line in (tmp_path / "t" / "train_step.jsonl").read_text().splitlines()]
    assert [(r["impl"], r["loss_impl"]) for r in recs] == [("tnllm", "naive"), ("sdpa", "naive"), ("tnllm", "fused")]
    for r in recs:
        assert r["step_ms"] > 0 and 0 < r["loss"] < 20 and len(r["steps_ms"]) == 2
    # same seed, same model and batch: the first step's loss is the same through either loss (the last
    # step's differ by the optimizer's steps on slightly different roundings, so compare loosely)
    assert abs(recs[0]["loss"] - recs[2]["loss"]) < 0.05


def test_decode_bench_cpu(tmp_path):
    """Every TNL row runs (the decoder's reset with a plain list of states and an explicit position)."""
    run([BENCH / "decode.py", "--device", "cpu", "--preset", "tiny", "--contexts", "16", "40", "--batches", "1", "2",
         "--prefill-lengths", "32", "--steps", "2", "--no-compile", "--out", tmp_path / "d"], tmp_path)
    res = json.loads((tmp_path / "d" / "decode.json").read_text())
    assert not res["errors"], res["errors"]
    tnl = [r for r in res["rows"] if r.get("section") == "decode" and r.get("model") == "tnl"]
    assert {(r["batch"], r["context"]) for r in tnl} == {(1, 16), (1, 40), (2, 16), (2, 40)}
    assert all(r["ms_per_token"] > 0 for r in tnl)
    assert any(r.get("section") == "check" and r.get("greedy_agreement") == 1.0 for r in res["rows"])


def test_launch_host_bench_cpu(tmp_path):
    out = run([BENCH / "launch_host.py", "--shape", "1,2,256,32", "--calls", "5", "--rounds", "2"], tmp_path)
    assert "'fwd_us'" in out and "'bwd_us'" in out and "'public_fwdbwd_us'" in out
    counts = {k: int(v) for k, v in re.findall(r"'(\w+_launches)': (\d+)", out)}
    # the public call makes the forward's launches and the backward's, nothing else
    assert counts["public_launches"] == counts["fwd_launches"] + counts["bwd_launches"] > 0, counts
    # a split shape: the pre-pass and its prefix launch are stubbed too
    split = run([BENCH / "launch_host.py", "--shape", "1,2,4096,32", "--calls", "5", "--rounds", "2"], tmp_path)
    assert "'fwd_us'" in split and "'bwd_us'" in split
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import make_backend
        make_backend(GPUTarget("cuda", 90, 32))
    except Exception:           # no Triton CUDA backend here: the script says the binder was not measured
        assert "not measured here" in out
    else:                       # the binder ran on the sweep kernel's real signature
        assert "'binder_us'" in out, out


def test_host_sync_bench_cpu(tmp_path):
    out = run([BENCH / "host_sync.py", "--device", "cpu", "--out", tmp_path / "h"], tmp_path)
    res = json.loads((tmp_path / "h" / "host_sync.json").read_text())
    assert len(res["rows"]) == 2 and all(r["default_ms"] > 0 and r["off_ms"] > 0 and r["fresh_s_ms"] > 0
                                         for r in res["rows"])
    assert "check_decay=False" in out


def test_cpu_benchmark_suite(tmp_path):
    pytest.importorskip("pytest_benchmark")
    run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable", "-k", "T256",
         BENCH / "test_bench_cpu.py", "--rootdir", BENCH], tmp_path)


def test_tnllm_bench_decode_cli_cpu(tmp_path):
    """`tnllm bench decode` on CPU, tiny preset: every path at every batch and context, the Transformer beside
    it, the agreement checks, the table with the assumed bandwidth, the JSON and the plot."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "bd"
    proc = subprocess.run([sys.executable, "-m", "tnllm", "bench", "decode", "--device", "cpu", "--preset", "tiny",
                           "--batch", "1", "3", "--contexts", "16", "4096", "--steps", "2", "--check-tokens", "4",
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "decode.json").read_text())
    assert not res["errors"], res["errors"]
    dec = [r for r in res["rows"] if r["section"] == "decode"]
    tnl = {(r["path"], r["batch"], r["context"]) for r in dec if r["model"] == "tnl"}
    assert tnl == {(p, b, c) for p in ("aten", "kernel", "fused") for b in (1, 3) for c in (16, 4096)}
    assert {(r["batch"], r["context"]) for r in dec if r["model"] == "transformer"} == {(1, 16), (1, 4096), (3, 16),
                                                                                       (3, 4096)}
    for r in dec:
        assert r["ms_per_token"] > 0 and r["tokens_per_s"] > 0 and r["pct_roofline"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / r["ms_per_token"] * 1e3, rel=1e-2)
    t = next(r for r in dec if r["model"] == "tnl" and r["batch"] == 3)
    info = res["presets"]["tiny"]
    # roofline = (weights read + state read and written) / 4.8 TB/s
    want = (info["weight_bytes"]["tnl"] + 2 * 3 * info["state_bytes_per_stream"]) / 4.8e12 * 1e3
    assert t["roofline_ms"] == pytest.approx(want, rel=1e-2)
    assert t["pct_weight_roofline"] == pytest.approx(
        100 * info["weight_bytes"]["tnl"] / 4.8e12 * 1e3 / t["ms_per_token"], rel=1e-2)
    # the same bytes at the copy bandwidth measured in this run
    copy = res["meta"]["copy_bandwidth_TBps"]
    assert copy > 0
    for r in dec:
        assert r["copy_roofline_ms"] == pytest.approx(r["roofline_ms"] * 4.8 / copy, rel=2e-2)
        assert r["pct_copy_roofline"] == pytest.approx(100 * r["copy_roofline_ms"] / r["ms_per_token"], rel=2e-2)
    checks = {r["path"]: r["greedy_agreement"] for r in res["rows"] if r["section"] == "check"}
    assert checks == {"aten": 1.0, "kernel": 1.0, "fused": 1.0}, checks
    assert "bandwidth assumed 4.8 TB/s" in proc.stdout and "% copy floor" in proc.stdout
    assert "| tiny | tnl eager:fused | 3 | 4096 |" in proc.stdout
    assert (out / "decode.png").stat().st_size > 1000 and (out / "decode.md").read_text().count("| tiny |") == 16


def test_tnllm_bench_decode_int8_cpu(tmp_path):
    pytest.importorskip("torchao")
    from tnllm.bench_decode import add_args, run
    import argparse
    p = argparse.ArgumentParser()
    add_args(p)
    res = run(p.parse_args(["--device", "cpu", "--preset", "tiny", "--batch", "2", "--contexts", "8", "--steps", "1",
                            "--check-tokens", "4", "--int8", "--no-baseline", "--val-batches", "1", "--val-seq-len",
                            "32", "--paths", "eager:aten", "eager:fused", "--out", str(tmp_path)]))
    assert not res["errors"], res["errors"]
    q = next(r for r in res["rows"] if r["section"] == "int8")
    assert q["weight_GB_int8"] < 0.7 * q["weight_GB"] and 0.5 <= q["greedy_agreement"] <= 1.0
    assert abs(q["val_loss_change"]) < 0.05 and q["val_loss"] > 0
    assert {r["path"] for r in res["rows"] if r["section"] == "decode" and r["model"] == "tnl_int8"} == {"fused"}


def test_tnllm_bench_decode_int8_without_torchao(monkeypatch, capsys):
    import tnllm.compile.quant as quant
    from tnllm.cli import main
    monkeypatch.setattr(quant, "torchao_available", lambda: False)
    assert main(["bench", "decode", "--device", "cpu", "--preset", "tiny", "--int8", "--out", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err
    assert "--int8 needs torchao" in err and "pip install 'tnllm[int8]'" in err
    assert main(["bench", "decode", "--device", "cpu", "--preset", "tiny", "--paths", "graph:fused"]) == 2
    assert "--paths: 'graph:fused' must be POLICY:PATH" in capsys.readouterr().err


def test_varlen_bench_cpu(tmp_path):
    out = run([BENCH / "varlen.py", "--device", "cpu", "--out", tmp_path / "v"], tmp_path)
    recs = [json.loads(line) for line in (tmp_path / "v" / "varlen.json").read_text().splitlines()]
    meta, rows = recs[0], {r["impl"]: r for r in recs[1:]}
    assert meta["meta"] and len(meta["lengths"]) == 4 and all(16 <= n <= 100 for n in meta["lengths"])
    assert set(rows) == {"padded", "varlen", "loop"}, rows
    for r in rows.values():
        assert "error" not in r and r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0, r
        assert r["total_tokens"] == sum(meta["lengths"]) and r["padded_tokens"] == 4 * max(meta["lengths"])
    for name in ("varlen", "loop"):
        assert max(rows[name]["check_rel_err_vs_padded"].values()) < 1e-5, rows[name]
    assert "padded / varlen: fwd" in out


def test_teacher_forced_agreement_separates_near_ties_from_real_disagreement():
    import torch
    from tnllm.bench_decode import teacher_forced
    V = 64
    g = torch.Generator().manual_seed(0)
    base = torch.randn(V, generator=g)
    noise = 1e-3 * torch.randn(V, generator=g)

    def const(logits):
        return lambda tok: logits[None].clone()
    tie = base.clone()
    tie[1], tie[2] = 10.0, 10.0 - 1e-4              # a near-tie between tokens 1 and 2
    flip = tie + noise
    flip[1], flip[2] = 10.0 - 1e-4, 10.0            # swapped by errors of the noise's size
    clear = base.clone()
    clear[1] = 10.0                                  # token 1 leads by far more than the noise
    wrong = clear + noise
    wrong[5] = 11.0                                  # a real disagreement
    ids = torch.zeros(1, 2, dtype=torch.int64)
    assert teacher_forced(const(clear), const(clear), ids, 3) == (1.0, 1.0, 0.0)
    agree, beyond, worst = teacher_forced(const(tie), const(flip), ids, 3)
    assert agree == 0.0 and beyond == 1.0 and 0 < worst < 0.01
    agree, beyond, worst = teacher_forced(const(clear), const(wrong), ids, 3)
    assert agree == 0.0 and beyond == 0.0


def test_decode_profile_bench_cpu(tmp_path):
    """The per-stage profile of the fused decode step: every stage of every layer is timed once per step."""
    out = run([BENCH / "decode_profile.py", "--device", "cpu", "--preset", "tiny", "--steps", "2",
               "--out", tmp_path / "p"], tmp_path)
    res = json.loads((tmp_path / "p" / "decode_profile.json").read_text())
    stages = {s["stage"]: s for s in res["stages"]}
    assert list(stages) == ["embed", "qkvu", "mixer", "out", "l12", "sglu", "l3", "head"]
    n_layers = 2                                                   # the tiny preset
    assert stages["embed"]["calls_per_step"] == 1 and stages["head"]["calls_per_step"] == 1
    assert all(stages[s]["calls_per_step"] == n_layers for s in ("qkvu", "mixer", "out", "l12", "sglu", "l3"))
    assert all(s["us_per_step"] > 0 for s in res["stages"]) and res["replay_ms_per_token"] > 0
    assert stages["qkvu"]["bytes"] == n_layers * 4 * 64 * 64 * 2          # [4d, d] bf16 per layer
    assert "| mixer | 2.0 |" in out


def test_decode_profile_gives_each_kernel_to_its_stage():
    """On CUDA the stages' times are summed from the kernels inside each stage's device range (the range's own
    span holds the host's launch gaps, and the profiler lists the ranges among the device events)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("decode_profile", BENCH / "decode_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ev = [("qkvu", 0.0, 30.0), ("gemv", 1.0, 5.0), ("mixer", 40.0, 50.0), ("gla", 41.0, 44.0),
          ("qkvu", 100.0, 190.0), ("gemv", 180.0, 186.0), ("stray", 60.0, 61.0), ("gla", 195.0, 196.0)]
    per_stage, kernels = mod.attribute_kernels(ev, steps=2)
    assert per_stage["qkvu"] == (5.0, 1.0) and per_stage["mixer"] == (1.5, 0.5) and per_stage["l3"] == (0.0, 0.0)
    rows = {k["kernel"]: k for k in kernels}
    assert set(rows) == {"gemv", "gla", "stray"}               # the ranges are not kernels
    assert rows["gemv"] == {"kernel": "gemv", "per_step": 1.0, "us_per_step": 5.0, "us_each": 5.0}


def test_gemv_bench_cpu(tmp_path):
    """Every GEMM of a layer and the head, each way, at the preset's shapes; each way computes x + y W^T (l3 also
    with the SGLU gate)."""
    out = run([BENCH / "gemv.py", "--device", "cpu", "--preset", "tiny", "--batch", "1", "3", "--calls", "2",
               "--replays", "1", "--out", tmp_path / "g"], tmp_path)
    rows = json.loads((tmp_path / "g" / "gemv.json").read_text())["rows"]
    assert {(r["gemm"], r["way"]) for r in rows} == {
        ("qkvu", "linear"), ("l12", "linear"), ("head", "linear"),
        *((g, w) for g in ("out", "l3") for w in ("addmm_", "linear+add_", "linear", "residual_gemv")),
        ("l3", "sglu_gate+addmm_"), ("l3", "residual_gemv(gate)")}
    assert len(rows) == 2 * 13 and all(r["us"] > 0 and r["rel_err"] < 1e-2 for r in rows)
    assert "| l3 | 96 x 64 | 3 | addmm_ |" in out


def test_train_step_bench_activation_checkpointing_cpu(tmp_path):
    """--ac full / selective recompute the blocks' forward in backward: the same losses step by step as without,
    recorded with the policy; the SDPA baseline refuses it. (The CPU step runs under bf16 autocast. Selective
    checkpointing runs the block under a torch dispatch mode, and under it some CPU bf16 ops round differently:
    the same difference shows with a policy that saves every op and recomputes none. So its losses agree to 1e-3,
    full AC's exactly.)"""
    for ac in ("none", "full", "selective"):
        run([BENCH / "train_step.py", "--device", "cpu", "--impl", "tnllm", "--preset", "tiny", "--T", "32", "--B", "2",
             "--steps", "2", "--warmup", "1", "--no-compile", "--ac", ac, "--out", tmp_path / "t"], tmp_path)
    recs = [json.loads(line) for line in (tmp_path / "t" / "train_step.jsonl").read_text().splitlines()]
    assert [r["ac"] for r in recs] == ["none", "full", "selective"]
    assert recs[1]["losses"] == recs[0]["losses"]
    assert recs[2]["losses"] == pytest.approx(recs[0]["losses"], rel=1e-3)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(BENCH))
    proc = subprocess.run([sys.executable, str(BENCH / "train_step.py"), "--device", "cpu", "--impl", "sdpa", "--ac",
                           "full"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--ac applies to the TNL model" in proc.stderr


def test_op_host_bench_needs_cuda(tmp_path):
    """bench/op_host.py times real Triton launches: off CUDA it stops with a usage error that names the
    device-free alternative, rather than a traceback."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(BENCH))
    proc = subprocess.run([sys.executable, str(BENCH / "op_host.py"), "--out", str(tmp_path / "o")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr and "launch_host.py" in proc.stderr, proc.stderr
    bad = subprocess.run([sys.executable, str(BENCH / "op_host.py"), "--shape", "2,8", "--out", str(tmp_path / "o")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--shape: expected B,H,T,D" in bad.stderr, bad.stderr


def test_sass_diff_cpu(tmp_path):
    """bench/sass_diff.py: a copy of the kernels' source compiles to the same SASS, and a copy whose chunk loop
    computes something else does not (exit 1, DIFFER)."""
    from tnllm.testing.compiled import cuobjdump
    if cuobjdump() is None:
        pytest.skip("Triton's NVIDIA backend has no cuobjdump here")
    src = (ROOT / "ops" / "lightning_attn" / "triton.py").read_text()
    same = tmp_path / "same.py"
    same.write_text(src)
    out = run([BENCH / "sass_diff.py", "--file", same, "--only", "1"], tmp_path)
    assert "sweep D128 forward masked unmasked: identical" in out, out
    old = "        qdec = _lam_pow(log_lam, jj + 1)\n"
    assert src.count(old) == 1
    other = tmp_path / "other.py"
    other.write_text(src.replace(old, "        qdec = _lam_pow(log_lam, jj + 2)\n"))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(BENCH))
    proc = subprocess.run([sys.executable, str(BENCH / "sass_diff.py"), "--file", str(other), "--only", "1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "DIFFER" in proc.stdout, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])


def test_triton_setting_option_takes_tile_specs(monkeypatch):
    """``pytest --triton-setting NAME=VALUE`` (tests/conftest.py): a *_CONFIG setting takes a tile spec or 'none',
    the others a Python literal; anything else is a usage error naming the setting."""
    import conftest
    from tnllm.ops.lightning_attn import triton as tri

    class Config:
        def __init__(self, *items):
            self.items = list(items)

        def getoption(self, name):
            assert name == "--triton-setting"
            return self.items
    for name in ("WIDE_DA_CONFIG", "WIDE_CONFIG", "STATE_T"):
        monkeypatch.setattr(tri, name, getattr(tri, name))      # restored after the test
    conftest._triton_settings(Config("WIDE_DA_CONFIG=64x32w8", "WIDE_CONFIG=none", "STATE_T=True"))
    assert tri.WIDE_DA_CONFIG == tri.SweepConfig(BC=64, CHUNK=32, num_warps=8, num_stages=2)
    assert tri.WIDE_CONFIG is None and tri.STATE_T is True
    for bad in ("WIDE_DA_CONFIG=64x32", "STATE_T=yes", "nope=1"):
        with pytest.raises(pytest.UsageError, match="--triton-setting"):
            conftest._triton_settings(Config(bad))
