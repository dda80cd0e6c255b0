"""Every benchmark script runs on the CPU at a tiny size (the same code paths as on the GPU), so a
change that breaks a benchmark fails CI instead of the next H200 run."""
import json
import os
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
    out = run([BENCH / "attention.py", "--device", "cpu", "--out", tmp_path / "a", "--nonfinite-modes", "0,2"], tmp_path)
    recs = [json.loads(line) for line in (tmp_path / "a" / "attention.json").read_text().splitlines()]
    rows = {r["impl"]: r for r in recs if not r.get("meta")}
    assert set(rows) == {"tnllm", "tnllm_api", "naive", "tnllm_nf0", "tnllm_nf2"}, rows
    for r in rows.values():
        assert "error" not in r and r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0, r
    assert max(rows["tnllm"]["check_rel_err"].values()) < 1e-2
    assert "| tiny B1 H2 T100" in out


def test_train_step_bench_cpu(tmp_path):
    for impl in ("tnllm", "sdpa"):
        run([BENCH / "train_step.py", "--device", "cpu", "--impl", impl, "--preset", "tiny", "--T", "32", "--B", "2",
             "--steps", "2", "--warmup", "1", "--no-compile", "--out", tmp_path / "t"], tmp_path)
    recs = [json.loads(line) for line in (tmp_path / "t" / "train_step.jsonl").read_text().splitlines()]
    assert [r["impl"] for r in recs] == ["tnllm", "sdpa"]
    for r in recs:
        assert r["step_ms"] > 0 and 0 < r["loss"] < 20 and len(r["steps_ms"]) == 2


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
