"""Microbenchmark of the token mixer's decode tail, one layer: everything after ``qkvu_proj`` for one
token per row (activation, LRPE, S <- lam S + k^T v, o = q S, SRMSNorm over the width, times u).

Implementations, each updating a persistent fp32 state buffer as a decode loop does:

* ``eager``: today's step tail in eager PyTorch (``gla_decode_naive``, the same ops as
  ``NormLinearAttention.step``), then the copy into the state buffer that ``CudaGraphDecoder`` makes;
* ``compiled``: the same function under ``torch.compile(fullgraph=True)`` (inductor fuses the copy);
  batch is a dynamic dimension unless ``--compile-static`` (one compile per shape, slower to run);
* ``fused``: ``gla_decode_step(..., inplace=True)``, the one-launch Triton kernel.

On CUDA each is captured ``--calls`` times in one CUDA graph (after warm-up) and the graph replayed
``--replays`` times between CUDA events: microseconds per call = elapsed / (replays * calls).
Bytes moved is the op's floor: the state read and written once (fp32), qkvu read, y written, plus the
rates / LRPE frequencies / positions; % of peak against 4.25 TB/s (H200 HBM3e). ``kernels`` counts the
device kernels (and memsets/copies) of one call outside the graph (torch.profiler).

    python bench/decode_kernel.py --device cuda --out $OUT                          # H200, ~2 min
    python bench/decode_kernel.py --device cpu --presets tiny --batches 1 2 --calls 3 --impls eager fused --out /tmp/dk

Writes ``decode_kernel.json`` (one record per measurement) and ``decode_kernel.md`` (the table) under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import traceback
from pathlib import Path

import torch

from benchutil import GraphTimer  # bench/ is on sys.path: the scripts run from it
from tnllm import TransNormerConfig
from tnllm.model import decay_rates
from tnllm.ops.gla_decode import gla_decode_naive, gla_decode_step

PEAK = 4.25e12          # H200 HBM3e bytes/s
IMPLS = ("eager", "compiled", "fused")


def make_inputs(cfg: TransNormerConfig, B: int, lrpe: bool, dtype, dev, seed: int = 0):
    """One layer's decode inputs for preset ``cfg`` (layer 0's rates; LRPE on or off)."""
    H, e = cfg.decoder_attention_heads, cfg.head_dim
    g = torch.Generator(device=dev).manual_seed(seed)
    qkvu = (torch.randn(B, 4 * H * e, device=dev, generator=g) * 0.5).to(dtype)
    S = torch.randn(B, H, 2 * e if lrpe else e, e, device=dev, generator=g) * 0.1
    s = decay_rates(cfg, 0).to(dev)
    n = H * e
    theta = (10000 ** (-2 / n * torch.arange(n, dtype=torch.float32, device=dev))).reshape(H, 1, e) if lrpe else None
    pos = torch.full((B,), 1000, dtype=torch.int64, device=dev)
    return qkvu, S, s, theta, pos


def bytes_moved(qkvu, S, s, theta, pos) -> int:
    B, H, Dk, e = S.shape
    el = qkvu.element_size()
    n = 2 * S.numel() * 4 + qkvu.numel() * el + B * H * e * el + s.numel() * 4
    if theta is not None:
        n += theta.numel() * 4 + pos.numel() * 8
    return n


def tail_eager(qkvu, S, s, theta, pos, act):
    y, S_new = gla_decode_naive(qkvu, S, s, theta, pos, act)
    S.copy_(S_new)
    return y


def tail_fused(qkvu, S, s, theta, pos, act):
    return gla_decode_step(qkvu, S, s, theta, pos, act, inplace=True)[0]


def count_kernels(fn, dev) -> int | None:
    """Device activities (kernels, memsets, copies) of one call, outside any graph."""
    if dev.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(dev)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--presets", nargs="+", default=["385M", "1B", "7B"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64, 256])
    p.add_argument("--lrpe", nargs="+", choices=["on", "off"], default=["on", "off"])
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--calls", type=int, default=100, help="calls per CUDA graph (per timed loop on CPU)")
    p.add_argument("--replays", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile-static", action="store_true", help="one compile per shape (default: dynamic batch)")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but CUDA is not available (use --device cpu for the smoke run)")
    dtype = getattr(torch, a.dtype)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    timer = GraphTimer(dev, a.calls, a.replays, a.warmup)
    # one code object compiled for every shape here: never fall back to eager for too many recompiles
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    compiled = torch.compile(tail_eager, fullgraph=True, dynamic=False if a.compile_static else None)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
           platform.processor() or platform.machine(), "dtype": a.dtype, "calls": a.calls, "replays": a.replays}
    print(json.dumps(env), flush=True)
    rows = []

    def save():                                  # after every row: a run cut short keeps what it measured
        (out / "decode_kernel.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
        (out / "decode_kernel.md").write_text(table(rows, a.impls) + "\n")
    for preset in a.presets:
        cfg = TransNormerConfig.from_preset(preset)
        act = cfg.linear_act_fun
        for lrpe in a.lrpe:
            for B in a.batches:
                ins = make_inputs(cfg, B, lrpe == "on", dtype, dev)
                qkvu, S0, s, theta, pos = ins
                nbytes = bytes_moved(*ins)
                y_ref = gla_decode_naive(qkvu, S0, s, theta, pos, act)[0]
                base = {"preset": preset, "H": cfg.decoder_attention_heads, "e": cfg.head_dim, "lrpe": lrpe,
                        "B": B, "bytes": nbytes}
                for impl in a.impls:
                    S = S0.clone()
                    if impl == "compiled" and not a.compile_static:
                        for t in (qkvu, S, pos):
                            torch._dynamo.maybe_mark_dynamic(t, 0)
                    f = {"eager": tail_eager, "compiled": compiled, "fused": tail_fused}[impl]

                    def call(f=f, S=S):
                        f(qkvu, S, s, theta, pos, act)
                    try:
                        err = rel_err(f(qkvu, S.clone(), s, theta, pos, act), y_ref)
                        kern = count_kernels(call, dev)
                        t = timer(call)
                    except Exception as exc:          # record it and go on with the other rows
                        traceback.print_exc()
                        print(json.dumps(dict(base, impl=impl, error=repr(exc)[:500])), flush=True)
                        continue
                    row = dict(base, impl=impl, us=t * 1e6, GBps=nbytes / t / 1e9, pct_peak=100 * nbytes / t / PEAK,
                               kernels=kern, rel_err_vs_eager=err)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    save()
                    del S
                del ins, qkvu, S0, y_ref
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    save()
    print(table(rows, a.impls))
    return rows


def table(rows: list[dict], impls) -> str:
    head = ["preset", "H", "LRPE", "B", "state+io MB"]
    for i in impls:
        head += [f"{i} us", f"{i} % peak", f"{i} kernels"]
    if "fused" in impls:
        head += [f"fused vs {i}" for i in impls if i != "fused"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = []
    for r in rows:
        k = (r["preset"], r["lrpe"], r["B"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        by = {r["impl"]: r for r in rows if (r["preset"], r["lrpe"], r["B"]) == k}
        r0 = next(iter(by.values()))
        cells = [k[0], str(r0["H"]), k[1], str(k[2]), f"{r0['bytes'] / 1e6:.2f}"]
        for i in impls:
            r = by.get(i)
            cells += ([f"{r['us']:.1f}", f"{r['pct_peak']:.1f}", str(r["kernels"] if r["kernels"] is not None else "-")]
                      if r else ["-", "-", "-"])
        if "fused" in impls and "fused" in by:
            cells += [f"{by[i]['us'] / by['fused']['us']:.2f}x" if i in by else "-" for i in impls if i != "fused"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
