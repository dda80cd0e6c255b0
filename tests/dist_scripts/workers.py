"""Workers for tests/test_distributed.py. Each runs in its own process (``run_world``), on CPU with gloo.

Every worker builds the same tiny model from the same seed, computes the single-process reference itself
(the full batch on one process, a few AdamW steps) and compares the parallel run against it: losses,
gradients (gathered to full tensors in the released layout) and the final parameters.

AdamW gets ``eps=1e-3``: with a tiny eps, Adam turns a 1e-9 rounding difference in a near-zero gradient
into a full +-lr step, which would make trajectories of two exact implementations diverge.
"""
from __future__ import annotations

import multiprocessing
import os
import socket

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from tnllm import TransNormerConfig, TransNormerLLM
from tnllm.train import dcp as tdcp
from tnllm.train import dist as tdist
from tnllm.train.parallelize import parallelize, unpermute_rows

CFG = dict(vocab_size=67, decoder_embed_dim=32, decoder_layers=2, decoder_attention_heads=4, glu_dim=48,
           block_size=8)
B, T = 4, 20          # T not a multiple of the block: partial blocks are exercised too
TOL = 1e-5


# -- process harness ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, port, *args)`` on ``world`` processes; a failure in any rank raises here.

    forkserver with torch and tnllm preloaded: children start in ~0.1 s instead of re-importing torch,
    and unlike plain fork they inherit no threads of the test process (inductor pools, OpenMP)."""
    import torch.multiprocessing as mp
    ctx = multiprocessing.get_context("forkserver")
    if not getattr(run_world, "_preloaded", False):
        ctx.set_forkserver_preload(["torch", "torch.distributed.tensor", "tnllm.model", "tnllm.train.parallelize",
                                    "tnllm.train.dcp", "dist_scripts.workers"])
        run_world._preloaded = True
    mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=True, start_method="forkserver")


def setup(rank: int, world: int, port: int, dp: int, tp: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    tdist.init_distributed("gloo", timeout_s=120)
    return tdist.build_mesh(tdist.ParallelDims(dp, tp), "cpu")


# -- model, data, steps -------------------------------------------------------------------------------------
def config(**kw) -> TransNormerConfig:
    return TransNormerConfig(**{**CFG, **kw})


def make_model(cfg, seed: int = 0) -> TransNormerLLM:
    torch.manual_seed(seed)
    return TransNormerLLM(cfg)


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, CFG["vocab_size"], (B, T), generator=g)


def optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1)


def loss_fn(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def local_rows(mesh, ids):
    """This dp rank's slice of the global batch (tp ranks of one dp group see the same rows)."""
    dp, i = (1, 0) if mesh is None else (mesh["dp"].size(), mesh["dp"].get_local_rank())
    n = ids.shape[0] // dp
    return ids[i * n:(i + 1) * n]


def released(model, name, t):
    """A parameter-shaped tensor (param or grad) of ``model`` as one full tensor in the released layout."""
    t = t.full_tensor() if isinstance(t, DTensor) else t
    if tdcp.is_qkvu(name):
        ct = getattr(model.get_submodule(name.rsplit(".", 1)[0]), "tnllm_fused_rows", None)
        if ct is not None and ct[1] > 1:
            t = unpermute_rows(t, *ct)
    return t.detach().clone()


def grads(model):
    return {n: released(model, n, p.grad) for n, p in model.named_parameters()}


def params(model):
    return {n: released(model, n, p) for n, p in model.named_parameters()}


def train(model, opt, steps, mesh=None):
    """Run ``steps`` (a range of step indices); return [(global loss, grads)] per step."""
    out = []
    for s in steps:
        loss = loss_fn(model, local_rows(mesh, batch(s)))
        loss.backward()
        glob = tdist.all_reduce_mean(loss.item(), mesh["dp"].get_group()) if mesh is not None else loss.item()
        out.append((glob, grads(model)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_close_runs(got, want, what: str, tol: float = TOL):
    for s, ((lg, gg), (lw, gw)) in enumerate(zip(got, want)):
        assert abs(lg - lw) <= tol * abs(lw), f"{what}: step {s} loss {lg!r} vs reference {lw!r}"
        assert gg.keys() == gw.keys(), f"{what}: parameter names differ: {sorted(gg)} vs {sorted(gw)}"
        for n in gw:
            e = rel(gg[n], gw[n])
            assert e <= tol, f"{what}: step {s} grad of {n}: relative error {e:.2e} > {tol}"


def assert_close_params(got, want, what: str, tol: float = TOL):
    for n in want:
        e = rel(got[n], want[n])
        assert e <= tol, f"{what}: parameter {n}: relative error {e:.2e} > {tol}"


def reference(cfg, steps):
    ref = make_model(cfg)
    runs = train(ref, optimizer(ref), steps)
    return runs, params(ref)


# -- workers -------------------------------------------------------------------------------------------------
def w_equivalence(rank, world, port, dp, tp, ac, bias, compile_backend):
    """(dp, tp) training == one process: losses and gradients every step, parameters at the end."""
    mesh = setup(rank, world, port, dp, tp)
    cfg = config(bias=bias)
    steps = range(3)
    want, want_p = reference(cfg, steps)
    model = parallelize(make_model(cfg), mesh, ac=ac, compile=compile_backend or False)
    got = train(model, optimizer(model), steps, mesh)
    what = f"dp={dp} tp={tp} ac={ac} bias={bias} compile={compile_backend}"
    assert_close_runs(got, want, what)
    assert_close_params(params(model), want_p, what)
    if tp > 1:   # the TP pieces really are split: whole local heads, local decay
        tm = model.model.layers[0].token_mixer
        assert tm.num_heads == CFG["decoder_attention_heads"] // tp and tm.s.numel() == tm.num_heads
        assert isinstance(tm.lrpe.theta, DTensor)
    tdist.destroy()


def w_bf16(rank, world, port, dp, tp):
    """FSDP MixedPrecisionPolicy(bf16 params, fp32 reduce): fp32 master weights, bf16 compute, losses
    within bf16 rounding of the fp32 run."""
    mesh = setup(rank, world, port, dp, tp)
    cfg = config()
    want, _ = reference(cfg, range(3))
    model = parallelize(make_model(cfg), mesh, mp_policy="bf16")
    seen = []
    h = model.model.layers[1].channel_mixer.l1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    got = train(model, optimizer(model), range(3), mesh)
    h.remove()
    assert set(seen) == {torch.bfloat16}, seen
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for s, ((lg, _), (lw, _)) in enumerate(zip(got, want)):
        assert abs(lg - lw) <= 2e-2 * abs(lw), f"bf16 step {s}: loss {lg} vs fp32 {lw}"
    tdist.destroy()


def w_cli(rank, world, port, argv):
    """``tnllm train ...`` as torchrun would start it: the env variables, then the CLI's main."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from tnllm.cli import main
    assert main(list(argv)) == 0


def w_tp_norm(rank, world, port):
    """tp_srms_norm over head slices == srms_norm over the full width, values and gradients."""
    from tnllm.ops import srms_norm
    from tnllm.train.parallelize import tp_srms_norm
    mesh = setup(rank, world, port, 1, world)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 24, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 24, dtype=torch.float64)
    w = torch.randn(3, 5, 24, generator=g, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    (srms_norm(xr) * w).sum().backward()
    n = 24 // world
    sl = slice(rank * n, (rank + 1) * n)
    xl = x[..., sl].clone().requires_grad_()
    y = tp_srms_norm(xl, mesh["tp"].get_group(), width=24)
    (y * w[..., sl]).sum().backward()
    ref_y = srms_norm(x)[..., sl]
    assert rel(y.detach(), ref_y) <= 1e-12, f"tp_srms_norm value: {rel(y.detach(), ref_y):.2e}"
    assert rel(xl.grad, xr.grad[..., sl]) <= 1e-12, f"tp_srms_norm grad: {rel(xl.grad, xr.grad[..., sl]):.2e}"
    # fp32 and bf16 inputs: fp32 inside, output in the input dtype, same as srms_norm
    for dt, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        yl = tp_srms_norm(x[..., sl].to(dt), mesh["tp"].get_group(), width=24)
        assert yl.dtype == dt
        assert rel(yl.double(), srms_norm(x.to(dt))[..., sl].double()) <= tol
    # heads that do not split over tp: a clear error before anything is sharded
    from tnllm.train.parallelize import apply_tp
    import pytest
    with pytest.raises(ValueError, match="decoder_attention_heads"):
        apply_tp(make_model(config(decoder_attention_heads=1, linear_use_lrpe_list=[0, 0])), mesh["tp"])
    with pytest.raises(TypeError, match="1-D DeviceMesh"):
        apply_tp(make_model(config()), mesh)
    tdist.destroy()


def w_resume_same(rank, world, port, dp, tp, ac, ckpt):
    """save after 2 steps -> a fresh model loading it runs steps 2, 3 exactly like the uninterrupted run."""
    mesh = setup(rank, world, port, dp, tp)
    cfg = config(bias=True)            # the qkvu bias takes the same TP-independent path as the weight
    model = parallelize(make_model(cfg), mesh, ac=ac)
    opt = optimizer(model)
    train(model, opt, range(2), mesh)
    tdcp.save(ckpt, model, opt, extra={"step": 2, "note": "unit"})
    after = train(model, opt, range(2, 4), mesh)
    final = params(model)

    model2 = parallelize(make_model(cfg, seed=123), mesh, ac=ac)     # different init: the load must overwrite it
    opt2 = optimizer(model2)
    extra = tdcp.load(ckpt, model2, opt2)
    assert extra == {"step": 2, "note": "unit"}, extra
    resumed = train(model2, opt2, range(2, 4), mesh)
    assert_close_runs(resumed, after, "resume (same layout)", tol=1e-6)
    assert_close_params(params(model2), final, "resume (same layout)", tol=1e-6)
    tdist.destroy()


def w_save(rank, world, port, dp, tp, ckpt, n):
    """Train steps [0, n) on (dp, tp) and save."""
    mesh = setup(rank, world, port, dp, tp)
    model = parallelize(make_model(config()), mesh)
    opt = optimizer(model)
    train(model, opt, range(n), mesh)
    tdcp.save(ckpt, model, opt, extra={"step": n})
    tdist.destroy()


def w_resume_other(rank, world, port, dp, tp, ckpt, n, m, ckpt_out):
    """Load a checkpoint written on another layout, train steps [n, n+m): == the one-process reference."""
    mesh = setup(rank, world, port, dp, tp)
    cfg = config()
    want, want_p = reference(cfg, range(n + m))
    model = parallelize(make_model(cfg, seed=123), mesh)
    opt = optimizer(model)
    extra = tdcp.load(ckpt, model, opt)
    assert extra == {"step": n}, extra
    got = train(model, opt, range(n, n + m), mesh)
    assert_close_runs(got, want[n:], f"resume on dp={dp} tp={tp}")
    assert_close_params(params(model), want_p, f"resume on dp={dp} tp={tp}")
    if ckpt_out:
        tdcp.save(ckpt_out, model, opt, extra={"step": n + m})
        full = tdcp.full_state_dict(model)          # gathered to rank 0 only
        if rank == 0:
            assert_close_params(full, want_p, "full_state_dict")
        else:
            assert full == {}
    tdist.destroy()



def w_fused_loss(rank, world, port, dp, tp):
    """lm_loss through the fused head + loss equals the unfused one under FSDP2 / TP (loss and every
    gradient, gathered); under FSDP2 the root's head weight is unsharded (a plain tensor) once
    ``hidden_states`` ran, so the fused path is the one taken; a TP head (Replicate DTensor) keeps the
    unfused path."""
    from tnllm.train.loop import fused_head_weight, lm_loss
    from tnllm.train.parallelize import parallelize
    mesh = setup(rank, world, port, dp, tp)
    out = {}
    for fused in (True, False):
        m = parallelize(make_model(config()), mesh)
        ids = batch(0) if dp == 1 else batch(0)[rank::dp]
        m.hidden_states(ids[:, :-1])
        assert (fused_head_weight(m) is not None) == (tp == 1), type(m.lm_head.weight)
        loss = lm_loss(m, ids, chunk_tokens=5, fused=fused)
        loss.backward()
        out[fused] = (loss.detach(), [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                                      for p in m.parameters()])
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    tdist.destroy()
