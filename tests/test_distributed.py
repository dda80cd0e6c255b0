"""FSDP2, tensor parallel, activation checkpointing and DCP on CPU with gloo, in spawned processes.

Each multi-process test runs ``tests/dist_scripts/workers.py`` functions on 2 or 4 processes; the workers
compare against a one-process run of the same tiny model (fp32, relative error <= 1e-5).
"""
from __future__ import annotations

import math
import os
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from dist_scripts import workers as W  # noqa: E402

from tnllm import TransNormerLLM  # noqa: E402
from tnllm.train import dcp as tdcp  # noqa: E402
from tnllm.train.dist import ParallelDims  # noqa: E402
from tnllm.train.parallelize import apply_ac, unpermute_rows, _permute_rows  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


# -- multi-process equivalence -------------------------------------------------------------------------------
@pytest.mark.parametrize("world,dp,tp,ac,bias", [
    pytest.param(2, 2, 1, "full", False, id="fsdp2-acfull"),
    pytest.param(2, 1, 2, "none", True, id="tp2-bias"),
    pytest.param(4, 2, 2, "selective", False, id="fsdp2xtp2-acsel"),
])
def test_parallel_equals_single_process(world, dp, tp, ac, bias):
    W.run_world(W.w_equivalence, world, dp, tp, ac, bias, None)


@pytest.mark.parametrize("world,dp,tp", [pytest.param(2, 2, 1, id="fsdp2"), pytest.param(2, 1, 2, id="tp2")])
def test_fused_loss_equals_unfused(world, dp, tp):
    W.run_world(W.w_fused_loss, world, dp, tp)


def test_tp_compiles_fullgraph():
    """parallelize(compile=...) in its real order (TP -> AC -> compile -> FSDP): TP blocks (DTensor hooks,
    the cross-rank norm, the custom op) trace with fullgraph=True (aot_eager backend) and still match."""
    W.run_world(W.w_equivalence, 2, 1, 2, "none", False, "aot_eager")


def test_tp_srms_norm_equals_full_width_norm():
    W.run_world(W.w_tp_norm, 2)


# -- DCP --------------------------------------------------------------------------------------------------
def test_dcp_resume_equals_uninterrupted(tmp_path):
    W.run_world(W.w_resume_same, 4, 2, 2, "full", str(tmp_path / "ckpt"))


def test_dcp_resume_on_other_world_size_and_export(tmp_path):
    """Saved on 2 ranks with tp=2, resumed on 4 ranks (fsdp 2 x tp 2), then on one plain process; the
    sharded checkpoint exports to one released-layout safetensors file."""
    a, b = tmp_path / "tp2", tmp_path / "fsdp2xtp2"
    W.run_world(W.w_save, 2, 1, 2, str(a), 2)
    assert sorted(p.name for p in a.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    W.run_world(W.w_resume_other, 4, 2, 2, str(a), 2, 2, str(b))

    # world size 1: no process group, a plain model and optimizer
    cfg = W.config()
    want, want_p = W.reference(cfg, range(5))
    model = W.make_model(cfg, seed=5)
    opt = W.optimizer(model)
    assert tdcp.load(b, model, opt) == {"step": 4}
    got = W.train(model, opt, range(4, 5))
    W.assert_close_runs(got, want[4:], "resume on one process")
    W.assert_close_params(W.params(model), want_p, "resume on one process")

    # export: released keys, [4h, d] rows q|k|v|u; the file loads into a plain model with load_state_dict
    from safetensors.torch import load_file
    out = tdcp.export_safetensors(b, tmp_path / "export")
    assert out.name == "model.safetensors" and (out.parent / "config.json").is_file()
    sd = load_file(str(out))
    assert sd["model.layers.0.token_mixer.qkvu_proj.weight"].shape == (4 * 32, 32)
    assert "lm_head.weight" in sd and "model.layers.0.token_mixer.lrpe.theta" in sd
    _, ref_p4 = W.reference(cfg, range(4))
    plain = W.make_model(cfg, seed=9)
    plain.load_state_dict(sd, strict=True)
    W.assert_close_params(W.params(plain), ref_p4, "exported safetensors")
    ids = W.batch(0)
    ref_model = W.make_model(cfg)
    ref_model.load_state_dict(ref_p4, strict=False)
    torch.testing.assert_close(plain(ids), ref_model(ids), rtol=1e-5, atol=1e-5)
    # a bf16 export for release
    sd16 = load_file(str(tdcp.export_safetensors(b, tmp_path / "x16.safetensors", dtype=torch.bfloat16)))
    assert sd16["lm_head.weight"].dtype == torch.bfloat16


# -- one process: AC, layouts, argument checks ------------------------------------------------------------------
def _count_attn_calls(model, ids):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.tnllm.lightning_attn_fwd.default:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        loss = W.loss_fn(model, ids)
        loss.backward()
    return loss.detach(), Count.n


@pytest.mark.parametrize("mode,calls", [("none", 2), ("full", 4), ("selective", 2)])
def test_activation_checkpointing_keeps_losses_and_grads(mode, calls):
    """full recomputes each block's attention in backward; selective keeps the op's outputs; none of it
    changes the loss or the gradients."""
    cfg = W.config()
    ref = W.make_model(cfg)
    ids = W.batch(0)
    want = W.loss_fn(ref, ids)
    want.backward()
    model = apply_ac(W.make_model(cfg), mode)
    loss, n = _count_attn_calls(model, ids)
    assert n == calls, f"{mode}: {n} lightning_attn_fwd calls for 2 layers, expected {calls}"
    assert loss == want.detach()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-8, msg=name)
    assert list(model.state_dict()) == list(ref.state_dict())      # AC adds no wrapper to the keys


@given(tp=st.sampled_from([1, 2, 4]), rows_per_rank=st.integers(1, 5), cols=st.sampled_from([(), (3,), (2, 2)]))
def test_row_permutation_gives_whole_heads(tp, rows_per_rank, cols):
    """tp-rank r's block of the permuted rows is [q_r; k_r; v_r; u_r]; unpermute_rows inverts it."""
    h = tp * rows_per_rank
    w = torch.arange(4 * h * math.prod(cols), dtype=torch.float32).reshape(4 * h, *cols)
    p = _permute_rows(w, 4, tp)
    parts = w.chunk(4)
    for r, block in enumerate(p.chunk(tp)):
        want = torch.cat([c[r * rows_per_rank:(r + 1) * rows_per_rank] for c in parts])
        torch.testing.assert_close(block, want)
    torch.testing.assert_close(unpermute_rows(p, 4, tp), w)
    with pytest.raises(ValueError, match="tp"):
        _permute_rows(torch.zeros(4 * h + 1, 2), 4, tp if tp > 1 else 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="fsdp"):
        ParallelDims.resolve(4, fsdp=3, tp=2)
    with pytest.raises(ValueError, match="divisible"):
        ParallelDims.resolve(6, tp=4)
    assert ParallelDims.resolve(8, tp=2) == ParallelDims(4, 2)
    assert ParallelDims.resolve(4) == ParallelDims(4, 1)
    assert ParallelDims.resolve(4, fsdp=1) == ParallelDims(1, 4)
    with pytest.raises(ValueError, match="tp"):
        ParallelDims(1, 0)
    with pytest.raises(ValueError, match="mode"):
        apply_ac(W.make_model(W.config()), "everything")
    with pytest.raises(TypeError, match="TransNormerLLM"):
        apply_ac(torch.nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError, match="metadata"):
        tdcp.load("/nonexistent/ckpt", W.make_model(W.config()))


def test_memory_estimate_matches_saved_activations():
    """memory_per_rank's activation bytes (no AC, bf16) == what autograd saves, measured with saved_tensors_hooks."""
    from tnllm import TransNormerConfig
    from tnllm.train.parallelize import memory_per_rank
    cfg = TransNormerConfig(vocab_size=67, decoder_embed_dim=64, decoder_layers=2, decoder_attention_heads=4,
                            glu_dim=160, linear_use_lrpe_list=[0, 0])
    model = TransNormerLLM(cfg).to(torch.bfloat16)
    T = 128
    x = model.model.embed_tokens(torch.randint(0, 67, (1, T))).detach().requires_grad_()
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for layer in model.model.layers:
            x, _ = layer(x)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(v for k, v in seen.items() if k not in params)
    est = memory_per_rank(cfg, seq_len=T, ac="none")["activations"]
    assert abs(measured - est) <= 0.01 * est, (measured, est)
    big = TransNormerConfig.from_preset("7B")
    m1, m8 = memory_per_rank(big, 1), memory_per_rank(big, 8)
    assert m8["adam"] * 8 == pytest.approx(m1["adam"]) and m8["activations"] == m1["activations"]
    with pytest.raises(ValueError, match="ac"):
        memory_per_rank(cfg, ac="some")


def test_fsdp_bf16_mixed_precision():
    W.run_world(W.w_bf16, 2, 2, 1)


# -- the trainer under torchrun ------------------------------------------------------------------------------
def _metrics(run_dir):
    import json
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def test_torchrun_tnllm_train_equals_one_process_and_resumes_on_other_world(tmp_path):
    """`torchrun --nproc-per-node 2 -m tnllm train --tp 2` logs the one-process trainer's losses; its
    checkpoint resumes on 4 ranks (--fsdp 2 --tp 2 --ac selective) and ends where the uninterrupted run ends."""
    import shutil
    import subprocess
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400)))
    common = ["--preset", "tiny", "--data", str(corpus), "--seq-len", "32", "--batch-size", "4", "--steps", "4",
              "--eval-every", "0", "--eval-batches", "2", "--lr", "1e-3", "--warmup-steps", "0", "--no-progress",
              "--no-plot", "--device", "cpu"]     # gloo on CPU also on a GPU host (its ranks would outnumber GPUs)
    one, par = tmp_path / "one", tmp_path / "par"
    from tnllm.cli import main
    assert main(["train", *common, "--out", str(one)]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(W.free_port()), "-m", "tnllm", "train", "--fsdp", "1", "--tp", "2", "--save-every", "2",
           "--keep-checkpoints", "2", *common, "--out", str(par)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    errors = [l for l in r.stderr.splitlines() if "Error" in l or "error" in l or "what()" in l]
    assert r.returncode == 0, "\n".join(errors[:20]) + r.stdout[-2000:] + r.stderr[-2000:]
    assert "dp=1 x tp=2" in r.stdout
    want, got = _metrics(one), _metrics(par)
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want):
        for k in ("loss", "val_loss"):
            if k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-5), (k, a, b)
    ck = par / "step-0000004"
    assert (ck / "model.safetensors").is_file() and (ck / "dcp" / ".metadata").is_file()

    # resume from step 2 on 4 ranks with another layout
    shutil.rmtree(ck)
    (par / "latest").write_text("step-0000002\n")
    W.run_world(W.w_cli, 4, ["train", "--fsdp", "2", "--tp", "2", "--ac", "selective", "--resume", *common,
                             "--out", str(par)])
    got = _metrics(par)
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want):
        for k in ("loss", "val_loss"):
            if k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-5), (k, a, b)
    # the distributed checkpoint is an ordinary one for `generate`
    from tnllm.checkpoints import load_model
    model, _ = load_model(par)
    ref, _ = load_model(one)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert k == k2
        assert W.rel(v, v2) <= 1e-5, (k, W.rel(v, v2))       # whole-tensor relative error


def test_distributed_trainer_refuses_cuda_graph_compile_modes(tmp_path):
    """FSDP2 gathers parameters into new memory every step: a CUDA-graph compile mode is refused up front,
    before any process group is needed."""
    from tnllm.train.dist import DistributedTrainer
    from tnllm.train.loop import TrainConfig
    cfg = TrainConfig(out_dir=str(tmp_path), preset="tiny", device="cpu", compile=True, compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="default mode only"):
        DistributedTrainer(cfg)
