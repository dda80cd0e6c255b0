"""One decoder layer's decode step in one persistent Triton launch (the maths of ``naive.py``).

At batch 1 the six operations of the fused step (``tnllm.compile.FusedDecodeStep``) each move 2-12 MB, which
takes 0.5-3 us at the H200's bandwidth, but each launch also pays its ramp-up and tail: the 385M layer took
29.9 us (about 1 TB/s). Here one launch of NPROG programs (one per SM, all resident at once) runs the five
stages of the layer, separated by grid-wide barriers (21.6 us for that layer; docs/benchmarks.md):

    stage 0  qkvu  = round(r(x) x Wqkvu^T)               rows of Wqkvu split over the programs
    stage 1  y, S  = token mixer (act, LRPE, S <- lam S + k^T v, o = q S) per (row, head, BV value columns);
                     each item writes its o columns and their sum of squares
    stage 2  x    += srms_norm(y) * u  Wout^T            rows of Wout (the norm from the partial sums)
    stage 3  g     = act(round(r(x) x W1^T)) * round(r(x) x W2^T)     rows of W1 and W2 side by side
    stage 4  x    += g W3^T                              rows of W3

Every GEMV stage gives each program a contiguous block of about N / NPROG output rows (balanced to one row),
loaded as one [BR, pow2(K)] tile, with PREFETCH ahead of its stage (out_proj's at the start, l1's and l2's
before the first barrier, l3's before the last), so the weight stream overlaps the barriers and the token
mixer; each row of a batch reuses the tile from registers, and the input vector (d to g elements) is re-read
by every program from L2. So the kernel takes only layers whose every tile fits (``op.one_fits``: at most 32
rows and ONE_TILE elements per program, e.g. the 385M layer on 132 SMs); a version that walked larger blocks
in row steps, for the 1B and 7B layers, was slower there than the fused step's six operations (1B 0.973
against 0.962 ms per token, 7B 6.49 against 4.50 on the H200) and was dropped.

The barrier (``SYNC``): each program's threads finish their stores (a CTA barrier), then one thread adds 1
to a counter with release semantics at GPU scope and spins with acquire reads until the counter reaches
k * NPROG for the k-th barrier. Data written by other programs is read with ``.cg`` loads (L2, never a
stale L1 line). After the last barrier each program takes a ticket from a second counter; the last one
resets both to 0 for the next launch (every program has passed the barrier by then). A grid barrier is
only safe when all NPROG programs are resident together: NPROG is the SM count and a program needs one
SM's share of registers at most, and calls on one device must not run concurrently on two streams (the
counters are one per device). Without ``SYNC`` (the Triton CPU interpreter, which runs programs one after
another, and the GPU tests' reference) the launcher runs the five stages as five launches instead, with
the same per-program code, so the two modes give the same bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._device import num_sms as _num_sms
from .._triton_interp import patch as _patch_interpreter
from .._triton_rows import apply_act, gla_state_tile
from ..norm import EPS
from ..sglu.triton import ACT_CODE
from .op import MAX_ROWS, ONE_TILE, _pow2, one_fits, shared_gpu  # noqa: F401  (MAX_ROWS: rows per launch)

_patch_interpreter()

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
N_STAGES = 5


@dataclass(frozen=True)
class LayerConfig:
    """Launch parameters: ``prefetch`` loads each weight tile ahead of its stage, across the barriers; ``spin`` 0
    polls the barrier counter with atomics, 1 with volatile loads; ``num_warps`` per program; ``nprog`` programs
    (0: the SM count); ``one_tile``: the most weight elements of one program's tile (``op.one_fits``)."""
    num_warps: int = 8
    nprog: int = 0
    one_tile: int = ONE_TILE
    prefetch: bool = True
    spin: int = 0


@triton.jit
def _grid_sync(CNT, target, SPIN: tl.constexpr):
    """Wait until all programs arrived: the counter at CNT reaches ``target`` (module docstring). SPIN 0 polls
    with acquire atomics; 1 with volatile loads, then one acquire atomic."""
    tl.debug_barrier()
    tl.atomic_add(CNT, 1, sem="release", scope="gpu")
    if SPIN == 0:
        c = tl.atomic_add(CNT, 0, sem="acquire", scope="gpu")
        while c < target:
            c = tl.atomic_add(CNT, 0, sem="acquire", scope="gpu")
    else:
        c = tl.load(CNT, volatile=True)
        while c < target:
            c = tl.load(CNT, volatile=True)
        tl.atomic_add(CNT, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _clock(pid):
    return tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [pid], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _mark(TS, pid, i: tl.constexpr, PROFILE: tl.constexpr):
    """With PROFILE, TS[pid, i] = the SM's cycle counter (bench/decode_layer.py --profile)."""
    if PROFILE:
        tl.store(TS + pid * 16 + i, _clock(pid))


@triton.jit
def _row_range(pid, N, NPROG: tl.constexpr):
    return pid * N // NPROG, (pid + 1) * N // NPROG

@triton.jit
def _stage_mixer(QKVU, S, RATE, THETA, POS, YB, SS, pid, B: tl.constexpr, H: tl.constexpr, E: tl.constexpr,
                 BE: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, LRPE: tl.constexpr, ACT: tl.constexpr,
                 NPROG: tl.constexpr):
    HE: tl.constexpr = H * E
    P: tl.constexpr = H * NV
    DT = QKVU.dtype.element_ty
    ee = tl.arange(0, BE)
    me = ee < E
    for it in range(pid, B * P, NPROG):
        j = it % NV
        h = (it // NV) % H
        bb = it // P
        vv = j * BV + tl.arange(0, BV)
        mv = vv < E
        row = QKVU + bb * (4 * HE) + h * E
        qf = tl.load(row + ee, mask=me, other=0.0, cache_modifier=".cg").to(tl.float32)
        kf = tl.load(row + HE + ee, mask=me, other=0.0, cache_modifier=".cg").to(tl.float32)
        v = tl.load(row + 2 * HE + vv, mask=mv, other=0.0, cache_modifier=".cg").to(tl.float32)
        # the activation in the input dtype, as in the model (fp32 inside, rounded)
        qf = apply_act(qf, ACT).to(DT).to(tl.float32)
        kf = apply_act(kf, ACT).to(DT).to(tl.float32)
        lam = tl.exp(-tl.load(RATE + h).to(tl.float32))
        if LRPE:
            base = (bb * H + h).to(tl.int64) * (2 * E * E)
            th = tl.load(THETA + h * E + ee, mask=me, other=0.0).to(tl.float32)
            ang = th * tl.load(POS + bb).to(tl.float32)            # fp32 angle, as the model forms it
        else:
            base = (bb * H + h).to(tl.int64) * (E * E)
            ang = qf
        o = gla_state_tile(S, S, base, ee, vv, me, mv, qf, kf, v, lam, ang, QKVU, E, LRPE)
        o = o.to(DT)                                               # o in the input dtype, as in the model
        of = o.to(tl.float32)
        tl.store(YB + bb * HE + h * E + vv, o, mask=mv)
        tl.store(SS + it, tl.sum(of * of, 0))

# -- the GEMV stages: a program's rows of each weight are one [BR, pow2(K)] tile --------------------------------
@triton.jit
def _load_rows(W, lo, hi, K: tl.constexpr, BR: tl.constexpr, BKP: tl.constexpr):
    rows = lo + tl.arange(0, BR)
    ks = tl.arange(0, BKP)
    return tl.load(W + rows[:, None].to(tl.int64) * K + ks[None, :], mask=(rows < hi)[:, None] & (ks < K)[None, :],
                   other=0.0)


@triton.jit
def _vec_cg(P, K: tl.constexpr, BKP: tl.constexpr):
    ks = tl.arange(0, BKP)
    return tl.load(P + ks, mask=ks < K, other=0.0, cache_modifier=".cg").to(tl.float32)


@triton.jit
def _stage_qkvu(X, wA, QKVU, eps, lo, hi, B: tl.constexpr, D: tl.constexpr, N: tl.constexpr, BR: tl.constexpr,
              BDP: tl.constexpr):
    rows = lo + tl.arange(0, BR)
    rm = rows < hi
    DT = QKVU.dtype.element_ty
    for bb in tl.static_range(B):
        xv = _vec_cg(X + bb * D, D, BDP)
        r = tl.rsqrt(tl.sum(xv * xv, 0) / D + eps)
        acc = tl.sum(wA.to(tl.float32) * xv[None, :], 1)   # converted per row: a tile held in fp32 spills
        tl.store(QKVU + bb * N + rows, (acc * r).to(DT), mask=rm)


@triton.jit
def _stage_out(X, wC, QKVU, YB, SS, eps, lo, hi, B: tl.constexpr, D: tl.constexpr, HE: tl.constexpr, P: tl.constexpr,
             BP: tl.constexpr, BR: tl.constexpr, BHP: tl.constexpr):
    rows = lo + tl.arange(0, BR)
    rm = rows < hi
    DT = X.dtype.element_ty
    pp = tl.arange(0, BP)
    for bb in tl.static_range(B):
        ss = tl.load(SS + bb * P + pp, mask=pp < P, other=0.0, cache_modifier=".cg")
        ry = tl.rsqrt(tl.sum(ss, 0) / HE + eps)
        yv = _vec_cg(YB + bb * HE, HE, BHP)
        u = _vec_cg(QKVU + bb * (4 * HE) + 3 * HE, HE, BHP)
        yn = ((yv * ry).to(DT).to(tl.float32) * u).to(DT).to(tl.float32)
        acc = tl.sum(wC.to(tl.float32) * yn[None, :], 1)
        xr = tl.load(X + bb * D + rows, mask=rm, other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(X + bb * D + rows, (acc + xr).to(DT), mask=rm)


@triton.jit
def _stage_glu(X, w1t, w2t, GB, eps, lo, hi, B: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BR: tl.constexpr,
             BDP: tl.constexpr, GACT: tl.constexpr):
    rows = lo + tl.arange(0, BR)
    rm = rows < hi
    DT = X.dtype.element_ty
    for bb in tl.static_range(B):
        xv = _vec_cg(X + bb * D, D, BDP)
        r = tl.rsqrt(tl.sum(xv * xv, 0) / D + eps)
        a = (tl.sum(w1t.to(tl.float32) * xv[None, :], 1) * r).to(DT).to(tl.float32)
        c = (tl.sum(w2t.to(tl.float32) * xv[None, :], 1) * r).to(DT).to(tl.float32)
        a = apply_act(a, GACT).to(DT).to(tl.float32)
        tl.store(GB + bb * G + rows, (a * c).to(DT), mask=rm)


@triton.jit
def _stage_down(X, wE, GB, lo, hi, B: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BR: tl.constexpr,
              BGP: tl.constexpr):
    rows = lo + tl.arange(0, BR)
    rm = rows < hi
    DT = X.dtype.element_ty
    for bb in tl.static_range(B):
        gv = _vec_cg(GB + bb * G, G, BGP)
        acc = tl.sum(wE.to(tl.float32) * gv[None, :], 1)
        xr = tl.load(X + bb * D + rows, mask=rm, other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(X + bb * D + rows, (acc + xr).to(DT), mask=rm)


@triton.jit
def _sync_or_mark(CNT, TS, pid, k: tl.constexpr, NPROG: tl.constexpr, SYNC: tl.constexpr, SPIN: tl.constexpr,
                  PROFILE: tl.constexpr):
    """The k-th barrier (k = 1..4) with its profile marks before (2k - 1) and after (2k)."""
    _mark(TS, pid, 2 * k - 1, PROFILE)
    if SYNC:
        _grid_sync(CNT, k * NPROG, SPIN)
        if k == 4:
            # every program is past the last barrier: the last ticket resets both counters for the next launch
            ticket = tl.atomic_add(CNT + 1, 1, sem="acq_rel", scope="gpu")
            if ticket == NPROG - 1:
                tl.atomic_xchg(CNT, 0, sem="relaxed", scope="gpu")
                tl.atomic_xchg(CNT + 1, 0, sem="relaxed", scope="gpu")
    _mark(TS, pid, 2 * k, PROFILE)


@triton.jit
def decode_layer_kernel(X, S, WQ, WO, W1, W2, W3, RATE, THETA, POS, QKVU, YB, SS, GB, CNT, TS, eps,
                        B: tl.constexpr, D: tl.constexpr, H: tl.constexpr, E: tl.constexpr,
                        BE: tl.constexpr, G: tl.constexpr, LRPE: tl.constexpr, ACT: tl.constexpr,
                        GACT: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, BP: tl.constexpr,
                        BR0: tl.constexpr, BK0: tl.constexpr, BR2: tl.constexpr, BK2: tl.constexpr,
                        BR3: tl.constexpr, BK3: tl.constexpr, BR4: tl.constexpr, BK4: tl.constexpr,
                        NPROG: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr, SYNC: tl.constexpr,
                        PREFETCH: tl.constexpr, SPIN: tl.constexpr, PROFILE: tl.constexpr):
    """Stages FIRST..LAST of one layer (module docstring); SYNC: all five, grid barriers between them. Each
    program's rows of each weight are one tile (BR* rows, the whole K: BK* = pow2(K)); PREFETCH loads the out_proj
    tile at the start, l1 / l2 before the first barrier and l3 before the last, so the loads overlap the earlier
    stages and the barriers."""
    pid = tl.program_id(0)
    HE: tl.constexpr = H * E
    _mark(TS, pid, 0, PROFILE)
    loA, hiA = _row_range(pid, 4 * HE, NPROG)
    loC, hiC = _row_range(pid, D, NPROG)
    loD, hiD = _row_range(pid, G, NPROG)
    if FIRST <= 0 and LAST >= 0:
        wA = _load_rows(WQ, loA, hiA, D, BR0, BK0)
    if PREFETCH:
        if FIRST <= 2 and LAST >= 2:
            wC = _load_rows(WO, loC, hiC, HE, BR2, BK2)
    if FIRST <= 0 and LAST >= 0:
        _stage_qkvu(X, wA, QKVU, eps, loA, hiA, B, D, 4 * HE, BR0, BK0)
    if PREFETCH:
        if FIRST <= 3 and LAST >= 3:
            w1t = _load_rows(W1, loD, hiD, D, BR3, BK3)
            w2t = _load_rows(W2, loD, hiD, D, BR3, BK3)
    _sync_or_mark(CNT, TS, pid, 1, NPROG, SYNC, SPIN, PROFILE)
    if FIRST <= 1 and LAST >= 1:
        _stage_mixer(QKVU, S, RATE, THETA, POS, YB, SS, pid, B, H, E, BE, BV, NV, LRPE, ACT, NPROG)
    if not PREFETCH:
        if FIRST <= 2 and LAST >= 2:
            wC = _load_rows(WO, loC, hiC, HE, BR2, BK2)
    _sync_or_mark(CNT, TS, pid, 2, NPROG, SYNC, SPIN, PROFILE)
    if FIRST <= 2 and LAST >= 2:
        _stage_out(X, wC, QKVU, YB, SS, eps, loC, hiC, B, D, HE, H * NV, BP, BR2, BK2)
    if not PREFETCH:
        if FIRST <= 3 and LAST >= 3:
            w1t = _load_rows(W1, loD, hiD, D, BR3, BK3)
            w2t = _load_rows(W2, loD, hiD, D, BR3, BK3)
    _sync_or_mark(CNT, TS, pid, 3, NPROG, SYNC, SPIN, PROFILE)
    if FIRST <= 3 and LAST >= 3:
        _stage_glu(X, w1t, w2t, GB, eps, loD, hiD, B, D, G, BR3, BK3, GACT)
    if FIRST <= 4 and LAST >= 4:
        wE = _load_rows(W3, loC, hiC, G, BR4, BK4)
    _sync_or_mark(CNT, TS, pid, 4, NPROG, SYNC, SPIN, PROFILE)
    if FIRST <= 4 and LAST >= 4:
        _stage_down(X, wE, GB, loC, hiC, B, D, G, BR4, BK4)
    _mark(TS, pid, 9, PROFILE)



_COUNTERS: dict = {}


def _counters(device: torch.device) -> Tensor:
    """The two barrier counters (int32, zero between launches) of ``device``; allocated once and never freed,
    so a captured CUDA graph that holds their address stays valid (run a launch before capturing)."""
    key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return torch.zeros(2, dtype=torch.int32, device=device)     # graph-owned memory: not cached
        buf = _COUNTERS[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return buf


def block_v(B: int, H: int, e: int, nprog: int) -> int:
    """Value columns per token-mixer item: at most 64, halved (down to 4) until B * H * e / BV >= nprog."""
    bv = min(64, _pow2(e))
    while bv > 4 and B * H * (-(-e // bv)) < nprog:
        bv //= 2
    return bv


def supported(x: Tensor, state: Tensor, wqkvu: Tensor, wout: Tensor, w1: Tensor, w2: Tensor, w3: Tensor,
              nprog: int = 0) -> bool:
    """Whether the kernel takes these inputs: fp16 / bf16 / fp32, 1 to MAX_ROWS rows, plain contiguous weights,
    and a layer whose GEMV tiles fit (``one_fits``) on ``nprog`` programs (0: the device's SM count)."""
    B, d = x.shape
    _, H, _, e = state.shape
    weights = (wqkvu, wout, w1, w2, w3)
    return (x.dtype in _SUPPORTED and 1 <= B <= MAX_ROWS
            and all(type(w) in (torch.Tensor, torch.nn.Parameter) and w.is_contiguous() for w in weights)
            and one_fits(B, d, H * e, w1.shape[0], nprog or _num_sms(x.device)))


def decode_layer_triton(x: Tensor, state: Tensor, wqkvu: Tensor, wout: Tensor, w1: Tensor, w2: Tensor, w3: Tensor,
                        s: Tensor, theta: Tensor | None, pos: Tensor | None, act: str, glu_act: str,
                        eps: float = EPS, persistent: bool | None = None, cfg: LayerConfig | None = None,
                        profile: Tensor | None = None) -> None:
    """Launcher (CUDA, or the CPU under TRITON_INTERPRET=1): updates ``x`` [B, d] and ``state`` [B, H, Dk, e] in
    place (both contiguous); inputs as ``decode_layer_naive``, checked by the caller, weights contiguous.
    ``persistent``: one launch with grid barriers (default on CUDA unless the GPU may be shared through MPS:
    ``op.shared_gpu``), or five launches, one per stage (the only mode on the CPU). ``profile``: an int64
    [nprog, 16] tensor that receives each program's cycle counter at the stage boundaries (CUDA only:
    bench/decode_layer.py --profile)."""
    cfg = cfg or LayerConfig()
    B, d = x.shape
    _, H, Dk, e = state.shape
    g = w1.shape[0]
    HE = H * e
    dev = x.device
    if persistent is None:
        persistent = dev.type == "cuda" and not shared_gpu()
    if persistent and dev.type != "cuda":
        raise ValueError("decode_layer_step: `persistent=True` needs a CUDA device (its grid barriers spin, "
                         "which the Triton CPU interpreter, running one program after another, cannot do)")
    if not (x.is_contiguous() and state.is_contiguous()):
        raise ValueError("decode_layer_step: `x` and `state` are updated in place and must be contiguous")
    lrpe = theta is not None
    nprog = cfg.nprog or _num_sms(dev)
    if not one_fits(B, d, HE, g, nprog, cfg.one_tile):
        raise ValueError(f"decode_layer_step: a layer of width d = {d}, h = {HE}, g = {g} does not fit the kernel on "
                         f"{nprog} programs (one tile of at most 32 rows and {cfg.one_tile} weight elements per "
                         f"program and stage: tnllm.ops.decode_layer.op.one_fits); use the fused step")
    rate = s.to(torch.float32).contiguous()
    th = theta.to(torch.float32).reshape(H, e).contiguous() if lrpe else rate
    ps = pos.to(torch.int64).contiguous() if lrpe else rate
    bv = block_v(B, H, e, nprog)
    NV = triton.cdiv(e, bv)
    P = H * NV
    qkvu = torch.empty(B, 4 * HE, device=dev, dtype=x.dtype)
    yb = torch.empty(B, HE, device=dev, dtype=x.dtype)
    ss = torch.empty(B * P, device=dev, dtype=torch.float32)
    gb = torch.empty(B, g, device=dev, dtype=x.dtype)
    cnt = _counters(dev) if persistent else rate
    br0, br2, br3 = (max(2, _pow2(-(-N // nprog))) for N in (4 * HE, d, g))
    ts = profile if profile is not None else rate
    args = (x, state, wqkvu, wout, w1, w2, w3, rate, th, ps, qkvu, yb, ss, gb, cnt, ts, eps)
    kw = dict(B=B, D=d, H=H, E=e, BE=_pow2(e), G=g, LRPE=lrpe, ACT=ACT_CODE[act], GACT=ACT_CODE[glu_act], BV=bv,
              NV=NV, BP=_pow2(P), BR0=br0, BK0=_pow2(d), BR2=br2, BK2=_pow2(HE), BR3=br3, BK3=_pow2(d), BR4=br2,
              BK4=_pow2(g), NPROG=nprog, PREFETCH=cfg.prefetch, SPIN=cfg.spin, PROFILE=profile is not None,
              num_warps=cfg.num_warps)
    if persistent:
        decode_layer_kernel[(nprog,)](*args, FIRST=0, LAST=N_STAGES - 1, SYNC=True, **kw)
    else:
        for st in range(N_STAGES):
            decode_layer_kernel[(nprog,)](*args, FIRST=st, LAST=st, SYNC=False, **kw)
