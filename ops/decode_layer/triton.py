"""Decoder layers' decode step in one persistent Triton launch (the maths of ``naive.py``).

At batch 1 the six operations of the fused step (``tnllm.compile.FusedDecodeStep``) each move 2-12 MB, which
takes 0.5-3 us at the H200's bandwidth, but each launch also pays its ramp-up and tail: the 385M layer took
29.9 us (about 1 TB/s). Here one launch of NPROG programs (one per SM, all resident at once) runs the five
stages of a layer, separated by grid-wide barriers (21.6 us for that layer; docs/benchmarks.md):

    stage 0  qkvu  = round(r(x) x Wqkvu^T)               rows of Wqkvu split over the programs
    stage 1  y, S  = token mixer (act, LRPE, S <- lam S + k^T v, o = q S) per (row, head, BV value columns);
                     each item writes its o columns and their sum of squares; BV is as narrow as gives at most
                     one item per program (``block_v``), whose state tile is then read before barrier 1
    stage 2  x    += srms_norm(y) * u  Wout^T            rows of Wout (the norm from the partial sums)
    stage 3  g     = act(round(r(x) x W1^T)) * round(r(x) x W2^T)     rows of W1 and W2 side by side
    stage 4  x    += g W3^T                              rows of W3

and a launch may run a stack of L like layers (``decode_stack_triton``: the same width, LRPE on all or none)
one after another, a fifth barrier between two layers. Each layer's weights, state, decay rates and LRPE
frequencies are found through a pointer table (int64 [L, 8], ``TABLE_COLUMNS``: built once per set of
addresses, ``_table``), so the layers' parameters stay the model's own tensors; only the states are one
stacked tensor [L, B, H, Dk, e]. A layer is a stack of one.

Every GEMV stage gives each program a contiguous block of about N / NPROG output rows (balanced to one row),
loaded as one [BR, pow2(K)] tile, with PREFETCH ahead of its stage (out_proj's at the start, l1's and l2's
before the first barrier, l3's after the SGLU stage together with the next layer's qkvu and out_proj tiles),
so the weight stream overlaps the barriers and the other stages; each row of a batch reuses the tile from
registers, and the input vector (d to g elements) is re-read by every program from L2. So the kernel takes
only layers whose every tile fits (``op.one_fits``: at most 32 rows and ONE_TILE elements per program, e.g. the
385M layer on 132 SMs); a version that walked larger blocks in row steps, for the 1B and 7B layers, was slower
there than the fused step's six operations (1B 0.973 against 0.962 ms per token, 7B 6.49 against 4.50 on the
H200) and was dropped.

The barrier (``SYNC``): each program's threads finish their stores (a CTA barrier), then one thread adds 1
to a counter with acquire-release semantics at GPU scope and, unless the count it got back is already
k * NPROG for the k-th barrier of the launch (the last program to arrive), spins with acquire reads until the
counter reaches it. Data written by other programs is read with ``.cg`` loads (L2,
never a stale L1 line). After the last barrier each program takes a ticket from a second counter; the last
one resets both to 0 for the next launch (every program has passed the barrier by then). A grid barrier is
only safe when all NPROG programs are resident together: NPROG is the SM count and a program needs one
SM's share of registers at most, and calls on one device must not run concurrently on two streams (the
counters are one per device). Without ``SYNC`` (the Triton CPU interpreter, which runs programs one after
another, and the GPU tests' reference) the launcher runs each layer's five stages as five launches instead,
with the same per-stage code; the persistent loop itself runs under the interpreter with one program, whose
barriers are trivial.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._device import num_sms as _num_sms
from .._launch import cdiv
from .._triton_interp import patch as _patch_interpreter
from .._triton_rows import apply_act, gla_state_load, gla_state_step
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
    """Wait until all programs arrived: the counter at CNT reaches ``target`` (module docstring). The arrival is an
    acquire-release add whose returned count the program checks first, so the last program to arrive goes on
    without a poll; the others poll, SPIN 0 with acquire atomics, 1 with volatile loads and then one acquire
    atomic."""
    tl.debug_barrier()
    c = tl.atomic_add(CNT, 1, sem="acq_rel", scope="gpu") + 1
    if SPIN == 0:
        while c < target:
            c = tl.atomic_add(CNT, 0, sem="acquire", scope="gpu")
    else:
        while c < target:
            c = tl.load(CNT, volatile=True)
        tl.atomic_add(CNT, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _clock(pid):
    return tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [pid], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _mark(TS, row, i: tl.constexpr, PROFILE: tl.constexpr):
    """With PROFILE, TS[row, i] = the SM's cycle counter (row: layer * NPROG + program; bench/decode_layer.py
    --profile)."""
    if PROFILE:
        tl.store(TS + row * 16 + i, _clock(row))


@triton.jit
def _row_range(pid, N, NPROG: tl.constexpr):
    return pid * N // NPROG, (pid + 1) * N // NPROG

@triton.jit
def _mixer_coords(it, H: tl.constexpr, E: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, LRPE: tl.constexpr):
    """Token-mixer item ``it`` = (row bb, head h, block j of BV value columns): (h, bb, value columns, their mask,
    the head state's offset)."""
    j = it % NV
    h = (it // NV) % H
    bb = it // (H * NV)
    vv = j * BV + tl.arange(0, BV)
    DK: tl.constexpr = 2 * E if LRPE else E
    return h, bb, vv, vv < E, (bb * H + h).to(tl.int64) * (DK * E)


@triton.jit
def _mixer_item(QKVU, S, s1, s2, RATE, THETA, POS, YB, SS, it, h, bb, vv, mv, base, ee, me, H: tl.constexpr,
                E: tl.constexpr, LRPE: tl.constexpr, ACT: tl.constexpr):
    """One item of the token mixer on its state tile (s1, s2) read by ``gla_state_load``: act, LRPE, the state
    update and readout; writes the item's o columns and their sum of squares."""
    HE: tl.constexpr = H * E
    DT = QKVU.dtype.element_ty
    row = QKVU + bb * (4 * HE) + h * E
    qf = tl.load(row + ee, mask=me, other=0.0, cache_modifier=".cg").to(tl.float32)
    kf = tl.load(row + HE + ee, mask=me, other=0.0, cache_modifier=".cg").to(tl.float32)
    v = tl.load(row + 2 * HE + vv, mask=mv, other=0.0, cache_modifier=".cg").to(tl.float32)
    # the activation in the input dtype, as in the model (fp32 inside, rounded)
    qf = apply_act(qf, ACT).to(DT).to(tl.float32)
    kf = apply_act(kf, ACT).to(DT).to(tl.float32)
    lam = tl.exp(-tl.load(RATE + h).to(tl.float32))
    if LRPE:
        th = tl.load(THETA + h * E + ee, mask=me, other=0.0).to(tl.float32)
        ang = th * tl.load(POS + bb).to(tl.float32)            # fp32 angle, as the model forms it
    else:
        ang = qf
    o = gla_state_step(s1, s2, S, base, ee, vv, me, mv, qf, kf, v, lam, ang, QKVU, E, LRPE)
    o = o.to(DT)                                               # o in the input dtype, as in the model
    of = o.to(tl.float32)
    tl.store(YB + bb * HE + h * E + vv, o, mask=mv)
    tl.store(SS + it, tl.sum(of * of, 0))


@triton.jit
def _stage_mixer(QKVU, S, RATE, THETA, POS, YB, SS, pid, B: tl.constexpr, H: tl.constexpr, E: tl.constexpr,
                 BE: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, LRPE: tl.constexpr, ACT: tl.constexpr,
                 NPROG: tl.constexpr):
    """The token mixer when there are more items than programs: each program's items one after another."""
    ee = tl.arange(0, BE)
    me = ee < E
    for it in range(pid, B * H * NV, NPROG):
        h, bb, vv, mv, base = _mixer_coords(it, H, E, BV, NV, LRPE)
        s1, s2 = gla_state_load(S, base, ee, vv, me, mv, E, LRPE)
        _mixer_item(QKVU, S, s1, s2, RATE, THETA, POS, YB, SS, it, h, bb, vv, mv, base, ee, me, H, E, LRPE, ACT)


@triton.jit
def _mixer_state(S, pid, B: tl.constexpr, H: tl.constexpr, E: tl.constexpr, BE: tl.constexpr, BV: tl.constexpr,
                 NV: tl.constexpr, LRPE: tl.constexpr):
    """At most one item per program (B * H * NV <= NPROG): program pid's state tile (nothing for a program without
    an item), which does not depend on the layer's qkvu, so it can be read before the first barrier."""
    ee = tl.arange(0, BE)
    h, bb, vv, mv, base = _mixer_coords(pid, H, E, BV, NV, LRPE)
    has = (vv * 0 + pid) < B * H * NV         # a vector mask: the interpreter refuses a scalar one here
    return gla_state_load(S, base, ee, vv, ee < E, mv & has, E, LRPE)


@triton.jit
def _stage_mixer_one(QKVU, S, s1, s2, RATE, THETA, POS, YB, SS, pid, B: tl.constexpr, H: tl.constexpr,
                     E: tl.constexpr, BE: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, LRPE: tl.constexpr,
                     ACT: tl.constexpr):
    """The token mixer with at most one item per program, on the tile ``_mixer_state`` read."""
    ee = tl.arange(0, BE)
    if pid < B * H * NV:
        h, bb, vv, mv, base = _mixer_coords(pid, H, E, BV, NV, LRPE)
        _mixer_item(QKVU, S, s1, s2, RATE, THETA, POS, YB, SS, pid, h, bb, vv, mv, base, ee, ee < E, H, E, LRPE,
                    ACT)


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
def _normed_row(P, eps, K: tl.constexpr, BKP: tl.constexpr):
    """A row of K values (fp32, read from L2) and its SRMSNorm scale rsqrt(mean(x^2) + eps)."""
    xv = _vec_cg(P, K, BKP)
    return xv, tl.rsqrt(tl.sum(xv * xv, 0) / K + eps)


@triton.jit
def _add_to_rows(XR, rows, rm, acc):
    """The residual stream's entries ``rows`` of the row at XR += acc (fp32), rounded once to its dtype."""
    xr = tl.load(XR + rows, mask=rm, other=0.0, cache_modifier=".cg").to(tl.float32)
    tl.store(XR + rows, (acc + xr).to(XR.dtype.element_ty), mask=rm)


@triton.jit
def _stage_qkvu(X, wA, QKVU, eps, lo, hi, B: tl.constexpr, D: tl.constexpr, N: tl.constexpr, BR: tl.constexpr,
              BDP: tl.constexpr):
    rows = lo + tl.arange(0, BR)
    rm = rows < hi
    DT = QKVU.dtype.element_ty
    for bb in tl.static_range(B):
        xv, r = _normed_row(X + bb * D, eps, D, BDP)
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
        _add_to_rows(X + bb * D, rows, rm, tl.sum(wC.to(tl.float32) * yn[None, :], 1))


@triton.jit
def _stage_glu(X, w1t, w2t, GB, eps, lo, hi, B: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BR: tl.constexpr,
             BDP: tl.constexpr, GACT: tl.constexpr):
    rows = lo + tl.arange(0, BR)
    rm = rows < hi
    DT = X.dtype.element_ty
    for bb in tl.static_range(B):
        xv, r = _normed_row(X + bb * D, eps, D, BDP)
        a = (tl.sum(w1t.to(tl.float32) * xv[None, :], 1) * r).to(DT).to(tl.float32)
        c = (tl.sum(w2t.to(tl.float32) * xv[None, :], 1) * r).to(DT).to(tl.float32)
        a = apply_act(a, GACT).to(DT).to(tl.float32)
        tl.store(GB + bb * G + rows, (a * c).to(DT), mask=rm)


@triton.jit
def _stage_down(X, wE, GB, lo, hi, B: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BR: tl.constexpr,
              BGP: tl.constexpr):
    rows = lo + tl.arange(0, BR)
    rm = rows < hi
    for bb in tl.static_range(B):
        gv = _vec_cg(GB + bb * G, G, BGP)
        _add_to_rows(X + bb * D, rows, rm, tl.sum(wE.to(tl.float32) * gv[None, :], 1))


@triton.jit
def _ptr(TAB, l, j: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """Entry j of layer l's row of the pointer table (``TABLE_COLUMNS``) as a pointer to DT; with ALIGNED (the
    launcher checked every entry) marked 16-byte aligned, so that the weight tiles load as 128-bit vectors."""
    p = tl.load(TAB + l * 8 + j).to(tl.pointer_type(DT))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _barrier(CNT, TS, prow, m: tl.constexpr, target, NPROG: tl.constexpr, SPIN: tl.constexpr, PROFILE: tl.constexpr,
             RESET):
    """A grid barrier (the counter reaches ``target``) with profile marks m before and m + 1 after. RESET (the
    launch's last barrier): every program then takes a ticket, and the last one zeroes both counters for the next
    launch (all programs are past the barrier by then)."""
    _mark(TS, prow, m, PROFILE)
    _grid_sync(CNT, target, SPIN)
    if RESET:
        ticket = tl.atomic_add(CNT + 1, 1, sem="acq_rel", scope="gpu")
        if ticket == NPROG - 1:
            tl.atomic_xchg(CNT, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(CNT + 1, 0, sem="relaxed", scope="gpu")
    _mark(TS, prow, m + 1, PROFILE)


@triton.jit
def decode_stack_kernel(X, TAB, POS, QKVU, YB, SS, GB, CNT, TS, eps, NL, ONE_LAYER: tl.constexpr,
                        B: tl.constexpr, D: tl.constexpr, H: tl.constexpr, E: tl.constexpr,
                        BE: tl.constexpr, G: tl.constexpr, LRPE: tl.constexpr, ACT: tl.constexpr,
                        GACT: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, BP: tl.constexpr,
                        BR0: tl.constexpr, BK0: tl.constexpr, BR2: tl.constexpr, BK2: tl.constexpr,
                        BR3: tl.constexpr, BK3: tl.constexpr, BR4: tl.constexpr, BK4: tl.constexpr,
                        NPROG: tl.constexpr, STAGE: tl.constexpr, SYNC: tl.constexpr, PREFETCH: tl.constexpr,
                        SPIN: tl.constexpr, ALIGNED: tl.constexpr, PROFILE: tl.constexpr):
    """The decode step of NL layers (module docstring); layer l's weights, state, decay rates and LRPE
    frequencies are the pointers of row l of TAB. SYNC: all NL layers in this launch, grid barriers between the
    stages and between the layers; else the one stage STAGE of layer 0 (the staged launches). Each program's rows
    of each weight are one tile (BR* rows, the whole K: BK* = pow2(K)). PREFETCH loads the out_proj tile ahead of
    the token mixer, the l1 / l2 tiles ahead of the first barrier, and the next layer's qkvu and out_proj tiles
    with this layer's l3 tile, so the weight stream runs under the barriers and the other stages."""
    pid = tl.program_id(0)
    HE: tl.constexpr = H * E
    ONE_ITEM: tl.constexpr = B * H * NV <= NPROG     # the token mixer's items: at most one per program
    DT = X.dtype.element_ty
    F32 = tl.float32
    loA, hiA = _row_range(pid, 4 * HE, NPROG)
    loC, hiC = _row_range(pid, D, NPROG)
    loD, hiD = _row_range(pid, G, NPROG)
    if not SYNC:
        if STAGE == 0:
            wA = _load_rows(_ptr(TAB, 0, 0, DT, ALIGNED), loA, hiA, D, BR0, BK0)
            _stage_qkvu(X, wA, QKVU, eps, loA, hiA, B, D, 4 * HE, BR0, BK0)
        elif STAGE == 1:
            if ONE_ITEM:
                s1, s2 = _mixer_state(_ptr(TAB, 0, 5, F32, ALIGNED), pid, B, H, E, BE, BV, NV, LRPE)
                _stage_mixer_one(QKVU, _ptr(TAB, 0, 5, F32, ALIGNED), s1, s2, _ptr(TAB, 0, 6, F32, ALIGNED),
                                 _ptr(TAB, 0, 7, F32, ALIGNED), POS, YB, SS, pid, B, H, E, BE, BV, NV, LRPE, ACT)
            else:
                _stage_mixer(QKVU, _ptr(TAB, 0, 5, F32, ALIGNED), _ptr(TAB, 0, 6, F32, ALIGNED),
                             _ptr(TAB, 0, 7, F32, ALIGNED), POS, YB, SS, pid, B, H, E, BE, BV, NV, LRPE, ACT, NPROG)
        elif STAGE == 2:
            wC = _load_rows(_ptr(TAB, 0, 1, DT, ALIGNED), loC, hiC, HE, BR2, BK2)
            _stage_out(X, wC, QKVU, YB, SS, eps, loC, hiC, B, D, HE, H * NV, BP, BR2, BK2)
        elif STAGE == 3:
            w1t = _load_rows(_ptr(TAB, 0, 2, DT, ALIGNED), loD, hiD, D, BR3, BK3)
            w2t = _load_rows(_ptr(TAB, 0, 3, DT, ALIGNED), loD, hiD, D, BR3, BK3)
            _stage_glu(X, w1t, w2t, GB, eps, loD, hiD, B, D, G, BR3, BK3, GACT)
        else:
            wE = _load_rows(_ptr(TAB, 0, 4, DT, ALIGNED), loC, hiC, G, BR4, BK4)
            _stage_down(X, wE, GB, loC, hiC, B, D, G, BR4, BK4)
    else:
        wA = _load_rows(_ptr(TAB, 0, 0, DT, ALIGNED), loA, hiA, D, BR0, BK0)
        if PREFETCH:
            wC = _load_rows(_ptr(TAB, 0, 1, DT, ALIGNED), loC, hiC, HE, BR2, BK2)
        # one layer (the LRPE layer's launch): a loop of one known trip, so the next-layer loads and the fifth
        # barrier compile away (a stack's loop otherwise carries the next qkvu tile: a few more registers)
        n_layers = 1 if ONE_LAYER else NL
        for l in range(n_layers):
            prow = l * NPROG + pid
            k = 5 * l
            _mark(TS, prow, 0, PROFILE)
            _stage_qkvu(X, wA, QKVU, eps, loA, hiA, B, D, 4 * HE, BR0, BK0)
            if PREFETCH:
                w1t = _load_rows(_ptr(TAB, l, 2, DT, ALIGNED), loD, hiD, D, BR3, BK3)
                w2t = _load_rows(_ptr(TAB, l, 3, DT, ALIGNED), loD, hiD, D, BR3, BK3)
                if ONE_ITEM:
                    s1, s2 = _mixer_state(_ptr(TAB, l, 5, F32, ALIGNED), pid, B, H, E, BE, BV, NV, LRPE)
            _barrier(CNT, TS, prow, 1, (k + 1) * NPROG, NPROG, SPIN, PROFILE, False)
            if ONE_ITEM:
                if not PREFETCH:
                    s1, s2 = _mixer_state(_ptr(TAB, l, 5, F32, ALIGNED), pid, B, H, E, BE, BV, NV, LRPE)
                _stage_mixer_one(QKVU, _ptr(TAB, l, 5, F32, ALIGNED), s1, s2, _ptr(TAB, l, 6, F32, ALIGNED),
                                 _ptr(TAB, l, 7, F32, ALIGNED), POS, YB, SS, pid, B, H, E, BE, BV, NV, LRPE, ACT)
            else:
                _stage_mixer(QKVU, _ptr(TAB, l, 5, F32, ALIGNED), _ptr(TAB, l, 6, F32, ALIGNED),
                             _ptr(TAB, l, 7, F32, ALIGNED), POS, YB, SS, pid, B, H, E, BE, BV, NV, LRPE, ACT, NPROG)
            if not PREFETCH:
                wC = _load_rows(_ptr(TAB, l, 1, DT, ALIGNED), loC, hiC, HE, BR2, BK2)
            _barrier(CNT, TS, prow, 3, (k + 2) * NPROG, NPROG, SPIN, PROFILE, False)
            _stage_out(X, wC, QKVU, YB, SS, eps, loC, hiC, B, D, HE, H * NV, BP, BR2, BK2)
            if not PREFETCH:
                w1t = _load_rows(_ptr(TAB, l, 2, DT, ALIGNED), loD, hiD, D, BR3, BK3)
                w2t = _load_rows(_ptr(TAB, l, 3, DT, ALIGNED), loD, hiD, D, BR3, BK3)
            _barrier(CNT, TS, prow, 5, (k + 3) * NPROG, NPROG, SPIN, PROFILE, False)
            _stage_glu(X, w1t, w2t, GB, eps, loD, hiD, B, D, G, BR3, BK3, GACT)
            wE = _load_rows(_ptr(TAB, l, 4, DT, ALIGNED), loC, hiC, G, BR4, BK4)
            # the next layer's tiles (none after the last: its rows are masked off, its table row clamped)
            ln = tl.minimum(l + 1, n_layers - 1)
            more = l + 1 < n_layers
            if PREFETCH:
                wA = _load_rows(_ptr(TAB, ln, 0, DT, ALIGNED), loA, tl.where(more, hiA, loA), D, BR0, BK0)
                wC = _load_rows(_ptr(TAB, ln, 1, DT, ALIGNED), loC, tl.where(more, hiC, loC), HE, BR2, BK2)
            _barrier(CNT, TS, prow, 7, (k + 4) * NPROG, NPROG, SPIN, PROFILE, not more)
            _stage_down(X, wE, GB, loC, hiC, B, D, G, BR4, BK4)
            _mark(TS, prow, 9, PROFILE)
            if more:
                if not PREFETCH:
                    wA = _load_rows(_ptr(TAB, ln, 0, DT, ALIGNED), loA, hiA, D, BR0, BK0)
                _barrier(CNT, TS, prow, 10, (k + 5) * NPROG, NPROG, SPIN, PROFILE, False)



_COUNTERS: dict = {}
_TABLES: collections.OrderedDict = collections.OrderedDict()   # least recently used first
_PINNED: set = set()          # tables a CUDA graph captured: never evicted
_CAPTURED_HOST: list = []     # pinned host tables copied inside a CUDA graph capture (its replays re-read them)
MAX_TABLES = 1024             # cached tables beyond the pinned ones (eager calls on ever new tensors)
TABLE_COLUMNS = ("wqkvu", "wout", "w1", "w2", "w3", "state", "s", "theta")


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


def _table(ptrs: tuple[int, ...], device: torch.device) -> Tensor:
    """The int64 [L, 8] pointer table of these addresses on ``device`` (``TABLE_COLUMNS`` per layer). It holds
    addresses only, so one table serves every call with the same tensors (a decoder's static buffers: one host
    copy, at the first call) and stays right for any tensors that later occupy the same addresses; tables are
    kept: the least recently used beyond ``MAX_TABLES`` are dropped, except those a CUDA graph captured (the graph
    holds their address). Inside a capture a new table is copied from pinned host memory (the copy is part of the
    graph) and not cached."""
    key = (device.type, device.index, ptrs)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    tab = _TABLES.get(key)
    if tab is not None:
        _TABLES.move_to_end(key)
        if capturing:
            _PINNED.add(key)
        return tab
    host = torch.tensor(ptrs, dtype=torch.int64).reshape(-1, len(TABLE_COLUMNS))
    if device.type != "cuda":
        tab = host
    elif capturing:
        host = host.pin_memory()
        _CAPTURED_HOST.append(host)
        tab = torch.empty_like(host, device=device)
        tab.copy_(host, non_blocking=True)
        return tab
    else:
        tab = host.to(device)
    _TABLES[key] = tab
    if len(_TABLES) > MAX_TABLES + len(_PINNED):
        old = next((k for k in _TABLES if k not in _PINNED), None)
        if old is not None:
            del _TABLES[old]
    return tab


def block_v(B: int, H: int, e: int, nprog: int) -> int:
    """Value columns per token-mixer item: the narrowest of 4, 8, ..., min(64, pow2(e)) that gives at most one item
    (row, head, column block) per program, B * H * ceil(e / BV) <= nprog, so each program's item is one state tile,
    read ahead of the first barrier; where even the widest gives more items than programs, the widest (items then
    loop)."""
    widest = min(64, _pow2(e))
    bv = min(4, widest)
    while bv < widest and B * H * (-(-e // bv)) > nprog:
        bv *= 2
    return bv


def supported(x: Tensor, state: Tensor, wqkvu: Tensor, wout: Tensor, w1: Tensor, w2: Tensor, w3: Tensor,
              nprog: int = 0) -> bool:
    """Whether the kernel takes these inputs: fp16 / bf16 / fp32, 1 to MAX_ROWS rows, plain contiguous weights,
    and a layer whose GEMV tiles fit (``one_fits``) on ``nprog`` programs (0: the device's SM count). ``state``
    is one layer's [B, H, Dk, e] or a stack's [L, B, H, Dk, e]; a stack's weights are lists (one per layer)."""
    B, d = x.shape
    H, e = state.shape[-3], state.shape[-1]
    lists = [w if isinstance(w, (list, tuple)) else [w] for w in (wqkvu, wout, w1, w2, w3)]
    return (x.dtype in _SUPPORTED and 1 <= B <= MAX_ROWS
            and all(type(w) in (torch.Tensor, torch.nn.Parameter) and w.is_contiguous() for ws in lists for w in ws)
            and one_fits(B, d, H * e, lists[2][0].shape[0], nprog or _num_sms(x.device)))


def _launch_args(x: Tensor, H: int, e: int, g: int, nprog: int):
    """The scratch buffers and the constexprs of a launch (B, d from ``x``)."""
    B, d = x.shape
    HE = H * e
    dev = x.device
    bv = block_v(B, H, e, nprog)
    NV = cdiv(e, bv)
    P = H * NV
    scratch = (torch.empty(B, 4 * HE, device=dev, dtype=x.dtype), torch.empty(B, HE, device=dev, dtype=x.dtype),
               torch.empty(B * P, device=dev, dtype=torch.float32), torch.empty(B, g, device=dev, dtype=x.dtype))
    br0, br2, br3 = (max(2, _pow2(-(-N // nprog))) for N in (4 * HE, d, g))
    kw = dict(B=B, D=d, H=H, E=e, BE=_pow2(e), G=g, BV=bv, NV=NV, BP=_pow2(P), BR0=br0, BK0=_pow2(d), BR2=br2,
              BK2=_pow2(HE), BR3=br3, BK3=_pow2(d), BR4=br2, BK4=_pow2(g), NPROG=nprog)
    return scratch, kw


def decode_stack_triton(x: Tensor, state: Tensor, wqkvu, wout, w1, w2, w3, s, theta, pos: Tensor | None, act: str,
                        glu_act: str, eps: float = EPS, persistent: bool | None = None, cfg: LayerConfig | None = None,
                        profile: Tensor | None = None) -> None:
    """Launcher of L layers (CUDA, or the CPU under TRITON_INTERPRET=1): updates ``x`` [B, d] and ``state``
    [L, B, H, Dk, e] in place (both contiguous); ``wqkvu`` ... ``w3``, ``s`` and ``theta`` (or None: no LRPE) are
    lists of L per-layer tensors as ``decode_layer_naive`` takes them, checked by the caller, weights contiguous.
    ``persistent``: one launch for all L layers with grid barriers (default on CUDA unless the GPU may be shared
    through MPS: ``op.shared_gpu``; on the CPU only with ``cfg.nprog == 1``, where the barriers are trivial), or
    five launches per layer, one per stage. ``profile``: an int64 [L, nprog, 16] tensor that receives each
    program's cycle counter at the stage boundaries of each layer (persistent CUDA launches:
    bench/decode_layer.py --profile)."""
    cfg = cfg or LayerConfig()
    B, d = x.shape
    L, _, H, Dk, e = state.shape
    g = w1[0].shape[0]
    dev = x.device
    nprog = cfg.nprog or _num_sms(dev)
    if persistent is None:
        persistent = dev.type == "cuda" and not shared_gpu()
    if persistent and dev.type != "cuda" and nprog != 1:
        raise ValueError("decode_layer_step: `persistent=True` needs a CUDA device, or one program "
                         "(LayerConfig(nprog=1)) under the Triton CPU interpreter, which runs programs one after "
                         "another and so cannot wait at a grid barrier for a second one")
    if not (x.is_contiguous() and state.is_contiguous()):
        raise ValueError("decode_layer_step: `x` and `state` are updated in place and must be contiguous")
    if not one_fits(B, d, H * e, g, nprog, cfg.one_tile):
        raise ValueError(f"decode_layer_step: a layer of width d = {d}, h = {H * e}, g = {g} does not fit the kernel on "
                         f"{nprog} programs (one tile of at most 32 rows and {cfg.one_tile} weight elements per "
                         f"program and stage: tnllm.ops.decode_layer.op.one_fits); use the fused step")
    lrpe = theta is not None
    keep, ptrs = [], []
    for i in range(L):
        rate = s[i].to(torch.float32).contiguous()
        th = theta[i].to(torch.float32).reshape(H, e).contiguous() if lrpe else rate
        keep += [rate, th]
        ptrs += [wqkvu[i].data_ptr(), wout[i].data_ptr(), w1[i].data_ptr(), w2[i].data_ptr(), w3[i].data_ptr(),
                 state[i].data_ptr(), rate.data_ptr(), th.data_ptr()]
    tab = _table(tuple(ptrs), dev)
    aligned = all(p % 16 == 0 for p in ptrs)
    ps = pos.to(torch.int64).contiguous() if lrpe else keep[0]
    scratch, kw = _launch_args(x, H, e, g, nprog)
    kw.update(LRPE=lrpe, ACT=ACT_CODE[act], GACT=ACT_CODE[glu_act], PREFETCH=cfg.prefetch, SPIN=cfg.spin,
              ALIGNED=aligned, num_warps=cfg.num_warps)
    if persistent:
        cnt = _counters(dev)
        ts = profile if profile is not None else cnt
        decode_stack_kernel[(nprog,)](x, tab, ps, *scratch, cnt, ts, eps, L, L == 1, STAGE=0, SYNC=True,
                                      PROFILE=profile is not None, **kw)
    else:
        # the staged launches load every tile at its stage and wait at no barrier: one compile whatever the config
        kw.update(PREFETCH=False, SPIN=0)
        for i in range(L):
            for st in range(N_STAGES):
                decode_stack_kernel[(nprog,)](x, tab[i], ps, *scratch, keep[0], keep[0], eps, 1, True, STAGE=st,
                                              SYNC=False, PROFILE=False, **kw)


def decode_layer_triton(x: Tensor, state: Tensor, wqkvu: Tensor, wout: Tensor, w1: Tensor, w2: Tensor, w3: Tensor,
                        s: Tensor, theta: Tensor | None, pos: Tensor | None, act: str, glu_act: str,
                        eps: float = EPS, persistent: bool | None = None, cfg: LayerConfig | None = None,
                        profile: Tensor | None = None) -> None:
    """One layer (``decode_stack_triton`` of L = 1): updates ``x`` [B, d] and ``state`` [B, H, Dk, e] in place.
    ``profile``: an int64 [nprog, 16] tensor (as the stack's [1, nprog, 16])."""
    decode_stack_triton(x, state.unsqueeze(0), [wqkvu], [wout], [w1], [w2], [w3], [s],
                        None if theta is None else [theta], pos, act, glu_act, eps, persistent, cfg,
                        None if profile is None else profile.unsqueeze(0))
