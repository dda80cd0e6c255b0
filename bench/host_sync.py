"""Cost of the decay-rate check of ``tnllm.ops.lightning_attn``: the default call against ``check_decay=False``.

    python bench/host_sync.py --out runs/host_sync            # H200: bf16, the shapes below
    python bench/host_sync.py --device cpu --out /tmp/hs      # the same code at a tiny shape (smoke test)

The default call validates ``s`` once per tensor (the verdict is memoised on the tensor and its
version counter), so a fixed rate tensor costs no host read after the first call. Columns, same
inputs, interleaved rounds: ``default`` (check_decay=True, the same s every call), ``check off``
(check_decay=False), and ``fresh s`` (check_decay=True with a new s tensor every call: the host
read the memo saves). Times: CUDA events around ``--iters`` back-to-back calls after warm-up,
the median over ``--rounds`` rounds, per call. Prints a table; writes host_sync.json under --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

CASES = [   # name, (B, H, T, Dk, Dv), with backward
    ("B8 H8 T8192 Dk256 Dv128 fwd", (8, 8, 8192, 256, 128), False),
    ("B8 H8 T8192 Dk256 Dv128 fwd+bwd", (8, 8, 8192, 256, 128), True),
    ("B2 H16 T32768 D128 fwd", (2, 16, 32768, 128, 128), False),
]
TINY = [("B1 H2 T64 Dk16 Dv8 fwd", (1, 2, 64, 16, 8), False), ("B1 H2 T64 Dk16 Dv8 fwd+bwd", (1, 2, 64, 16, 8), True)]


def timer(dev: torch.device):
    if dev.type == "cuda":
        def run(fn, iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(iters):
                fn()
            b.record()
            torch.cuda.synchronize(dev)
            return a.elapsed_time(b) / iters
    else:
        def run(fn, iters):
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            return (time.perf_counter() - t) * 1e3 / iters
    return run


def measure(shape, bwd: bool, dev, dtype, iters: int, rounds: int, warmup: int) -> dict:
    from tnllm.ops import lightning_attn
    B, H, T, Dk, Dv = shape
    g = torch.Generator(device=dev).manual_seed(0)
    q = (torch.randn(B, H, T, Dk, device=dev, dtype=dtype, generator=g) / math.sqrt(Dk)).requires_grad_(bwd)
    k = (torch.randn(B, H, T, Dk, device=dev, dtype=dtype, generator=g) / math.sqrt(Dk)).requires_grad_(bwd)
    v = torch.randn(B, H, T, Dv, device=dev, dtype=dtype, generator=g).requires_grad_(bwd)
    do = torch.randn(B, H, T, Dv, device=dev, dtype=dtype, generator=g)
    s = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], device=dev)
    fresh = [s.clone() for _ in range(iters)]
    it = {"i": 0}

    def call(check: bool, new_s: bool):
        rate = s
        if new_s:
            rate = fresh[it["i"] % iters]
            it["i"] += 1
            rate = rate.clone()                  # a tensor the memo has never seen
        o = lightning_attn(q, k, v, rate, check_decay=check)
        if bwd:
            torch.autograd.grad(o, (q, k, v), do)
    settings = {"default": (True, False), "check off": (False, False), "fresh s": (True, True)}
    run = timer(dev)
    grad = torch.enable_grad() if bwd else torch.no_grad()
    with grad:
        for name, (c, n) in settings.items():
            run(lambda: call(c, n), warmup)
        ms = {name: [] for name in settings}
        for _ in range(rounds):                     # interleaved: drift hits every setting alike
            for name, (c, n) in settings.items():
                ms[name].append(run(lambda: call(c, n), iters))
    return {name: sorted(v)[len(v) // 2] for name, v in ms.items()} | {"all_ms": ms}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default="runs/host_sync")
    ap.add_argument("--iters", type=int, default=None, help="calls per timed round (default 20 on cuda, 2 on cpu)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per setting (default 7 on cuda, 2 on cpu)")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device (use --device cpu for the tiny smoke run)")
    cuda = dev.type == "cuda"
    iters = a.iters or (20 if cuda else 2)
    rounds = a.rounds or (7 if cuda else 2)
    dtype = torch.bfloat16
    cases = CASES if cuda else TINY
    name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    res = {"meta": {"device": name, "torch": torch.__version__, "dtype": "bf16", "iters": iters, "rounds": rounds},
           "rows": []}
    print(f"lightning_attn decay check on {name}, bf16, torch {torch.__version__}; median of {rounds} rounds x {iters} calls")
    print(f"| case | default ms | check_decay=False ms | default / off | fresh s every call ms |")
    print("|---|---|---|---|---|")
    for label, shape, bwd in cases:
        r = measure(shape, bwd, dev, dtype, iters, rounds, warmup=3 if cuda else 1)
        row = {"case": label, "shape": shape, "backward": bwd, "default_ms": r["default"], "off_ms": r["check off"],
               "fresh_s_ms": r["fresh s"], "ratio": r["default"] / r["check off"], "rounds_ms": r["all_ms"]}
        res["rows"].append(row)
        print(f"| {label} | {row['default_ms']:.3f} | {row['off_ms']:.3f} | {row['ratio']:.3f} | {row['fresh_s_ms']:.3f} |",
              flush=True)
        if cuda:
            torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "host_sync.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
