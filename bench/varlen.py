"""GPU benchmark of packed variable-length sequences: ``lightning_attn_varlen`` against the padded batch.

    python bench/varlen.py --out runs/varlen                       # 64 sequences, lengths uniform in 256..8192
    python bench/varlen.py --n-seqs 64 --min-len 256 --max-len 8192 --H 16 --D 128 --dtype bf16 --out runs/varlen
    python bench/varlen.py --device cpu --out runs/varlen_cpu      # the same code at a tiny size (smoke test)

N sequences with lengths drawn uniformly from [min-len, max-len] (seeded), H heads, Dk = Dv = D. Each
implementation computes the same outputs (and, for forward+backward, the gradients of q, k, v for a
random cotangent):

* ``varlen``: one ``lightning_attn_varlen`` call on the N sequences packed end to end ([1, H, total, D],
  int32 ``cu_seqlens`` on the device);
* ``padded``: one ``lightning_attn`` call on the padded batch [N, H, max length, D] (right padding, so the
  valid outputs are exact; the pads' outputs are thrown away);
* ``loop``: one ``lightning_attn`` call per sequence (what a caller without varlen support does).

Per implementation: forward ms and forward+backward ms (medians of triton.testing.do_bench), extra peak
memory during forward+backward (GiB over the inputs), and throughput in valid tokens per second. The
varlen and loop outputs are checked against the padded batch's valid rows. Results go to
<out>/varlen.json (one record per line) and a markdown table on stdout and in <out>/varlen.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

import benchutil  # bench/ is on sys.path: the scripts run from it
from benchutil import bench, decay_rates, log
from benchutil import empty_cache as _empty_cache


DEV = "cuda"


def draw_lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (n,), generator=g).tolist()


def make_inputs(lengths, H, D, dtype, seed):
    """Packed q, k, v, do [1, H, total, D] and cu_seqlens int32 [N + 1], on the device."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    total = sum(lengths)
    mk = lambda: torch.randn(1, H, total, D, device=DEV, dtype=dtype, generator=g)  # noqa: E731
    q, k, v, do = mk() / D ** 0.5, mk() / D ** 0.5, mk(), mk()
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=DEV, dtype=torch.int32)
    return q, k, v, do, cu


def pad(x, lengths, L):
    """Packed [1, H, total, D] -> [N, H, L, D], each sequence at the start of its row, zeros after it."""
    out = x.new_zeros(len(lengths), x.shape[1], L, x.shape[3])
    a = 0
    for i, n in enumerate(lengths):
        out[i, :, :n] = x[0, :, a:a + n]
        a += n
    return out


def unpad(y, lengths):
    return torch.cat([y[i:i + 1, :, :n] for i, n in enumerate(lengths)], dim=2)


def make_impl(name, lengths, H, s, cu):
    """(fn(q, k, v) -> o, inputs layout "packed" or "padded") of one implementation."""
    from tnllm.ops import lightning_attn, lightning_attn_varlen
    if name == "varlen":
        return (lambda q, k, v: lightning_attn_varlen(q, k, v, s, cu, check_decay=False)), "packed"
    if name == "padded":
        return (lambda q, k, v: lightning_attn(q, k, v, s, check_decay=False)), "padded"
    if name == "loop":
        bounds = cu.tolist()

        def loop(q, k, v):
            return torch.cat([lightning_attn(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], s, check_decay=False)
                              for a, b in zip(bounds[:-1], bounds[1:])], dim=2)
        return loop, "packed"
    raise ValueError(f"unknown implementation {name!r} (varlen, padded, loop)")


def run_one(name, lengths, H, D, dtype, seed, ref=None):
    s = decay_rates(H)
    q, k, v, do, cu = make_inputs(lengths, H, D, dtype, seed)
    fn, layout = make_impl(name, lengths, H, s, cu)
    L = max(lengths)
    if layout == "padded":
        q, k, v, do = (pad(x, lengths, L) for x in (q, k, v, do))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    t0 = time.time()
    for _ in range(2):                         # compiles the kernels before timing
        fn(q, k, v).backward(do)
    if DEV == "cuda":
        torch.cuda.synchronize()
    warm_s = time.time() - t0
    with torch.no_grad():
        fwd = bench(lambda: fn(q, k, v), cpu_warmup=2, cpu_reps=3)

    def step():
        fn(q, k, v).backward(do)
    fb = bench(step, grad_to_none=[q, k, v], cpu_warmup=2, cpu_reps=3)
    for x in (q, k, v):
        x.grad = None
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    else:
        step()
        peak = float("nan")                    # no allocator statistics off CUDA
    o = fn(q, k, v).detach()
    grads = [x.grad.detach() for x in (q, k, v)]
    if layout == "padded":
        o, grads = unpad(o, lengths), [unpad(g_, lengths) for g_ in grads]
    out = dict(o=o.float(), dq=grads[0].float(), dk=grads[1].float(), dv=grads[2].float())
    check = {}
    if ref is not None:
        check = {n: float((out[n] - ref[n]).norm() / ref[n].norm().clamp(min=1e-30)) for n in out}
    total = sum(lengths)
    rec = dict(impl=name, N=len(lengths), H=H, D=D, dtype=str(dtype).split(".")[-1], total_tokens=total,
               padded_tokens=len(lengths) * L, min_len=min(lengths), max_len=L, fwd_ms=fwd, fwdbwd_ms=fb,
               fwd_tok_per_s=total / (fwd * 1e-3), fwdbwd_tok_per_s=total / (fb * 1e-3), extra_peak_gib=peak,
               warmup_s=warm_s, check_rel_err_vs_padded=check)
    del q, k, v, do, fn
    _empty_cache()
    return rec, out


def table(recs) -> str:
    rows = ["| impl | N | H | D | tokens (valid / padded) | fwd ms | fwd+bwd ms | fwd+bwd Mtok/s | extra peak GiB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        if "error" in r:
            rows.append(f"| {r['impl']} | error: {r['error']} |||||||| ")
            continue
        rows.append(f"| {r['impl']} | {r['N']} | {r['H']} | {r['D']} | {r['total_tokens']} / {r['padded_tokens']} | "
                    f"{r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | {r['fwdbwd_tok_per_s'] / 1e6:.2f} | "
                    f"{r['extra_peak_gib']:.2f} |")
    by = {r["impl"]: r for r in recs if "error" not in r}
    if "varlen" in by and "padded" in by:
        rows.append("")
        rows.append(f"padded / varlen: fwd {by['padded']['fwd_ms'] / by['varlen']['fwd_ms']:.2f}x, fwd+bwd "
                    f"{by['padded']['fwdbwd_ms'] / by['varlen']['fwdbwd_ms']:.2f}x (padding ratio "
                    f"{by['varlen']['padded_tokens'] / by['varlen']['total_tokens']:.2f})")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/varlen")
    ap.add_argument("--n-seqs", type=int, default=None, help="number of sequences (64; 4 with --device cpu)")
    ap.add_argument("--min-len", type=int, default=None, help="shortest length (256; 16 with --device cpu)")
    ap.add_argument("--max-len", type=int, default=None, help="longest length (8192; 100 with --device cpu)")
    ap.add_argument("--H", type=int, default=None, help="heads (16; 2 with --device cpu)")
    ap.add_argument("--D", type=int, default=None, help="head width Dk = Dv (128; 16 with --device cpu)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--impls", default="padded,varlen,loop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    a = ap.parse_args(argv)
    global DEV
    DEV = benchutil.DEV = a.device
    cpu = DEV == "cpu"
    N = a.n_seqs or (4 if cpu else 64)
    lo, hi = a.min_len or (16 if cpu else 256), a.max_len or (100 if cpu else 8192)
    H, D = a.H or (2 if cpu else 16), a.D or (16 if cpu else 128)
    if not (N >= 1 and 1 <= lo <= hi):
        ap.error(f"need --n-seqs >= 1 and 1 <= --min-len <= --max-len, got {N}, {lo}, {hi}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    if cpu and dtype != torch.float32:
        dtype = torch.float32                  # the CPU blocked form's fast dtype; the smoke test only runs the code
    lengths = draw_lengths(N, lo, hi, a.seed)
    os.makedirs(a.out, exist_ok=True)
    dev = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    log(f"device {dev}; torch {torch.__version__}; {N} sequences of {min(lengths)}..{max(lengths)} tokens "
        f"(total {sum(lengths)}, padded {N * max(lengths)}), H {H}, D {D}, {a.dtype}")
    impls = [x for x in a.impls.split(",") if x]
    if "padded" in impls:                      # the reference of the checks comes first
        impls = ["padded"] + [x for x in impls if x != "padded"]
    path = os.path.join(a.out, "varlen.json")
    recs, ref = [], None
    with open(path, "w") as f:
        f.write(json.dumps(dict(meta=True, device=dev, torch=torch.__version__, argv=sys.argv, lengths=lengths)) + "\n")
        for name in impls:
            try:
                rec, out = run_one(name, lengths, H, D, dtype, a.seed, ref)
                if name == "padded":
                    ref = out
            except Exception as e:
                rec = dict(impl=name, error=f"{type(e).__name__}: {str(e)[:300]}")
                traceback.print_exc(limit=1)
                _empty_cache()
            log(json.dumps(rec))
            f.write(json.dumps(rec) + "\n")
            f.flush()
            recs.append(rec)
    md = table(recs)
    with open(os.path.join(a.out, "varlen.md"), "w") as f:
        f.write(md + "\n")
    log(md)


if __name__ == "__main__":
    main()
