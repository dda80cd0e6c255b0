"""GPU benchmark of causal decayed linear attention: tnllm (Triton) against its peers, side by side.

    python bench/attention.py --out runs/attn [--shapes main,d64,lrpe,t2k,t32k] [--peers naive,sdpa_cudnn,...]
    python bench/attention.py --sweep --out runs/sweep       # tile/launch configs of the tnllm sweeps
    python bench/attention.py --plot runs/attn/attention.json --png docs/attention.png   # CPU: the plot
    python bench/attention.py --device cpu --out runs/attn_cpu    # the same code at a tiny shape (smoke test)

Per implementation and shape: forward ms, forward+backward ms (medians of triton.testing.do_bench),
extra peak memory (peak during fwd+bwd over the inputs' allocation, GiB) and achieved bandwidth:
the memory floor's bytes (read q, k, v (, do), write o (, dq, dk, dv) once) over the time, against a
device-to-device copy measured in the same run; and the host's time to issue one forward + backward
(``host_fwdbwd_ms``: ten calls back to back without a sync, per call): where it is not clearly below the timed
forward + backward, the eager timing is the host's, not the kernels'. ``tnllm_graph`` times the same op replayed
from CUDA graphs (its kernels alone), and ``<variant>_graph`` any tnllm variant so (e.g. tnllm_noprefix_graph).
Peers: PyTorch NormAttention (masked quadratic, the paper's baseline), SDPA softmax attention (cuDNN and flash backends; Dk == Dv only), fla
``chunk_simple_gla`` (g_gamma = -s, scale = 1, layout [B, T, H, D]), OpenNLPLab ``lightning_attn2``.
Results go to <out>/attention.json (one record per line, written as they come) and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch

import benchutil  # bench/ is on sys.path: the scripts run from it
from benchutil import bench, decay_rates, log
from benchutil import empty_cache as _empty_cache
from benchutil import sync as _sync

SHAPES = {   # name: (B, H, T, Dk, Dv)
    "main": (8, 16, 8192, 128, 128),
    "d64": (8, 16, 8192, 64, 64),
    "lrpe": (8, 8, 8192, 256, 128),
    "t2k": (32, 16, 2048, 128, 128),
    "t32k": (2, 16, 32768, 128, 128),
    "train": (2, 8, 8192, 128, 128),  # one layer of the 385M preset's training step at T 8192, B 2
    "tiny": (1, 2, 100, 16, 8),       # --device cpu
}

DEV = "cuda"                          # --device
PEERS = ["naive", "sdpa_cudnn", "sdpa_flash", "fla_chunk", "lightning_attn2"]


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 2 GiB device-to-device copy."""
    x = torch.empty(2 ** 30 if DEV == "cuda" else 2 ** 22, dtype=torch.float16, device=DEV).normal_()
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    nbytes = 2 * x.numel() * x.element_size()
    del x, y
    return nbytes / (ms * 1e-3)


def make_impl(name: str, B, H, T, Dk, Dv, dtype):
    """(fn(q, k, v) -> o, layout) for one implementation; layout "bhtd", "bthd" or "model" (q, k, v [B, H, T, D]
    views of one token-major [B, T, H * (2 Dk + Dv)] buffer, as the model's token mixer passes its projection)."""
    s = decay_rates(H)
    if name in ("tnllm_tm", "tnllm_tm_graph"):
        # the public call on the model's layout (the training step's inputs); _graph: replayed from CUDA graphs
        from tnllm.ops import lightning_attn
        return (lambda q, k, v: lightning_attn(q, k, v, s)), "model"
    # the custom op itself (autograd registered on it); tnllm_graph: the same op, which run_one replays from CUDA
    # graphs (its GPU time without the host)
    if name.startswith("tnllm_") and name.endswith("_graph") and name != "tnllm_graph":
        return make_impl(name[:-len("_graph")], B, H, T, Dk, Dv, dtype)   # a variant, replayed from graphs by run_one
    if name in ("tnllm", "tnllm_graph"):
        import tnllm.ops  # noqa: F401
        return (lambda q, k, v: torch.ops.tnllm.lightning_attn_fwd(q, k, v, s, None, 64)[0]), "bhtd"
    if name.startswith("tnllm_"):
        # the public call (input checks, the decay check memoised, the eager fast path), for a variant with the
        # Triton module's settings changed first (restored by main after the variant's record)
        from tnllm.ops import lightning_attn
        if name != "tnllm_api":
            _set_variant(name)
        return (lambda q, k, v: lightning_attn(q, k, v, s)), "bhtd"
    if name == "naive":
        idx = torch.arange(T, device=DEV, dtype=torch.float32)
        diff = idx[:, None] - idx[None, :]
        M = (torch.exp(-s[:, None, None] * diff.clamp(min=0)) * (diff >= 0)).to(dtype)     # [H, T, T], cached

        def naive(q, k, v):
            return ((q @ k.transpose(-1, -2)) * M) @ v
        return naive, "bhtd"
    if name.startswith("sdpa"):
        if Dk != Dv:
            raise NotImplementedError("SDPA needs Dk == Dv")
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = SDPBackend.CUDNN_ATTENTION if name == "sdpa_cudnn" else SDPBackend.FLASH_ATTENTION

        def sdpa(q, k, v):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return sdpa, "bhtd"
    if name == "fla_chunk":
        from fla.ops.simple_gla import chunk_simple_gla
        g = -s

        def fla(q, k, v):
            return chunk_simple_gla(q, k, v, g_gamma=g, scale=1.0)[0]
        return fla, "bthd"
    if name == "lightning_attn2":
        from lightning_attn.ops import lightning_attn_func
        return (lambda q, k, v: lightning_attn_func(q, k, v, s)), "bhtd"
    raise ValueError(name)


def _set_variant(name: str) -> None:
    """Set the settings of ops/lightning_attn/triton.py that the variant ``name`` times, each read at every launch."""
    from tnllm.ops.lightning_attn import triton as tri
    if name.startswith("tnllm_nf"):          # the sweep's non-finite masking mode NF forced
        tri.NONFINITE_MODE = int(name[len("tnllm_nf"):])
    elif name == "tnllm_autosplit":          # the automatic sequence split forced on (AUTO_SPLIT)
        tri.AUTO_SPLIT = True
    elif name == "tnllm_separate":           # the backward's dk and dv as two sweeps (FUSED_DKDV off)
        tri.FUSED_DKDV = False
    elif name.startswith("tnllm_chunk"):     # the sweeps' default chunk of N rows (CHUNK_ROWS)
        tri.CHUNK_ROWS = int(name[len("tnllm_chunk"):])
    elif name.startswith("tnllm_wideda"):    # WIDE_DA_CONFIG (16-bit sweeps of more than 128 state rows, i.e. Dk 256
        # in the forward and the dv sweep) = BC x CHUNK, warps
        tri.WIDE_DA_CONFIG = tri.SweepConfig.from_spec(name[len("tnllm_wideda"):])
    elif name.startswith("tnllm_cfg"):       # WIDE_CONFIG (16-bit sweeps wider than 64) = BC x CHUNK, warps
        spec = name[len("tnllm_cfg"):]
        tri.WIDE_CONFIG = None if spec == "none" else tri.SweepConfig.from_spec(spec)
    elif name.startswith(("tnllm_prepass", "tnllm_prefix", "tnllm_noprefix")):
        # the split pre-pass's state tile N columns wide (tnllm_prepass<N>; 0: the sweep's own tile), its local
        # states folded into prefixes or not (tnllm_prefix / tnllm_noprefix: PREFIX_SCAN), or both
        # (tnllm_prepass<N>prefix, tnllm_prepass<N>noprefix)
        rest = name[len("tnllm_"):]
        for flag, value in (("noprefix", False), ("prefix", True)):
            if rest.endswith(flag):
                tri.PREFIX_SCAN, rest = value, rest[:-len(flag)]
                break
        if rest.startswith("prepass"):
            tri.PREPASS_BC = int(rest[len("prepass"):]) or None
        elif rest:
            raise ValueError(f"unknown implementation {name!r}")
    elif name == "tnllm_kdecb":              # the sweep before 2026-12-07: the decay on Bm, the scores masked by
        tri.KDEC_ON_C, tri.UNMASKED_WHERE, tri.EVEN_TILES = False, True, False     # a where, masks at every length
    elif name == "tnllm_noeven":             # the masked loop at every length (EVEN_TILES False)
        tri.EVEN_TILES = False
    elif name == "tnllm_alleven":            # the loop without masks wherever it applies (EVEN_TILES True)
        tri.EVEN_TILES = True
    elif name == "tnllm_statet":             # the unmasked loop on the transposed state (STATE_T)
        tri.STATE_T = True
    elif name == "tnllm_diag":               # decayed state-update operands as products with diag(kdec) (DIAG_DECAY)
        tri.DIAG_DECAY = True
    elif name == "tnllm_stdiag":             # both
        tri.STATE_T = tri.DIAG_DECAY = True
    elif name == "tnllm_wide1":              # Dk or Dv over 128 in one launch per sweep (WIDE_ONE_LAUNCH)
        tri.WIDE_ONE_LAUNCH = True
    elif name == "tnllm_wide1stdiag":        # that, STATE_T and DIAG_DECAY
        tri.WIDE_ONE_LAUNCH = tri.STATE_T = tri.DIAG_DECAY = True
    elif name.startswith("tnllm_split"):     # every sweep cut into N sequence splits (not auto_split's)
        import dataclasses
        n, base, base_dkdv = int(name[len("tnllm_split"):]), tri.default_config, tri.default_dkdv_config
        tri.default_config = lambda *a: dataclasses.replace(base(*a), n_split=n)
        tri.default_dkdv_config = lambda *a: dataclasses.replace(base_dkdv(*a), n_split=n)
    else:
        raise ValueError(f"unknown implementation {name!r}")


def triton_settings(tri) -> dict:
    """The Triton module's run-time settings as they are now: its upper-case module attributes (read at each
    launch) and the two config functions the split variants wrap. ``main`` restores them after every row."""
    out = {k: v for k, v in vars(tri).items() if k.isupper() and not k.startswith("_")}
    out.update(default_config=tri.default_config, default_dkdv_config=tri.default_dkdv_config)
    return out


def floor_bytes(B, H, T, Dk, Dv, dtype, bwd: bool) -> int:
    el = torch.tensor([], dtype=dtype).element_size()
    per = (2 * Dk + 2 * Dv) + ((4 * Dk + 3 * Dv) if bwd else 0)     # fwd: q,k,v,o; bwd: q,k,v,do,dq,dk,dv
    return B * H * T * per * el


def run_one(name, shape_name, dtype, copy_bw, warmup_calls=2):
    B, H, T, Dk, Dv = SHAPES[shape_name]
    fn, layout = make_impl(name, B, H, T, Dk, Dv, dtype)
    mk = (lambda D: torch.randn(B, H, T, D, device=DEV, dtype=dtype)) if layout != "bthd" else \
        (lambda D: torch.randn(B, T, H, D, device=DEV, dtype=dtype))
    if layout == "model":
        buf = torch.randn(B, T, H * (2 * Dk + Dv), device=DEV, dtype=dtype)
        buf[..., :2 * H * Dk] /= math.sqrt(Dk)
        heads = lambda lo, D: buf[..., lo:lo + H * D].view(B, T, H, D).transpose(1, 2).detach()
        q, k, v = heads(0, Dk), heads(H * Dk, Dk), heads(2 * H * Dk, Dv)
    else:
        q, k, v = mk(Dk) / math.sqrt(Dk), mk(Dk) / math.sqrt(Dk), mk(Dv)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    do = mk(Dv)
    t0 = time.time()
    for _ in range(warmup_calls):          # compiles / autotunes the peers before timing
        fn(q, k, v).backward(do)
    _sync()
    warm_s = time.time() - t0

    def step():
        fn(q, k, v).backward(do)
    # the host's time to issue one forward + backward (calls back to back, no sync between them): where it is
    # not below fwdbwd_ms, the eager timing measures the host, not the kernels
    for x in (q, k, v):
        x.grad = None
    t0 = time.perf_counter()
    for _ in range(10):
        step()
    host_ms = (time.perf_counter() - t0) / 10 * 1e3
    _sync()
    if name.startswith("tnllm") and name.endswith("_graph") and DEV == "cuda":
        fwd, fb = _graph_times(fn, q, k, v, do)
    else:
        with torch.no_grad():
            fwd = bench(lambda: fn(q, k, v))
        fb = bench(step, grad_to_none=[q, k, v])
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
        peak = float("nan")           # no allocator statistics off CUDA
    check = {}
    # vs the blocked form in fp32, same inputs
    if name.startswith("tnllm"):     # the op, the public call and their variants (make_impl)
        from tnllm.ops.lightning_attn.blocked import blocked_bwd, blocked_fwd
        o = fn(q, k, v)
        dq, dk, dv = torch.autograd.grad(o, [q, k, v], do)
        f = lambda x: x.detach().float()
        s32 = decay_rates(H)
        o_r, _ = blocked_fwd(f(q), f(k), f(v), s32, None, 64)
        g_r = blocked_bwd(f(do), None, f(q), f(k), f(v), s32, None, 64)
        rel = lambda a, b: float((a.float() - b).norm() / b.norm())
        check = dict(o=rel(o, o_r), dq=rel(dq, g_r[0]), dk=rel(dk, g_r[1]), dv=rel(dv, g_r[2]))
        del o, dq, dk, dv, o_r, g_r
        _empty_cache()
    rec = dict(impl=name, shape=shape_name, check_rel_err=check, B=B, H=H, T=T, Dk=Dk, Dv=Dv, dtype=str(dtype).split(".")[-1],
               fwd_ms=fwd, fwdbwd_ms=fb, host_fwdbwd_ms=host_ms, extra_peak_gib=peak, warmup_s=warm_s,
               fwd_bw_frac=floor_bytes(B, H, T, Dk, Dv, dtype, False) / (fwd * 1e-3) / copy_bw,
               fwdbwd_bw_frac=floor_bytes(B, H, T, Dk, Dv, dtype, True) / (fb * 1e-3) / copy_bw)
    del q, k, v, do, fn
    _empty_cache()
    return rec


def _graph_times(fn, q, k, v, do) -> tuple[float, float]:
    """(forward ms, forward + backward ms) of ``fn`` replayed from CUDA graphs captured on a side stream: the GPU's
    time for the same kernels with no host launch overhead between them."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x in (q, k, v):
            x.grad = None
        fn(q, k, v).backward(do)          # warm on the side stream (allocator pools, autograd state)
        gf, gfb = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(gf, stream=side):
            fn(q, k, v)
        for x in (q, k, v):
            x.grad = None
        with torch.cuda.graph(gfb, stream=side):
            fn(q, k, v).backward(do)
    torch.cuda.current_stream().wait_stream(side)
    fwd = bench(gf.replay)
    fb = bench(gfb.replay)
    del gf, gfb
    return fwd, fb


def prune_fla_autotune(max_configs: int):
    """Keep at most ``max_configs`` configs per fla autotuner (4/8 warps, 2/3 stages first): fla's full
    search takes minutes per shape, more than this session's device time allows."""
    import triton
    n = 0
    for mod in list(sys.modules.values()):
        if mod is None or not getattr(mod, "__name__", "").startswith("fla.ops"):
            continue
        for obj in list(vars(mod).values()):
            while obj is not None and not isinstance(obj, triton.runtime.autotuner.Autotuner) and hasattr(obj, "fn"):
                obj = obj.fn          # @triton.heuristics wraps the autotuner
            if isinstance(obj, triton.runtime.autotuner.Autotuner) and len(obj.configs) > max_configs:
                pref = [c for c in obj.configs if c.num_warps in (4, 8) and c.num_stages in (2, 3)]
                rest = [c for c in obj.configs if c not in pref]
                obj.configs = (pref + rest)[:max_configs]
                n += 1
    return n


def sweep(out, dtype, shapes=()):
    """Time the four tnllm sweeps (fwd, dq, dk, dv) at the main shapes (or those named in ``shapes``)
    under several configs."""
    from tnllm.ops.lightning_attn import triton as tri
    SC = tri.SweepConfig
    plans = {   # shape: (sweeps, candidate configs (BC, CHUNK, warps, stages, n_split)); plus the default
        "main": (("fwd", "dq", "dk", "dv"), [SC(64, 64, 4, 2, 1), SC(64, 64, 4, 3, 1), SC(64, 64, 8, 2, 1), SC(64, 64, 4, 2, 2),
                                            SC(32, 64, 4, 2, 1), SC(128, 64, 8, 2, 1), SC(64, 128, 8, 2, 1), SC(64, 64, 4, 1, 1),
                                            # CHUNK 32: no register spills at D128 (sm_90, python -m tnllm.testing.compiled
                                            # resources; the CHUNK 64 default spills 96-120 bytes)
                                            SC(64, 32, 4, 2, 1), SC(64, 32, 4, 3, 1),
                                            # the whole [128, 128] state in 8 warps at CHUNK 32: no spills, no recomputed
                                            # A Bm^T per tile, one program per SM (128 programs: one wave on 132 SMs)
                                            SC(128, 32, 8, 2, 1), SC(128, 32, 8, 3, 1)]),
        "lrpe": (("fwd", "dq", "dk", "dv"), [SC(64, 64, 8, 1, 1), SC(32, 64, 8, 1, 1), SC(32, 64, 4, 2, 1), SC(64, 64, 8, 2, 1),
                                            SC(64, 32, 4, 2, 1)]),
        # 128 programs of one [64, 64] tile: half the 2 x 132 resident slots; 2 splits fill them in one wave
        "d64": (("fwd", "dk"), [SC(64, 64, 4, 2, 1), SC(32, 64, 4, 2, 1), SC(32, 64, 4, 3, 2), SC(64, 64, 4, 2, 2),
                                SC(64, 64, 4, 2, 4), SC(64, 32, 4, 2, 2)]),
        "t32k": (("fwd", "dv"), [SC(64, 64, 4, 2, 1), SC(64, 64, 4, 2, 2), SC(64, 64, 4, 2, 4), SC(64, 64, 4, 2, 8),
                                 SC(64, 32, 4, 2, 8), SC(128, 32, 8, 2, 4), SC(128, 32, 8, 2, 8)]),
        "train": (("fwd", "dk"), [SC(64, 64, 4, 2, 1), SC(64, 64, 4, 2, 2), SC(64, 64, 4, 2, 4), SC(64, 64, 4, 2, 16),
                                  SC(32, 64, 4, 2, 1), SC(32, 64, 4, 2, 2), SC(32, 64, 4, 2, 4), SC(32, 64, 4, 2, 8),
                                  SC(64, 128, 8, 2, 4), SC(64, 64, 4, 3, 4), SC(64, 32, 4, 2, 16), SC(64, 32, 4, 2, 8),
                                  SC(128, 32, 8, 2, 8), SC(128, 32, 8, 2, 16)]),
    }
    dkdv_cands = [SC(0, 64, 8, 2), SC(0, 64, 4, 2), SC(0, 32, 4, 2), SC(0, 32, 8, 2), SC(0, 64, 8, 3), SC(0, 32, 4, 3),
                  SC(0, 64, 4, 2, 2), SC(0, 32, 4, 2, 2)]
    for name in ("main", "d64", "lrpe", "t32k", "train"):   # the fused dk/dv sweep: (CHUNK, warps, stages) candidates
        plans[name] = (plans[name][0] + ("dkdv",), plans[name][1])
    if shapes:
        plans = {k: v for k, v in plans.items() if k in shapes}
    res = []
    for shape_name, (sweep_names, cands) in plans.items():
        B, H, T, Dk, Dv = SHAPES[shape_name]
        s = decay_rates(H)
        q = torch.randn(B, H, T, Dk, device="cuda", dtype=dtype) / math.sqrt(Dk)
        k = torch.randn(B, H, T, Dk, device="cuda", dtype=dtype) / math.sqrt(Dk)
        v = torch.randn(B, H, T, Dv, device="cuda", dtype=dtype)
        do = torch.randn_like(v)
        S = torch.empty(B, H, Dk, Dv, device="cuda")
        sweeps = {"fwd": (q, k, v, False, 0, S), "dq": (do, v, k, False, 0, None),
                  "dk": (v, do, q, True, -1, None), "dv": (k, q, do, True, -1, S)}
        def time_cfg(sw, cfg, fn):
            try:
                ms = bench(fn, warmup=10, rep=40)
            except Exception as e:   # out of resources etc.
                ms = float("nan")
                log("  fail", shape_name, sw, cfg, type(e).__name__, str(e)[:200])
            r = dict(shape=shape_name, sweep=sw, cfg=cfg.__dict__, ms=ms)
            res.append(r)
            log(json.dumps(r))

        for sw in sweep_names:
            if sw == "dkdv":
                dS0 = torch.empty(B, H, Dk, Dv, device="cuda")
                for cfg in dkdv_cands + [tri.default_dkdv_config(Dk, Dv)]:
                    time_cfg(sw, cfg, lambda: tri._dkdv(q, k, v, do, s, None, dS0, cfg=cfg))
                continue
            A, Bm, C, rev, e0, fin = sweeps[sw]
            for cfg in cands + [tri.default_config(A.shape[-1], C.shape[-1], dtype)]:
                if A.shape[-1] >= 256 and cfg.BC > 64:
                    continue
                time_cfg(sw, cfg, lambda: tri._sweep(A, Bm, C, s, None, reverse=rev, e0=e0, final=fin, cfg=cfg))
        del q, k, v, do
        torch.cuda.empty_cache()
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump(res, f)
    # best per (shape, sweep)
    best = {}
    for r in res:
        key = (r["shape"], r["sweep"])
        if r["ms"] == r["ms"] and (key not in best or r["ms"] < best[key]["ms"]):
            best[key] = r
    log("best:")
    for key, r in best.items():
        log(f"  {key[0]:5s} {key[1]:3s} {r['ms']:.3f} ms {r['cfg']}")


def table(records) -> str:
    lines = ["| shape | impl | fwd ms | fwd+bwd ms | host fwd+bwd ms | extra peak GiB | fwd BW % copy | fwd+bwd BW % copy |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['impl']} | – | – | – | – | {r['error'][:60]} | |")
            continue
        lines.append(f"| {r['shape']} B{r['B']} H{r['H']} T{r['T']} Dk{r['Dk']} Dv{r['Dv']} | {r['impl']} | "
                     f"{r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | {r.get('host_fwdbwd_ms', float('nan')):.3f} | "
                     f"{r['extra_peak_gib']:.2f} | "
                     f"{100 * r['fwd_bw_frac']:.0f} | {100 * r['fwdbwd_bw_frac']:.0f} |")
    return "\n".join(lines)


def plot(json_path, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [json.loads(l) for l in open(json_path) if l.strip()]
    recs = [r for r in recs if "fwd_ms" in r]
    shapes = list(dict.fromkeys(r["shape"] for r in recs))
    impls = list(dict.fromkeys(r["impl"] for r in recs))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    w = 0.8 / len(impls)
    for ax, key, title in ((axes[0], "fwd_ms", "forward"), (axes[1], "fwdbwd_ms", "forward + backward")):
        for i, im in enumerate(impls):
            xs, ys = [], []
            for j, sh in enumerate(shapes):
                r = [r for r in recs if r["shape"] == sh and r["impl"] == im]
                if r:
                    xs.append(j + (i - len(impls) / 2 + 0.5) * w)
                    ys.append(r[0][key])
            ax.bar(xs, ys, w, label=im)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes)
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title(f"H200 bf16, {title}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/attn")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--fla-max-configs", type=int, default=6)
    ap.add_argument("--fla-shapes", default="main", help="shapes at which fla runs (each new K/V autotunes)")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-shapes", default="", help="comma list of the shapes --sweep times (default: all)")
    ap.add_argument("--nonfinite-modes", default="", help="comma list of the sweep kernel's NF modes to time as "
                    "tnllm_nf<m> (0: unsafe, no masking; 1: prefix-count dot; 2: running sum; 3: branch + running sum)")
    ap.add_argument("--auto-split", action="store_true", help="also time the public op with the automatic sequence "
                    "split forced on (tnllm_autosplit; AUTO_SPLIT in ops/lightning_attn/triton.py)")
    ap.add_argument("--separate-dkdv", action="store_true", help="also time the public op with the backward's dk "
                    "and dv as two sweeps (tnllm_separate; FUSED_DKDV in ops/lightning_attn/triton.py)")
    ap.add_argument("--chunks", default="", help="comma list of row counts per chunk of the sweeps' default "
                    "configuration to time as tnllm_chunk<n> (CHUNK_ROWS in ops/lightning_attn/triton.py; default 64)")
    ap.add_argument("--plot", default=None, help="only draw the plot of this attention.json")
    ap.add_argument("--png", default="docs/attention.png")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: the same code at the tiny shape with the naive peer (default shapes/peers then tiny/naive)")
    a = ap.parse_args(argv)
    global DEV
    DEV = benchutil.DEV = a.device
    if DEV == "cpu":
        if a.shapes == ",".join(SHAPES):
            a.shapes = "tiny"
        if a.peers == ",".join(PEERS):
            a.peers = "naive"
        a.fla_shapes = ""
    if a.plot:
        plot(a.plot, a.png)
        return
    os.makedirs(a.out, exist_ok=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    if a.sweep:
        if DEV != "cuda":
            ap.error("--sweep times the Triton kernels: it needs --device cuda")
        names = [x for x in a.sweep_shapes.split(",") if x]
        unknown = [x for x in names if x not in SHAPES]
        if unknown:
            ap.error(f"--sweep-shapes: unknown shape(s) {unknown}; known: {sorted(SHAPES)}")
        sweep(a.out, dtype, names)
        return
    dev = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    bw = copy_bandwidth()
    log(f"device {dev}; torch {torch.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s (read+write)")
    peers = [p for p in a.peers.split(",") if p]
    if "fla_chunk" in peers:
        try:
            import fla.ops.simple_gla  # noqa: F401
            import fla.ops.common.chunk_h  # noqa: F401
            import fla.ops.common.chunk_o  # noqa: F401
            log(f"fla autotuners pruned: {prune_fla_autotune(a.fla_max_configs)} (max {a.fla_max_configs} configs)")
        except Exception as e:
            log("fla unavailable:", e)
    path = os.path.join(a.out, "attention.json")
    recs = []
    from tnllm.ops.lightning_attn import triton as tri
    # the settings of the Triton module (and its two config functions) that make_impl's tnllm_* variants replace:
    # every one of them, so that no variant's setting leaks into the rows after it
    defaults = triton_settings(tri)
    with open(path, "w") as f:
        f.write(json.dumps(dict(meta=True, device=dev, torch=torch.__version__, copy_bw=bw, argv=sys.argv)) + "\n")
        for shape_name in a.shapes.split(","):
            # the op through the dispatcher and the public call a user makes (the eager fast path), at every shape
            names = ["tnllm", "tnllm_api"] + [p for p in peers if p != "tnllm_api"] \
                + [f"tnllm_nf{m}" for m in a.nonfinite_modes.split(",") if m] \
                + (["tnllm_autosplit"] if a.auto_split else []) + (["tnllm_separate"] if a.separate_dkdv else []) \
                + [f"tnllm_chunk{n}" for n in a.chunks.split(",") if n]
            for name in names:
                if name == "fla_chunk" and shape_name not in a.fla_shapes.split(","):
                    continue
                if name == "naive" and SHAPES[shape_name][2] > 8192:
                    rec = dict(impl=name, shape=shape_name, error="skipped: the T x T mask needs > 64 GiB")
                else:
                    try:
                        rec = run_one(name, shape_name, dtype, bw)
                    except Exception as e:
                        rec = dict(impl=name, shape=shape_name, error=f"{type(e).__name__}: {str(e)[:300]}")
                        traceback.print_exc(limit=1)
                        _empty_cache()
                for knob, value in defaults.items():      # undo what a tnllm_* variant's make_impl set
                    setattr(tri, knob, value)
                log(json.dumps(rec))
                f.write(json.dumps(rec) + "\n")
                f.flush()
                recs.append(rec)
    md = table(recs)
    with open(os.path.join(a.out, "attention.md"), "w") as f:
        f.write(md + "\n")
    log(md)


if __name__ == "__main__":
    main()
