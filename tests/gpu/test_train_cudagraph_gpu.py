"""GPU suite (``pytest -m gpu``): the trainer with ``compile_mode="reduce-overhead"`` (each compiled block
replayed as a CUDA graph) trains exactly like the default compile mode: same losses step by step, same
validation loss, and the graphs are replayed rather than re-recorded every step."""
import math

import pytest
import torch

from tnllm.train.loop import Trainer, TrainConfig

pytestmark = pytest.mark.gpu


def _run(tmp_path, corpus, mode):
    torch._dynamo.reset()
    cfg = TrainConfig(out_dir=str(tmp_path / mode), preset="tiny", data=str(corpus), seq_len=64, batch_size=4,
                      steps=6, warmup_steps=1, eval_every=3, eval_batches=2, progress=False, plot=False,
                      checkpoint=False, device="cuda", compile=True, compile_mode=mode)
    t = Trainer(cfg, log=lambda m: None)
    summary = t.fit()
    return [r["loss"] for r in t.history if "loss" in r], summary


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(8):
        (d / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(40)))
    return d


def test_reduce_overhead_trains_like_default(tmp_path, corpus):
    base, s0 = _run(tmp_path, corpus, "default")
    graphs, s1 = _run(tmp_path, corpus, "reduce-overhead")
    assert len(base) == len(graphs) >= 6
    for a, b in zip(base, graphs):
        assert math.isfinite(a) and abs(a - b) <= 1e-4 * abs(a), (base, graphs)
    assert abs(s0["val_loss"] - s1["val_loss"]) <= 1e-4 * abs(s0["val_loss"])
