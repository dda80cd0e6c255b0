"""GPU suite (``pytest -m gpu``; skipped without CUDA): `tnllm compare` and `tnllm ablate` on a real device, bf16
autocast and ``--compile``, at tiny size (a few steps): the path the 100M comparison takes."""
import json
import math

import pytest

from tnllm.cli import main

pytestmark = pytest.mark.gpu

TINY = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "64", "--eval-every", "0", "--eval-batches", "2",
        "--warmup-steps", "1", "--no-progress", "--device", "cuda", "--compile"]


def test_compare_time_budget_compiled(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--time-budget", "3", "--out", str(out)]) == 0
    res = json.loads((out / "compare.json").read_text())
    assert res["complete"] and res["steps"] >= 1 and res["compile"]
    assert set(res["step_time_s"]) == {"transnormer", "transformer"}
    for a in ("transnormer", "transformer"):
        assert math.isfinite(res["summary"][a]["val_loss_mean"])
    assert (out / "compare.png").exists()


def test_ablate_compiled(tmp_path):
    out = tmp_path / "abl"
    assert main(["ablate", *TINY, "--steps", "3", "--variants", "no_decay,rmsnorm",
                 "--out", str(out)]) == 0
    res = json.loads((out / "ablate.json").read_text())
    assert all(math.isfinite(s["val_loss_mean"]) for s in res["summary"].values())
