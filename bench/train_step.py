"""One training step of a TransNormerLLM preset on the GPU: tokens/s and MFU.

    python bench/train_step.py --impl tnllm --preset 385M --T 8192 --B 2 --out runs/train
    python bench/train_step.py --impl naive ...    # same model, attention = masked quadratic (bf16)
    python bench/train_step.py --impl sdpa ...     # an equal-shape softmax Transformer (SDPA, causal)
    python bench/train_step.py --loss fused ...    # head + loss as tnllm.ops.fused_linear_cross_entropy
    python bench/train_step.py --device cpu --preset tiny --T 64 --B 2 --steps 2 --warmup 1 --no-compile   # smoke

bf16 autocast with fp32 master weights, fused AdamW, every decoder layer compiled with
``fullgraph=True`` (regional compile: the 23 identical layers share one graph; the LRPE layer has its
own), and the loss (final norm, tied lm_head, cross entropy) compiled too. Time = median of timed
steps after warm-up (compile), with CUDA events around the whole step (forward, backward, optimizer).
``--loss naive`` (default) materialises the [B, T, V] logits (bf16, then fp32 for the cross entropy);
``--loss fused`` runs the head + cross entropy as ``tnllm.ops.fused_linear_cross_entropy`` (chunks of
``--loss-chunk-tokens`` rows, default on CUDA: at most 256 MiB of logits per chunk), so no [B, T, V] tensor exists.

MFU = model FLOPs per second / 989e12 (H200 dense bf16, datasheet). Model FLOPs per token =
6 * (parameters in matmuls, lm_head included) + attention: softmax 6 * L * T * d (causal half of
QK^T and PV, fwd + bwd), linear attention 12 * L * H * Dk * Dv (the state form q S, k^T v; fwd+bwd).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PEAK = 989e12


def naive_attend(q, k, v, s, S):
    """Masked quadratic linear attention in the input dtype (the paper's NormAttention baseline)."""
    T = q.shape[2]
    idx = torch.arange(T, device=q.device, dtype=torch.float32)
    diff = idx[:, None] - idx[None, :]
    M = (torch.exp(-s.float()[:, None, None] * diff.clamp(min=0)) * (diff >= 0)).to(q.dtype)
    return ((q @ k.transpose(-1, -2)) * M) @ v, S


class SdpaBlock(nn.Module):
    def __init__(self, d, H, g):
        super().__init__()
        self.H = H
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.l1, self.l2, self.l3 = nn.Linear(d, g, bias=False), nn.Linear(d, g, bias=False), nn.Linear(g, d, bias=False)

    def forward(self, x):
        from tnllm.ops import srms_norm
        B, T, d = x.shape
        q, k, v = self.qkv(srms_norm(x)).view(B, T, 3, self.H, d // self.H).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, d))
        h = srms_norm(x)
        return x + self.l3(self.l1(h) * self.l2(h))


class SdpaLM(nn.Module):
    """A softmax Transformer of the preset's shape (d, L, H, SGLU g, vocab, tied head); no u gate."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.decoder_embed_dim
        self.emb = nn.Embedding(cfg.vocab_size, d)
        self.layers = nn.ModuleList(SdpaBlock(d, cfg.decoder_attention_heads, cfg.glu_dim) for _ in range(cfg.decoder_layers))
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.emb.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0, 0.02)

    def hidden_states(self, ids):
        x = self.emb(ids) * math.sqrt(self.emb.weight.shape[1])
        for l in self.layers:
            x = l(x)
        return x


def build(impl, cfg):
    if impl == "sdpa":
        m = SdpaLM(cfg)
        layers = m.layers
    else:
        from tnllm import TransNormerLLM
        m = TransNormerLLM(cfg)
        layers = m.model.layers
        if impl == "naive":
            for l in layers:
                tm = l.token_mixer
                tm._parallel = naive_attend
    return m, layers


def matmul_params(m) -> int:
    return sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, nn.Linear))


def kernel_kind(name: str) -> str:
    n = name.lower()
    if any(t in n for t in ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas", "splitk")):
        return "gemm"
    if any(t in n for t in ("lightning", "_la_", "sweep", "attn", "flash")):
        return "attention"
    if n in ("fwd_kernel", "bwd_kernel") or "norm" in n:
        return "norm"
    if "adam" in n or "multi_tensor" in n:
        return "optimizer"
    if n.startswith("triton_") or "triton" in n:
        return "inductor"
    return "other"


def profile_step(step, cuda: bool) -> dict:
    """Device time of one ``step()`` per kernel name (summed over launches) and per kind."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    rows = {}
    for ev in prof.events():
        if cuda and ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if getattr(ev, "is_user_annotation", False) or ev.name.startswith(("Optimizer.", "ProfilerStep")):
            continue                     # a range on the GPU timeline, not a kernel: its kernels count already
        t = ev.device_time if cuda else ev.cpu_time
        r = rows.setdefault(ev.name, dict(name=ev.name, kind=kernel_kind(ev.name), ms=0.0, count=0))
        r["ms"] += t / 1e3
        r["count"] += 1
    kernels = sorted(rows.values(), key=lambda r: -r["ms"])
    kinds = {}
    for r in kernels:
        kinds[r["kind"]] = kinds.get(r["kind"], 0.0) + r["ms"]
    return dict(kernels=kernels, kinds_ms=kinds, kernel_ms_total=sum(kinds.values()))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", default="tnllm", choices=["tnllm", "naive", "sdpa"])
    ap.add_argument("--preset", default="385M")
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                    help="torch.compile mode of the layers and the loss (default: torch's default mode); "
                         "reduce-overhead replays each compiled region as a CUDA graph")
    ap.add_argument("--loss", default="naive", choices=["naive", "fused"],
                    help="naive: whole logits + F.cross_entropy; fused: tnllm.ops.fused_linear_cross_entropy")
    ap.add_argument("--loss-chunk-tokens", type=int, default=None,
                    help="rows per chunk of the fused loss (default: the op's own choice)")
    ap.add_argument("--out", default="runs/train")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed steps, one more step under torch.profiler: device time per kernel and per "
                         "kind (GEMM, attention, inductor fusions, optimizer, other) into train_profile.json")
    ap.add_argument("--ac", default="none", choices=["none", "full", "selective"],
                    help="activation checkpointing per TNL block (tnllm.train.parallelize.apply_ac, as `tnllm train "
                         "--ac`): full recomputes the block's forward in backward, selective keeps the attention "
                         "op's outputs and recomputes the rest")
    ap.add_argument("--host-profile", action="store_true",
                    help="after the timed steps, one more step under cProfile: the host's Python time per function "
                         "(cumulative, top 40) into train_host_profile_*.txt")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: the same step (autocast bf16 on CPU, wall-clock timing, no memory statistics)")
    a = ap.parse_args(argv)
    dev = a.device
    cuda = dev == "cuda"
    from tnllm import TransNormerConfig
    from tnllm.ops import srms_norm
    cfg = TransNormerConfig.from_preset(a.preset)
    torch.manual_seed(0)
    if a.ac != "none" and a.impl == "sdpa":
        ap.error("--ac applies to the TNL model (--impl tnllm or naive), not the SDPA baseline")
    m, layers = build(a.impl, cfg)
    m = m.to(dev)
    if a.ac != "none":
        from tnllm.train.parallelize import apply_ac
        apply_ac(m, a.ac)                     # before compile, as the trainer's parallelize order has it
    if not a.no_compile:
        for l in layers:
            l.compile(fullgraph=True, dynamic=False, mode=a.compile_mode)

    if a.loss_chunk_tokens is not None and a.loss_chunk_tokens < 1:
        ap.error("--loss-chunk-tokens must be >= 1")

    def loss_fn(h, ids):
        if a.loss == "fused":
            from tnllm.ops import fused_linear_cross_entropy
            x = srms_norm(h)[:, :-1]
            return fused_linear_cross_entropy(x.reshape(-1, x.shape[-1]), m.lm_head.weight, ids[:, 1:].reshape(-1),
                                              chunk_tokens=a.loss_chunk_tokens)
        logits = m.lm_head(srms_norm(h))[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    if not a.no_compile:
        loss_fn = torch.compile(loss_fn, fullgraph=True, dynamic=False, mode=a.compile_mode)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=cuda)
    ids = torch.randint(1, cfg.vocab_size, (a.B, a.T), device=dev)

    def step():
        if a.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()      # a new iteration: the last step's graph outputs are free
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = loss_fn(m.hidden_states(ids), ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.time()
    for _ in range(a.warmup):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm = time.time() - t0
    times, host, losses = [], [], []
    for _ in range(a.steps):
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t1 = time.perf_counter()
            e0.record()
            loss = step()
            e1.record()
            host.append((time.perf_counter() - t1) * 1e3)   # the host's time to issue the step (no sync inside)
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1))
        else:
            t1 = time.perf_counter()
            loss = step()
            times.append((time.perf_counter() - t1) * 1e3)
        losses.append(loss.detach().clone())        # a copy: a CUDA graph's output is overwritten by its next replay
    ms = sorted(times)[len(times) // 2]
    tokens = a.B * a.T
    L, d, H = cfg.decoder_layers, cfg.decoder_embed_dim, cfg.decoder_attention_heads
    e = d // H
    if a.impl == "sdpa":
        attn = 6 * L * a.T * d
    else:
        lrpe_layers = sum(1 for i in range(L) if cfg.lrpe(i))
        attn = 12 * H * e * e * (L - lrpe_layers) + 12 * H * 2 * e * e * lrpe_layers
    flops_tok = 6 * matmul_params(m) + attn
    rec = dict(impl=a.impl, loss_impl=a.loss, loss_chunk_tokens=a.loss_chunk_tokens, preset=a.preset, B=a.B, T=a.T, params=sum(p.numel() for p in m.parameters()),
               matmul_params=matmul_params(m), step_ms=ms, steps_ms=times,
               host_ms=sorted(host)[len(host) // 2] if host else None, compile_mode=a.compile_mode, ac=a.ac,
               tokens_per_s=tokens / (ms * 1e-3),
               mfu=flops_tok * tokens / (ms * 1e-3) / PEAK, flops_per_token=flops_tok,
               peak_mem_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
               # the caching allocator's reserve (it holds CUDA graphs' private pool, whose blocks are not counted as
               # allocated between replays): the number to compare across compile modes
               peak_reserved_gib=torch.cuda.max_memory_reserved() / 2 ** 30 if cuda else None, warmup_s=warm,
               losses=[float(v) for v in losses],
               loss=float(loss.detach()), compiled=not a.no_compile, device=dev, torch=torch.__version__)
    print(json.dumps(rec), flush=True)
    os.makedirs(a.out, exist_ok=True)
    tag = f"{a.impl}_{a.loss}_T{a.T}_B{a.B}"
    if a.profile:
        prof = profile_step(step, cuda)
        prof.update(impl=a.impl, loss_impl=a.loss, preset=a.preset, B=a.B, T=a.T, step_ms=ms)
        print(json.dumps({k: prof[k] for k in ("kinds_ms", "kernel_ms_total")}), flush=True)
        for r in prof["kernels"][:25]:
            print(f"{r['ms']:9.3f} ms  x{r['count']:<5d} {r['kind']:10s} {r['name'][:110]}", flush=True)
        with open(os.path.join(a.out, f"train_profile_{tag}.json"), "w") as f:
            json.dump(prof, f, indent=1)
    if a.host_profile:
        import cProfile
        import io
        import pstats
        pr = cProfile.Profile()
        pr.enable()
        step()
        pr.disable()
        if cuda:
            torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(40)
        with open(os.path.join(a.out, f"train_host_profile_{tag}.txt"), "w") as f:
            f.write(buf.getvalue())
    with open(os.path.join(a.out, "train_step.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
