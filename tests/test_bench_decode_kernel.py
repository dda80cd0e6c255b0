"""CPU smoke run of bench/decode_kernel.py (the fused decode kernel's GPU microbenchmark): the tiny
preset, eager and fused paths, one JSON record per measurement and the markdown table."""
import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "decode_kernel.py"


def test_decode_kernel_bench_cpu_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))     # as when the script runs: bench/ is on sys.path
    spec = importlib.util.spec_from_file_location("decode_kernel_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--device", "cpu", "--presets", "tiny", "--batches", "1", "3", "--calls", "2", "--warmup", "1",
                     "--impls", "eager", "fused", "--out", str(tmp_path)])
    assert len(rows) == 2 * 2 * 2                       # lrpe on/off x 2 batches x 2 impls
    for r in rows:
        assert r["us"] > 0 and r["bytes"] > 0 and r["rel_err_vs_eager"] == 0.0   # CPU: the same reference maths
    on = [r for r in rows if r["lrpe"] == "on" and r["B"] == 3][0]
    # bf16 io: state read + written (fp32), qkvu read, y written, rates, LRPE theta (fp32), positions (int64)
    assert on["bytes"] == 2 * 3 * 4 * 32 * 16 * 4 + 3 * 4 * 64 * 2 + 3 * 64 * 2 + 4 * 4 + 4 * 16 * 4 + 3 * 8
    saved = json.loads((tmp_path / "decode_kernel.json").read_text())
    assert len(saved["rows"]) == len(rows)
    md = (tmp_path / "decode_kernel.md").read_text()
    assert md.count("\n| tiny |") == 4 and "fused vs eager" in md
