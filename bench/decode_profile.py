"""Where the time of one fused decode step goes: kernel by kernel and stage by stage (torch.profiler).

The fused step (``CudaGraphDecoder(decode_path="fused")``, ``tnllm/compile/fused_step.py``) is run eagerly,
outside a CUDA graph, with a ``record_function`` range around each stage of every layer (embed; per layer
qkvu, mixer, out, l12, sglu, l3; head). Device time per stage is the summed time of the kernels it
launched; the stage's floor is the bytes it must read once (its weight, and for the mixer the fp32 state
read and written) at ``--bandwidth`` GB/s. A second table lists each kernel name with its count and time
per step (which GEMM kernels cuBLAS picked, how long each takes).

Outside a graph, the gaps between kernels are the host's; inside the graph that ``CudaGraphDecoder``
replays they nearly vanish, so the graph replay's ms/token (printed beside the profile) is the real
step time, and sum(kernel time) is the part that fewer launches cannot remove.

    python bench/decode_profile.py --device cuda --preset 385M --batch 1 --out $OUT       # H200, ~1 min
    python bench/decode_profile.py --device cpu --preset tiny --steps 2 --out /tmp/dp    # smoke test

Writes ``decode_profile.json`` and ``decode_profile.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from tnllm import TransNormerConfig, TransNormerLLM
from tnllm.bench_decode import time_loop
from tnllm.compile import CudaGraphDecoder

STAGES = ("embed", "qkvu", "mixer", "out", "l12", "sglu", "l3", "head")


def attribute_kernels(gpu_events, steps: int):
    """Per-stage and per-kernel device time from the device timeline: ``gpu_events`` is a list of (name, start,
    end) in microseconds, holding both the kernels and the ``record_function`` ranges as the profiler puts
    them on the device (a range named like a stage spans its kernels). Each kernel is given to the stage
    range that contains its start; a range's own span (which includes idle gaps while the host launches) is
    not counted. Returns ({stage: (us per step, kernels per step)}, [kernel rows, longest first])."""
    ranges = sorted((s, e, n) for n, s, e in gpu_events if n in STAGES)
    per_stage = {s: [0.0, 0] for s in STAGES}
    per_kernel = defaultdict(lambda: [0, 0.0])
    j = 0
    for name, start, end in sorted(((n, s, e) for n, s, e in gpu_events if n not in STAGES), key=lambda t: t[1]):
        while j < len(ranges) and ranges[j][1] < start:
            j += 1
        if j < len(ranges) and ranges[j][0] <= start:
            per_stage[ranges[j][2]][0] += end - start
            per_stage[ranges[j][2]][1] += 1
        k = per_kernel[name]
        k[0] += 1
        k[1] += end - start
    rows = [{"kernel": n[:110], "per_step": round(c / steps, 2), "us_per_step": round(us / steps, 2),
             "us_each": round(us / c, 2)} for n, (c, us) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1])]
    return {s: (us / steps, c / steps) for s, (us, c) in per_stage.items()}, rows


def stage_bytes(model, batch: int, state_bytes: int) -> dict[str, int]:
    """The bytes each stage must move once: its weights (model dtype), the mixer's state in and out."""
    def nb(w):
        return w.numel() * w.element_size()
    layers = model.model.layers
    t, c = layers[0].token_mixer, layers[0].channel_mixer
    n = len(layers)
    return {"embed": batch * nb(model.model.embed_tokens.weight[0]), "qkvu": n * nb(t.qkvu_proj.weight),
            "mixer": n * 2 * state_bytes, "out": n * nb(t.out_proj.weight),
            "l12": n * (nb(c.l1.weight) + nb(c.l2.weight)), "sglu": 0, "l3": n * nb(c.l3.weight),
            "head": nb(model.lm_head.weight)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="385M")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--steps", type=int, default=20, help="profiled steps (after 3 warm-up steps)")
    ap.add_argument("--bandwidth", type=float, default=4250.0, help="GB/s for the floors (H200 HBM3e: 4250)")
    ap.add_argument("--out", default="bench/results/decode_profile")
    a = ap.parse_args(argv)
    if a.batch < 1 or a.steps < 1:
        ap.error("--batch and --steps must be >= 1")
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    with torch.device(dev):
        model = TransNormerLLM(TransNormerConfig.from_preset(a.preset)).to(dtype).eval()
    dec = CudaGraphDecoder(model, a.batch, cuda_graph=cuda, decode_path="fused")
    g = torch.Generator(device=dev).manual_seed(0)
    dec.reset([torch.randn(s.shape, generator=g, device=dev) * 0.05 for s in dec.states], position=1024)
    ids = torch.ones(a.batch, dtype=torch.int64, device=dev)

    # the graph replay, as the decoder runs it (the real step time)
    dec.step(ids)
    run = dec.graph.replay if dec.graph is not None else dec.replay
    replay_ms = time_loop(run, max(a.steps, 50) if cuda else a.steps, 3, dev) * 1e3

    # the eager step under the profiler, one range per stage
    states = [torch.randn(s.shape, generator=g, device=dev) * 0.05 for s in dec.states]
    position = torch.full((a.batch,), 1024, dtype=torch.int64, device=dev)
    with torch.no_grad():     # the ranges must not change what the step computes
        st1, st2 = [S.clone() for S in states], [S.clone() for S in states]
        want, got = dec.fused(ids, st1, position), dec.fused(ids, st2, position, stage=record_function)
        if not (torch.equal(want, got) and all(torch.equal(x, y) for x, y in zip(st1, st2))):
            raise SystemExit("decode_profile: the step with profiler ranges differs from the step without")
        for _ in range(3):
            dec.fused(ids, states, position, stage=record_function)
        if cuda:
            torch.cuda.synchronize()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(a.steps):
                dec.fused(ids, states, position, stage=record_function)
            if cuda:
                torch.cuda.synchronize()

    nbytes = stage_bytes(model, a.batch, dec.states[0].numel() * dec.states[0].element_size())
    if cuda:
        gpu = [(e.name, float(e.time_range.start), float(e.time_range.end)) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
        per_stage, kernels = attribute_kernels(gpu, a.steps)
    else:                   # no device timeline: each range's CPU time
        avg = {e.key: e for e in prof.key_averages()}
        per_stage = {s: (avg[s].cpu_time_total / a.steps, avg[s].count / a.steps) if s in avg else (0.0, 0.0)
                     for s in STAGES}
        kernels = []
    stages = []
    for s in STAGES:
        us, n = per_stage.get(s, (0.0, 0.0))
        floor_us = nbytes[s] / (a.bandwidth * 1e3)
        stages.append({"stage": s, "us_per_step": round(us, 2), "bytes": nbytes[s], "floor_us": round(floor_us, 2),
                       "pct_floor": round(100 * floor_us / us, 1) if us > 0 and floor_us > 0 else None,
                       ("kernels_per_step" if cuda else "calls_per_step"): round(n, 2)})
    total_us = sum(s["us_per_step"] for s in stages)
    floor_total = sum(s["floor_us"] for s in stages)
    res = {"preset": a.preset, "batch": a.batch, "dtype": a.dtype, "device": str(dev),
           "gpu": torch.cuda.get_device_name(dev) if cuda else None, "torch": torch.__version__,
           "replay_ms_per_token": round(replay_ms, 4), "kernel_ms_per_step": round(total_us / 1e3, 4),
           "kernels_per_step": round(sum(k["per_step"] for k in kernels), 1) if cuda else None,
           "floor_ms": round(floor_total / 1e3, 4), "bandwidth_gbs": a.bandwidth, "stages": stages, "kernels": kernels}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "decode_profile.json"), "w") as f:
        json.dump(res, f, indent=1)
    unit = "device us" if cuda else "CPU us"
    lines = [f"# fused decode step, {a.preset} B{a.batch} {a.dtype} on {res['gpu'] or dev}",
             "", f"graph replay: {replay_ms:.4f} ms/token; summed {unit} per step: {total_us / 1e3:.4f} ms "
             f"({res['kernels_per_step']} kernels); floor at {a.bandwidth:.0f} GB/s: {floor_total / 1e3:.4f} ms", "",
             f"| stage | {'kernels' if cuda else 'calls'}/step | {unit}/step | floor us | % of floor |",
             "|---|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['kernels_per_step' if cuda else 'calls_per_step']} | {s['us_per_step']} | {s['floor_us']} | "
              f"{s['pct_floor'] if s['pct_floor'] is not None else '-'} |" for s in stages]
    if kernels:
        lines += ["", "| kernel | per step | us/step | us each |", "|---|---|---|---|"]
        lines += [f"| `{k['kernel']}` | {k['per_step']} | {k['us_per_step']} | {k['us_each']} |" for k in kernels[:25]]
    text = "\n".join(lines)
    with open(os.path.join(a.out, "decode_profile.md"), "w") as f:
        f.write(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
