"""The decode step's GEMMs at decode batch sizes, several ways: cuBLAS with the residual add inside the GEMM
(``x.addmm_(y, W^T)``), the GEMM then a separate add (``x.add_(F.linear(y, W))``), the bare GEMM
(``F.linear(y, W)``), and ``tnllm.ops.gemv.residual_gemv`` (what ``FusedDecodeStep`` calls for out_proj and l3:
the Triton kernel up to its ``MAX_ROWS`` rows, cuBLAS above). For l3 also with the SGLU gate: ``sglu_gate`` then
``addmm_`` (two kernels) against ``residual_gemv(..., gate=act)`` (one). ``--sweep`` adds the Triton kernel at
each tile configuration in ``SWEEP`` (the data behind ``tnllm.ops.gemv.triton.default_config``).

On CUDA each call is captured ``--calls`` times in one CUDA graph and replayed (microseconds per call =
elapsed / (replays * calls)); GB/s is the weight's bytes over that time. On CPU: wall-clock means (a smoke test).

    python bench/gemv.py --device cuda --preset 385M --batch 1 64 --out $OUT       # H200, ~15 s
    python bench/gemv.py --device cpu --preset tiny --batch 1 --calls 2 --replays 2 --out /tmp/g

Writes ``gemv.json`` under ``--out`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from benchutil import GraphTimer  # bench/ is on sys.path: the scripts run from it
from tnllm import TransNormerConfig
from tnllm.ops.gemv import residual_gemv
from tnllm.ops.sglu import sglu_gate, sglu_gate_naive

WAYS = ("addmm_", "linear+add_", "linear", "residual_gemv")
GATE_WAYS = ("sglu_gate+addmm_", "residual_gemv(gate)")
SWEEP = [(bn, bk, nw) for bn in (4, 8, 16) for bk in (128, 256, 512) for nw in (2, 4)]


def shapes(cfg) -> dict[str, tuple[int, int, bool]]:
    """name: (in features K, out features N, residual?) of each GEMM of one layer and the head."""
    d, g = cfg.decoder_embed_dim, cfg.glu_dim
    return {"qkvu": (d, 4 * d, False), "out": (d, d, True), "l12": (d, 2 * g, False), "l3": (g, d, True),
            "head": (d, cfg.vocab_size, False)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="385M")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="also the Triton kernel at each tile config (CUDA)")
    ap.add_argument("--out", default="bench/results/gemv")
    a = ap.parse_args(argv)
    if min(a.batch) < 1 or a.calls < 1 or a.replays < 1:
        ap.error("--batch, --calls and --replays must be >= 1")
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    cuda = dev.type == "cuda"
    cfg = TransNormerConfig.from_preset(a.preset)
    timer = GraphTimer(dev, a.calls, a.replays, warmup=3)
    rows = []
    for name, (K, N, residual) in shapes(cfg).items():
        w = torch.randn(N, K, device=dev, dtype=dtype) * K ** -0.5
        for B in a.batch:
            y = torch.randn(B, K, device=dev, dtype=dtype)
            x = torch.zeros(B, N, device=dev, dtype=dtype)
            l12 = torch.randn(B, 2 * K, device=dev, dtype=dtype)
            fns = {"addmm_": lambda: x.addmm_(y, w.t()), "linear+add_": lambda: x.add_(F.linear(y, w)),
                   "linear": lambda: F.linear(y, w), "residual_gemv": lambda: residual_gemv(x, y, w),
                   "sglu_gate+addmm_": lambda: x.addmm_(sglu_gate(l12, x, "none"), w.t()),
                   "residual_gemv(gate)": lambda: residual_gemv(x, l12, w, "none")}
            ways = list(WAYS if residual else ("linear",)) + list(GATE_WAYS if name == "l3" else ())
            if a.sweep and residual and cuda:
                from tnllm.ops.gemv import triton as gtri
                for bn, bk, nw in SWEEP:
                    cfg = gtri.GemvConfig(BN=bn, BK=bk, num_warps=nw)
                    way = f"triton BN{bn} BK{bk} w{nw}"
                    fns[way] = (lambda c: lambda: gtri.residual_gemv_triton(x, y, w, None, cfg=c))(cfg)
                    ways.append(way)
            for way in ways:
                x.normal_()
                x0 = x.clone()
                gated = way in GATE_WAYS
                yin = sglu_gate_naive(l12.double(), x0.double(), "none") if gated else y.double()
                want = yin @ w.double().t() + (0 if way == "linear" else x0.double())
                out = fns[way]()
                got = x if way in ("addmm_", "linear+add_", "sglu_gate+addmm_") else out
                err = float((got.double() - want).norm() / want.norm())
                us = timer(fns[way]) * 1e6
                rows.append({"gemm": name, "K": K, "N": N, "batch": B, "way": way, "us": round(us, 2),
                             "gbs": round(w.numel() * w.element_size() / (us * 1e3), 1), "rel_err": float(f"{err:.3g}")})
    os.makedirs(a.out, exist_ok=True)
    meta = {"preset": a.preset, "dtype": a.dtype, "device": str(dev), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(dev) if cuda else None}
    with open(os.path.join(a.out, "gemv.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"# GEMMs of one {a.preset} layer and the head, {a.dtype}, {meta['gpu'] or dev}")
    print("| gemm | K x N | batch | way | us | weight GB/s | rel err |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['gemm']} | {r['K']} x {r['N']} | {r['batch']} | {r['way']} | {r['us']} | {r['gbs']} | {r['rel_err']} |",
              flush=True)


if __name__ == "__main__":
    main()
