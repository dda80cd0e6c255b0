"""Where the host's time goes in one eager Lightning Attention call on CUDA, layer by layer of the op stack.

    python bench/op_host.py --out runs/op_host                 # B2 H8 T8192 D128 bf16 (the 385M training shape)
    python bench/op_host.py --shape 8,16,8192,64 --out runs/op_host

Each row is the host's microseconds per call of one layer, measured as the wall time of ``--calls`` calls back to
back at a shape so small that the GPU finishes each call before the host issues the next (B1 H1 T64 with the
shape's D), so the wall time is the host's:

* ``launcher fwd`` / ``launcher bwd``: the Triton launchers called directly (tile choice, allocations, launches);
* ``op fwd (no grad)`` / ``op bwd``: the same through the torch.library custom ops (the dispatcher);
* ``op fwd+bwd``: ``torch.ops.tnllm.lightning_attn_fwd(...)[0].backward(do)``, the op with its registered autograd;
* ``public fwd+bwd``: ``tnllm.ops.lightning_attn(q, k, v, s).backward(do)``, as a user calls it (in plain eager
  mode an autograd.Function over the same launchers, no dispatcher);

each also with Triton's own launch for every kernel (``ops/_launch.py`` ``FAST_LAUNCH`` off). Then the public call
and the op at the real shape (host time without a sync, as bench/attention.py's host column), and a cProfile of
``--profile-calls`` tiny public fwd+bwd calls (the top functions by own time).
Writes op_host.json and op_host_profile.txt under --out.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time

import torch


def _host_us(fn, calls: int, rounds: int = 5) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best.append((time.perf_counter() - t) / calls * 1e6)
    return sorted(best)[len(best) // 2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="2,8,8192,128", help="B,H,T,D (Dk = Dv = D)")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--profile-calls", type=int, default=200)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    try:
        B, H, T, D = (int(x) for x in a.shape.split(","))
    except ValueError:
        ap.error(f"--shape: expected B,H,T,D (four integers), got {a.shape!r}")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device (the host's cost of the Triton path); bench/launch_host.py runs anywhere")
    import tnllm.ops  # noqa: F401
    from tnllm.ops.lightning_attn import triton as tri
    os.makedirs(a.out, exist_ok=True)
    dev, dt = "cuda", torch.bfloat16

    def inputs(B, H, T):
        mk = lambda: (torch.randn(B, T, H, D, device=dev, dtype=dt) / D ** 0.5).transpose(1, 2)
        q, k, v, do = mk(), mk(), mk(), mk().contiguous()
        s = torch.linspace(0.1, 1.0, H, device=dev)
        return q, k, v, do, s

    q, k, v, do, s = inputs(1, 1, 64)
    from tnllm.ops import _launch, lightning_attn
    fwd_op, bwd_op = torch.ops.tnllm.lightning_attn_fwd, torch.ops.tnllm.lightning_attn_bwd
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

    def op_step(q=qg, k=kg, v=vg, do=do, s=s):          # the custom op (the dispatcher, its autograd wrapper)
        fwd_op(q, k, v, s, None, 64)[0].backward(do)
        q.grad = k.grad = v.grad = None

    def step(q=qg, k=kg, v=vg, do=do, s=s):             # the public call (in eager mode: the fast path)
        lightning_attn(q, k, v, s).backward(do)
        q.grad = k.grad = v.grad = None

    def op_fwd_nograd():
        with torch.no_grad():
            fwd_op(q, k, v, s, None, 64)

    def both(label, fn):          # with and without the cached launches (ops/_launch.py FAST_LAUNCH)
        rows[label] = _host_us(fn, a.calls)
        _launch.FAST_LAUNCH = False
        try:
            rows[label + ", Triton's launch"] = _host_us(fn, a.calls)
        finally:
            _launch.FAST_LAUNCH = True
    rows = {}
    both("launcher fwd", lambda: tri.lightning_attn_fwd_triton(q, k, v, s, None))
    both("launcher bwd", lambda: tri.lightning_attn_bwd_triton(do, None, q, k, v, s, None))
    both("op fwd (no grad)", op_fwd_nograd)
    both("op bwd", lambda: bwd_op(do, None, q, k, v, s, None, 64))
    both("op fwd+bwd", op_step)
    both("public fwd+bwd", step)
    rows["torch.empty x4"] = _host_us(lambda: [torch.empty(1, 1, 64, D, device=dev, dtype=dt) for _ in range(4)],
                                      a.calls)
    Q, K, V, DO, S = inputs(B, H, T)
    Qg, Kg, Vg = (x.detach().requires_grad_() for x in (Q, K, V))
    for label, fn in (("public", lambda: step(Qg, Kg, Vg, DO, S)), ("op", lambda: op_step(Qg, Kg, Vg, DO, S))):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            fn()
        rows[f"{label} fwd+bwd B{B} H{H} T{T} D{D}, no sync"] = (time.perf_counter() - t) / 10 * 1e6
        torch.cuda.synchronize()
    for name, us in rows.items():
        print(f"{name:40s} {us:9.1f} us", flush=True)
    with open(os.path.join(a.out, "op_host.json"), "w") as f:
        json.dump(dict(shape=[B, H, T, D], host_us=rows, torch=torch.__version__), f, indent=1)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(a.profile_calls):
        step()
    torch.cuda.synchronize()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(30)
    buf2 = io.StringIO()
    pstats.Stats(pr, stream=buf2).sort_stats("cumulative").print_stats(40)
    text = buf.getvalue() + "\n" + buf2.getvalue()
    with open(os.path.join(a.out, "op_host_profile.txt"), "w") as f:
        f.write(text)
    print(text[:6000])


if __name__ == "__main__":
    main()
