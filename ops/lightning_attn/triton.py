"""Triton kernels for Lightning Attention on CUDA: one generic causal "sweep" used four times (and a fused
dk/dv sweep, _la_dkdv_kernel, that replaces the backward's last two for narrow heads).

Legend: B batch, H heads, T length, lam = exp(-s_h). All shapes [B, H, T, D].

The sweep computes, for inputs A [T, DA], Bm [T, DA], C [T, DC] of one head and an optional
initial state S0' [DA, DC] (fp32), in a frame r that runs forward (r = t) or backward (r = T-1-t):

    Out_r = sum_{r' <= r} lam^(r-r') (A_r . Bm_r') C_r'  +  lam^(r+1+E0) A_r S0'
    Final = lam^(T+E0) S0' + sum_r lam^(T-1-r) Bm_r^T C_r        (times lam^SF_SHIFT)

Forward:  o  = sweep(q, k, v, S0),          E0 = 0, final = S.
Backward (the mirrored split of the blocked form, no flips in memory: the kernel reverses indices):
          dq = sweep(do, v, k, S0^T),        forward frame, E0 = 0;
          dk = sweep(v, do, q, dS^T),        reverse frame, E0 = -1;
          dv = sweep(k, q, do, dS),          reverse frame, E0 = -1, final * lam = dS0.
(In the reverse frame the final-state gradient enters position r with lam^r, not lam^(r+1);
E0 = -1 is applied only to the chunk that starts at r = 0, so lam^(-1) is never formed.)

Parallelism: one program per (b*h, sequence split, DC tile). A program walks its split chunk by
chunk (CHUNK positions) carrying its [DA, BC] state tile in fp32 registers: intra-chunk masked
quadratic term + inter-chunk state term, then the state update. Splitting DC costs recomputing
A Bm^T per tile but keeps the state in registers and gives B*H*DC/BC programs; programs of one
head run side by side, so the re-reads of A and Bm mostly hit L2. For small B*H the sequence can
be cut into a few splits (SweepConfig.n_split): a cheap pre-pass writes each split's local state
contribution [DA, DC] (a few per head, not one per chunk), one small launch folds them into prefixes
(PREFIX_SCAN), and each split starts from the prefix of the earlier ones. The backward's dk and dv
sweeps share one pre-pass: dk's local states (do^T q) are the transposes of dv's (q^T do), read
transposed (WT). All decays are lam^m with
m >= 0 (exp of -s*m, exactly 1 at m = 0), finite for any T and any rate (s = inf: lam = 0).
In the masked sweep (NF 1) the causal masks are wheres, so a non-finite entry of A or Bm at frame position r
never reaches an output at a frame position before r, and C's non-finite entries are zeroed for the intra-chunk
product (the rows at and after them set to NaN). The unmasked sweep (NF 0) multiplies the scores by the decay
matrix, exactly 0 above the diagonal, and C as it is: a non-finite entry of Bm or C would reach earlier rows
through 0 * inf, but either always makes the program's state non-finite (the update Bm^T C sums every valid
row, 0 * inf too), while a non-finite entry of A stays in its own row. So the default (NONFINITE_MODE = 2) runs
the unmasked sweep, each program counting the non-finite entries of its final state, then a masked launch in
which only the programs with a non-zero count run: they redo their split, the others exit at once. fp32 runs
the masked sweep alone.
16-bit widths up to 256 run in one launch per sweep (WIDE_ONE_LAUNCH); fp32 widths over 128 as several launches of
<= 128 (see _sweep). Where T is a multiple of the chunk rows and the
tiles are exactly the widths, the sweeps run a variant without masks whose in-chunk decays are hoisted out of the
loop (EVEN_TILES); other lengths run the masked loop.

Packed sequences (VARLEN, ``lightning_attn_varlen``): the same kernel over one packed row [1, H, T, D] cut
by ``cu_seqlens`` [N + 1]; program (sequence, head, DC tile) loads its sequence's start and end from the
device, offsets its base pointers by the start row and runs the chunk loop over its own length with its own
S0 / final state (row i of [N, H, DA, DC]). No splits; programs start longest sequence first (ORD).

Launchers take tensors of any strides with a unit last-dim stride (else they copy) and return
contiguous outputs, matching the op's fake kernels. Under TRITON_INTERPRET=1 they run on CPU
tensors (fp32/fp16: the interpreter's bf16 tl.dot is broken).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._device import num_sms as _num_sms
from .._launch import cdiv, launch, next_pow2
from .._triton_interp import patch as _patch_interpreter
from ._common import empty_grad, grads_in_layout

_patch_interpreter()

MAX_D = 256          # widest Dk / Dv handled by the Triton path
# How the sweep keeps a non-finite entry of C causal (NF of _la_sweep_kernel): 0 unsafe (benchmarks only),
# 1 always masked, 2 optimistic: the unmasked sweep, then a masked launch in which only the programs whose
# final state came out non-finite run (redo their split). `bench/attention.py --nonfinite-modes 0,1,2` times them.
NONFINITE_MODE = 2
TILE_D = 128         # widest DA / DC of one fp32 launch (and of any without WIDE_ONE_LAUNCH): wider ones are cut
# 16-bit sweeps with DA or DC over TILE_D (heads of Dk or Dv = 256, e.g. the LRPE layer's doubled keys) in one
# launch instead of cut into launches of <= TILE_D (two launches plus an add of partial outputs where DA is cut, each
# launch's programs filling only half the GPU's resident slots at B8 H8): DC over TILE_D takes the default tile
# with more column tiles; DA over TILE_D takes WIDE_DA_CONFIG, the [DA, 32] state tile over 32-row chunks in 4 warps
# on the transposed state (_sweep_chunks_t, whatever STATE_T says): without spills in its loop (sm_90, triton
# 3.6), where the [256, 64] tiles spill. fp32 keeps the cut. Read at each launch. On an H100 (CUDA-graph replays of
# bench/attention.py, docs/benchmarks.md) at B8 H8 T8192 Dk256 Dv128 fwd+bwd 2.781 -> 2.421 ms (forward 0.765 ->
# 0.774: the gain is the backward's).
WIDE_ONE_LAUNCH = True
# The automatic sequence split for small B*H (auto_split): on (bench/attention.py --auto-split and --sweep,
# docs/benchmarks.md); False gives one split at every shape.
AUTO_SPLIT = True
# The backward's dk and dv in one reverse sweep (_la_dkdv_kernel) for fp16 / bf16, else two sweeps (the dk and
# dv sweeps of the docstring; fp32 always). "auto": fused where it was measured faster, Dk and Dv <= FUSED_MAX_D
# (H200, bench/attention.py --sweep: at B8 H16 T8192 D64 the fused sweep took 0.36 ms against 0.25 + 0.25 for
# the two in three calls; the op's fwd+bwd gain, --separate-dkdv, varied between calls. At D128 the fused sweep,
# one program per head holding a [128, 128] fp32 state in 8 warps, took 1.34 ms against 0.51 + 0.51, and the
# same at B2 H8, so D128 keeps two sweeps). True / False force it on / off.
FUSED_DKDV = "auto"
FUSED_MAX_D = 64
# Rows per chunk of the sweeps' default configuration (default_config), read at each launch. 64 is the measured
# default (H200 tile sweep, docs/benchmarks.md). At D128 with 4 warps it spills registers (104 B of stack with
# triton 3.6, 96 B with 3.9) where 32 does not (`python -m tnllm.testing.compiled attention`); 32 was not yet
# timed against it at the op level: `bench/attention.py --chunks 32` does.
CHUNK_ROWS = 64
# The sweeps' configuration for 16-bit state tiles wider than 64 columns (Dv > 64), read at each launch by
# default_config; None (the default): [DA, 64] tiles of CHUNK_ROWS rows in 4 warps, two programs per SM. The
# candidate is SweepConfig(BC=128, CHUNK=32, num_warps=8): the whole [DA, 128] state of a head in one program
# (one per SM), A Bm^T formed once per head instead of once per 64-column tile, and no register spills (246
# registers and 0 bytes of stack forward, 242 / 0 reverse, with triton 3.6 for sm_90, where the default spills
# 104 bytes); it passes the interpreter tests but has not been timed or tested on a GPU. `bench/attention.py`
# times the public op under another value as tnllm_cfg<BC>x<CHUNK>w<warps> (e.g. tnllm_cfg128x32w8).
WIDE_CONFIG: "SweepConfig | None" = None
# The split pre-pass's state tile width (_local_states), read at each launch. None: the sweep's own BC, so a
# [DA, DC] local state is computed as DC / BC column tiles, each program re-reading its split's Bm rows; an int:
# tiles of min(PREPASS_BC, DC) columns (8 warps where the fp32 tile is wider than [128, 64]), Bm read once per
# split when DC fits (16-bit inputs; fp32 keeps the sweep's tiles). `bench/attention.py` times the public op under
# a value as tnllm_prepass<BC> (0: None). 128 (H200, B2 H16 T32768 D128, fwd+bwd): 2.803 -> 2.608 ms alone,
# 2.571 with PREFIX_SCAN (docs/benchmarks.md, "The split pre-pass").
PREPASS_BC: "int | None" = 128
# Fold the split pre-pass's local states into prefixes in one more small launch (_la_prefix_kernel), so that each
# sweep program starts from one stored tile instead of folding all the earlier splits' tiles itself (the program of
# split p reads p tiles of [DA, BC] fp32: at the 385M training shape, 16 splits, up to 15 x 32 KiB). Read at each
# launch; `bench/attention.py` times the public op with it off as tnllm_noprefix (tnllm_prepass<BC>noprefix).
# On (H200, B2 H16 T32768 D128, fwd+bwd): 2.803 -> 2.666 ms alone, 2.571 with PREPASS_BC = 128.
PREFIX_SCAN = True
# The sweep's state update S <- lam^cl S + (kdec * Bm)^T C scales the C tile instead, Bm^T (kdec * C), when its
# BC columns are no wider than Bm's BA: fewer elements to convert and multiply per chunk, and Bm^T is read from
# shared memory as loaded instead of being rebuilt from registers. At D128 (sm_90, triton 3.9, the [128, 64]
# forward tile) the chunk loop goes from 1078 to 927 instructions per thread and its spills from 18 to 9; with the
# unmasked sweep's scores masked by the decay matrix alone (NF 0, no where), to 833 instructions and no spills
# (reverse: 1121 -> 868, 24 spills -> 0; `python -m tnllm.testing.compiled attention`). With the NF 0 scores, on an
# H100 (docs/benchmarks.md, CUDA-graph replays, two calls): fwd+bwd 2.230 -> 1.890 ms at B8 H16 T8192 D128, 2.75 ->
# 2.43 at B2 H16 T32768. Read at each launch.
KDEC_ON_C = True
# The unmasked sweeps (NF 0; the fused dk/dv sweep's too) mask their intra-chunk scores with a where as the masked
# ones do (the code before 2026-12-07), instead of by the decay matrix alone. Off by default.
UNMASKED_WHERE = False
# Where T is a multiple of the chunk rows and the state tile is exactly the widths (BA = DA, BC divides DC), the
# sweeps (and the fused dk/dv sweep) run a variant without masks (EVEN): its loads and stores take none and the
# in-chunk decays are hoisted out of the loop. At D128 (sm_90, the [128, 64] forward tile) 833 -> 696 instructions
# per chunk with triton 3.9, 810 -> 676 with 3.6 (without spills; with 3.9 a 16 B frame outside the loop). On an
# H100 (docs/benchmarks.md, the CUDA-graph replays of bench/attention.py, one run) it was neutral: fwd+bwd 1.890 ->
# 1.878 ms at B8 H16 T8192 D128, 2.427 -> 2.422 at T32k (split), 0.875 -> 0.871 at D64. Read at each launch
# (False: the masked loop at every length).
# `bench/attention.py` times the public op with EVEN_TILES False as tnllm_noeven, True as tnllm_alleven, and with
# all three as they were before 2026-12-07 (KDEC_ON_C off, UNMASKED_WHERE on, EVEN_TILES False) as tnllm_kdecb.
EVEN_TILES = True
# The sweep (with KDEC_ON_C: its state tile no narrower than C's) keeps its state transposed, S^T [BC, BA], with
# every product turned so that the operand held in registers is the left one (_sweep_chunks_t): the state then
# feeds its product from registers, where as the right operand of A S it was written to shared memory every chunk;
# at even lengths the decayed C^T is the product C^T diag(kdec). The masked loop (NF 1) takes the same form, so a
# flagged program's redo reproduces the unmasked loop's finite values bit for bit. Read at each launch: True, False,
# or "auto" (the default): on for state tiles of 128 rows or more (BA >= 128) at even lengths (EVEN_TILES' variant;
# elsewhere the masked reverse loop would spill 2-3 registers per chunk), off otherwise. On an H100 (CUDA-graph
# replays of bench/attention.py, one run, docs/benchmarks.md) fwd+bwd 1.899 -> 1.842 ms at B8 H16 T8192 D128,
# 2.468 -> 2.407 at B2 H16 T32768, 0.463 -> 0.440 at B2 H8 T8192 (the 385M training shape), but 0.873 -> 0.887 at
# B8 H16 T8192 D64 ([64, 64] tiles), hence "auto".
STATE_T: "bool | str" = "auto"
# The decayed left operand of a state update is formed as a product with diag(kdec) (hi + lo in the inputs' dtype,
# summed in fp32: the same tile, rounded once), so the update takes it from registers instead of through shared
# memory: in the split pre-pass (_la_local_state_kernel, Bm^T diag(kdec)) and, at even lengths, in the fused dk/dv
# sweep (q^T diag(kdec)), which then also writes its state to shared memory once for its two products (one of them
# through a transposed view) instead of twice. Read at each launch.
DIAG_DECAY = False


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _lam_pow(log_lam, m):
    """lam^m = exp(log_lam * m) for integer m >= 0, exactly 1 at m = 0 (also for lam = 0, where
    log_lam * 0 = -inf * 0 would be NaN)."""
    return tl.where(m > 0, tl.exp(log_lam * tl.maximum(m, 1).to(tl.float32)), 1.0)


@triton.jit
def _diag_hi_lo(kdec, jj, dtype: tl.constexpr):
    """diag(kdec) [CHUNK, CHUNK] as two matrices in ``dtype`` (hi + lo = kdec to about 16 bits), for _mm_diag."""
    kd = tl.where(jj[:, None] == jj[None, :], kdec[None, :], 0.0)
    kh = kd.to(dtype)
    return kh, (kd - kh.to(tl.float32)).to(dtype)


@triton.jit
def _mm_diag(xt, kh, kl, IEEE: tl.constexpr):
    """xt diag(kdec) in xt's dtype, as two products summed in fp32 (kh, kl from _diag_hi_lo): the same tile as
    xt * kdec rounded once, but an accumulator, which a following product takes from registers (a scaled copy of
    xt would go through shared memory)."""
    return (_mm(xt, kh, IEEE) + _mm(xt, kl, IEEE)).to(xt.dtype)


@triton.jit
def _rows(r0, T, REVERSE: tl.constexpr, CHUNK: tl.constexpr):
    """Row indices (int64, into the T axis) and validity of the chunk starting at frame position r0."""
    rr = r0 + tl.arange(0, CHUNK)
    valid = rr < T
    if REVERSE:
        t = T - 1 - rr
    else:
        t = rr
    return t.to(tl.int64), valid


@triton.jit(do_not_specialize=["T", "H", "n_tiles", "n_prev", "chunks_per_split"])   # one compile per widths/dtype
def _la_local_state_kernel(
    Bp, Cp, W, s_ptr,
    T, H, n_tiles, n_prev, chunks_per_split,
    sb_b, sb_h, sb_t, sc_b, sc_h, sc_t,
    DA: tl.constexpr, DC: tl.constexpr, BA: tl.constexpr, BC: tl.constexpr, CHUNK: tl.constexpr,
    REVERSE: tl.constexpr, IEEE: tl.constexpr, DIAG: tl.constexpr,
):
    """W[bh, p] = sum_{r in split p} lam^(end_p-1-r) Bm_r^T C_r for the splits p < n_split-1 (all full). DIAG: the
    decayed Bm^T is the product Bm^T diag(kdec) (kdec = hi + lo in Bm's dtype, summed in fp32: the same tile as
    Bm^T * kdec, rounded once), whose accumulator feeds the state update from registers."""
    pid = tl.program_id(0)
    tile = pid % n_tiles
    rest = pid // n_tiles
    p = rest % n_prev
    bh = rest // n_prev
    b = bh // H
    h = bh % H
    log_lam = -tl.load(s_ptr + h).to(tl.float32)
    ja = tl.arange(0, BA)
    jc = tile * BC + tl.arange(0, BC)
    jj = tl.arange(0, CHUNK)
    ma = ja < DA
    mc = jc < DC
    b_base = Bp + b.to(tl.int64) * sb_b + h.to(tl.int64) * sb_h
    c_base = Cp + b.to(tl.int64) * sc_b + h.to(tl.int64) * sc_h
    kdec = _lam_pow(log_lam, CHUNK - 1 - jj)
    blk = tl.exp(log_lam * CHUNK)                    # CHUNK >= 1: no -inf * 0
    L = tl.zeros([BA, BC], dtype=tl.float32)
    n0 = p * chunks_per_split
    if DIAG:            # the same for every (full) chunk
        kh, kl = _diag_hi_lo(kdec, jj, Bp.dtype.element_ty)
    for n in range(n0, n0 + chunks_per_split):
        t, _ = _rows(n * CHUNK, T, REVERSE, CHUNK)     # every row valid: the splits before the last are full
        bm = tl.load(b_base + t[:, None] * sb_t + ja[None, :], mask=ma[None, :], other=0.0)
        c = tl.load(c_base + t[:, None] * sc_t + jc[None, :], mask=mc[None, :], other=0.0)
        if DIAG:
            L = L * blk + _mm(_mm_diag(tl.trans(bm), kh, kl, IEEE), c, IEEE)
        else:
            bd = (bm * kdec[:, None]).to(bm.dtype)
            L = L * blk + _mm(tl.trans(bd), c, IEEE)
    w = W + (bh.to(tl.int64) * n_prev + p) * (DA * DC)
    tl.store(w + ja[:, None] * DC + jc[None, :], L, mask=ma[:, None] & mc[None, :])


@triton.jit
def _split_state(W, bh, p, n_split, ja, jc, mS, DA: tl.constexpr, DC: tl.constexpr, WT: tl.constexpr):
    """The [BA, BC] tile of W's state p of program group bh (fp32; WT: stored transposed, [DC, DA])."""
    w = W + (bh.to(tl.int64) * (n_split - 1) + p) * (DA * DC)
    if WT:
        return tl.load(w + jc[None, :] * DA + ja[:, None], mask=mS, other=0.0)
    else:
        return tl.load(w + ja[:, None] * DC + jc[None, :], mask=mS, other=0.0)


@triton.jit
def _start_state(S0, W, b, h, bh, split, n_split, chunks_per_split, s0_b, s0_h, s0_r, s0_c, log_lam, ja, jc, mS,
                 DA: tl.constexpr, DC: tl.constexpr, BA: tl.constexpr, BC: tl.constexpr, CHUNK: tl.constexpr,
                 E0: tl.constexpr, HAS_S0: tl.constexpr, WT: tl.constexpr, PREFIX: tl.constexpr):
    """The state tile a program starts its split from: S0' (or 0) with the earlier splits' local states folded in.
    WT: W holds the local states transposed, [DC, DA] each (the pre-pass of the mirrored sweep, see _sweep).
    PREFIX: W holds the folded prefixes (_la_prefix_kernel), so one tile is read instead of ``split``."""
    if HAS_S0:
        s0 = S0 + b.to(tl.int64) * s0_b + h.to(tl.int64) * s0_h
        S = tl.load(s0 + ja[:, None] * s0_r + jc[None, :] * s0_c, mask=mS, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BA, BC], dtype=tl.float32)
    split_len = chunks_per_split * CHUNK
    if PREFIX:
        if split > 0:
            if HAS_S0:     # S0' decays over the earlier splits: sum of their exponents, E0 once
                S = S * _lam_pow(log_lam, split * split_len + E0)
            S = S + _split_state(W, bh, split - 1, n_split, ja, jc, mS, DA, DC, WT)
    else:
        for p in range(0, split):
            e = split_len + tl.where(p == 0, E0, 0)
            S = S * _lam_pow(log_lam, e) + _split_state(W, bh, p, n_split, ja, jc, mS, DA, DC, WT)
    return S


@triton.jit(do_not_specialize=["H", "n_prev", "split_len"])
def _la_prefix_kernel(W, s_ptr, H, n_prev, split_len, N: tl.constexpr, BLOCK: tl.constexpr):
    """W[bh, p] <- sum_{p' <= p} lam^((p - p') * split_len) W[bh, p'] in place: the split pre-pass's local states
    folded into prefixes (PREFIX_SCAN), so that a sweep program reads one tile instead of all the earlier ones.
    A program per (b*h, BLOCK of the N = DA * DC entries of a state)."""
    pid = tl.program_id(0)
    nblk = tl.cdiv(N, BLOCK)
    bh = pid // nblk
    offs = (pid % nblk) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    lam_len = tl.exp(-tl.load(s_ptr + bh % H).to(tl.float32) * split_len)     # split_len >= 1: no -inf * 0
    base = W + bh.to(tl.int64) * n_prev * N
    P = tl.zeros([BLOCK], dtype=tl.float32)
    for p in range(0, n_prev):
        P = P * lam_len + tl.load(base + p * N + offs, mask=m, other=0.0)
        tl.store(base + p * N + offs, P, mask=m)


@triton.jit
def _add_intra(o, sc, c, causal, IEEE: tl.constexpr, NF: tl.constexpr):
    """o + sc @ c for the masked intra-chunk scores sc [CHUNK, CHUNK]. NF 0: c as it is; NF 1: c's non-finite
    entries zeroed for the product and the rows at and after them (in the frame) set to NaN (a prefix count
    by one small dot, exact in fp16), so a non-finite c row never reaches an earlier row through 0 * inf."""
    if NF == 0:
        o += _mm(sc.to(c.dtype), c, IEEE)
    else:
        cfin = tl.abs(c.to(tl.float32)) < float("inf")
        o += _mm(sc.to(c.dtype), tl.where(cfin, c, tl.zeros_like(c)), IEEE)
        cnt = tl.dot(causal.to(tl.float16), (~cfin).to(tl.float16))
        o = tl.where(cnt > 0, float("nan"), o)
    return o


@triton.jit
def _load_chunk(a_base, b_base, c_base, sa_t, sb_t, sc_t, t, valid, r0, log_lam, jj, ja, jc, ma, mc,
                E0: tl.constexpr, EVEN: tl.constexpr):
    """One chunk's A, Bm and C tiles (EVEN: every chunk full and the tiles exactly the widths, so no masks), the
    state decay's extra exponent es (E0 only at frame 0, where S holds S0' alone) and the state term's row decays
    qdec (for E0 != 0 a select between two loop-invariant vectors, not an exp per chunk)."""
    if EVEN:
        a = tl.load(a_base + t[:, None] * sa_t + ja[None, :])
        bm = tl.load(b_base + t[:, None] * sb_t + ja[None, :])
        c = tl.load(c_base + t[:, None] * sc_t + jc[None, :])
    else:
        a = tl.load(a_base + t[:, None] * sa_t + ja[None, :], mask=valid[:, None] & ma[None, :], other=0.0)
        bm = tl.load(b_base + t[:, None] * sb_t + ja[None, :], mask=valid[:, None] & ma[None, :], other=0.0)
        c = tl.load(c_base + t[:, None] * sc_t + jc[None, :], mask=valid[:, None] & mc[None, :], other=0.0)
    es = tl.where(r0 == 0, E0, 0)
    if E0 == 0:
        qdec = _lam_pow(log_lam, jj + 1)
    else:
        qdec = tl.where(r0 == 0, _lam_pow(log_lam, jj + 1 + E0), _lam_pow(log_lam, jj + 1))
    return a, bm, c, es, qdec


@triton.jit
def _sweep_chunks_t(a_base, b_base, c_base, o_base, sa_t, sb_t, sc_t, so_t, T, n0, n1, St, log_lam, DmT,
                    ja, jc, ma, mc, REVERSE: tl.constexpr, E0: tl.constexpr, CHUNK: tl.constexpr,
                    IEEE: tl.constexpr, NF: tl.constexpr, WHERE0: tl.constexpr, EVEN: tl.constexpr):
    """The loop of _sweep_chunks (the decay on C) on the transposed state St = S^T [BC, BA], every product turned
    so that its register operand is the left one: o^T = St a^T + C^T (Bm a^T * Dm^T), St <- lam^cl St +
    (C^T diag(kdec)) Bm. The state (an accumulator) then feeds its product from registers, where S as the right
    operand of A S went through shared memory every chunk. NF and WHERE0 as in _sweep_chunks, with the same
    arithmetic for finite inputs, so the masked redo of a flagged program gives the unmasked loop's values
    bit for bit wherever its inputs are finite. Returns St."""
    jj = tl.arange(0, CHUNK)
    causalT = jj[None, :] >= jj[:, None]                               # [j, i]: i >= j
    if EVEN:            # every chunk full: diag(kdec) the same for every chunk
        kh, kl = _diag_hi_lo(_lam_pow(log_lam, CHUNK - 1 - jj), jj, c_base.dtype.element_ty)
    for n in range(n0, n1):
        r0 = n * CHUNK
        t, valid = _rows(r0, T, REVERSE, CHUNK)
        a, bm, c, es, qdec = _load_chunk(a_base, b_base, c_base, sa_t, sb_t, sc_t, t, valid, r0, log_lam, jj, ja, jc,
                                         ma, mc, E0, EVEN)
        at = tl.trans(a)
        if NF == 0 and not WHERE0:
            scT = _mm(bm, at, IEEE) * DmT                               # [CHUNK (j), CHUNK (i)]
        else:
            scT = tl.where(causalT, _mm(bm, at, IEEE) * DmT, 0.0)
        oT = _mm(St.to(a.dtype), at, IEEE) * qdec[None, :]
        if NF == 0:
            oT += _mm(tl.trans(c), scT.to(c.dtype), IEEE)               # [BC, CHUNK]
        else:           # C's non-finite entries zeroed for the product, the rows at and after them NaN
            cfin = tl.abs(c.to(tl.float32)) < float("inf")
            oT += _mm(tl.trans(tl.where(cfin, c, tl.zeros_like(c))), scT.to(c.dtype), IEEE)
            cnt = tl.dot(tl.trans((~cfin).to(tl.float16)), causalT.to(tl.float16))
            oT = tl.where(cnt > 0, float("nan"), oT)
        if EVEN:
            tl.store(o_base + t[None, :] * so_t + jc[:, None], oT.to(o_base.dtype.element_ty))
            cl = CHUNK
        else:
            tl.store(o_base + t[None, :] * so_t + jc[:, None], oT.to(o_base.dtype.element_ty),
                     mask=valid[None, :] & mc[:, None])
            cl = tl.minimum(T - r0, CHUNK)
        if EVEN:        # C^T diag(kdec), an accumulator that feeds the next product from registers, where a scaled
            cdT = _mm_diag(tl.trans(c), kh, kl, IEEE)          # copy of C^T went through shared memory
        else:
            kexp = cl - 1 - jj
            kdec = tl.where(kexp >= 0, _lam_pow(log_lam, tl.maximum(kexp, 0)), 0.0)
            cdT = (tl.trans(c) * kdec[None, :]).to(c.dtype)                  # [BC, CHUNK]
        St = St * _lam_pow(log_lam, cl + es) + _mm(cdT, bm, IEEE)
    return St


@triton.jit
def _sweep_chunks(a_base, b_base, c_base, o_base, sa_t, sb_t, sc_t, so_t, T, n0, n1, S, log_lam, Dm, causal,
                  ja, jc, ma, mc, REVERSE: tl.constexpr, E0: tl.constexpr, CHUNK: tl.constexpr,
                  IEEE: tl.constexpr, NF: tl.constexpr, KDEC_C: tl.constexpr, WHERE0: tl.constexpr,
                  EVEN: tl.constexpr, ST: tl.constexpr):
    """The chunks n0..n1-1 of one program (intra-chunk term + state term, then the state update); returns S.
    NF: 0 masks the scores by the decay matrix Dm (0 above the diagonal) and multiplies C as it is (a non-finite
    Bm or C row reaches earlier rows through 0 * inf: exact for finite inputs, the rest caught by the final
    state's flag); 1 masks the scores with a where, zeroes C's non-finite entries for the intra product and sets
    the rows at and after them to NaN (a prefix count by one small dot, exact in fp16). WHERE0: NF 0 masks the
    scores with the where as well (the loop as it was before 2026-12-07). KDEC_C: the state update's in-chunk
    decay scales the C tile (Bm^T (kdec * C)) instead of the Bm tile ((kdec * Bm)^T C): the same product, one
    rounding of the scaled tile either way, on the narrower tile (BC columns against BA). EVEN: T is a multiple of
    CHUNK and the tiles are exactly the widths (BA = DA, BC divides DC), so the loads and stores take no masks and
    every chunk's in-chunk decays are the same. ST: with KDEC_C, the loop runs on the transposed state
    (_sweep_chunks_t)."""
    jj = tl.arange(0, CHUNK)
    if ST and KDEC_C:
        return tl.trans(_sweep_chunks_t(a_base, b_base, c_base, o_base, sa_t, sb_t, sc_t, so_t, T, n0, n1,
                                        tl.trans(S), log_lam, tl.trans(Dm), ja, jc, ma, mc, REVERSE, E0, CHUNK,
                                        IEEE, NF, WHERE0, EVEN))
    for n in range(n0, n1):
        r0 = n * CHUNK
        t, valid = _rows(r0, T, REVERSE, CHUNK)
        a, bm, c, es, qdec = _load_chunk(a_base, b_base, c_base, sa_t, sb_t, sc_t, t, valid, r0, log_lam, jj, ja, jc,
                                         ma, mc, E0, EVEN)
        if NF == 0 and not WHERE0:  # Dm is 0 above the diagonal; a non-finite Bm is caught by the state's flag
            sc = _mm(a, tl.trans(bm), IEEE) * Dm
        else:           # a where: a non-finite Bm row stays in its own (later) column of the scores
            sc = tl.where(causal, _mm(a, tl.trans(bm), IEEE) * Dm, 0.0)
        o = _add_intra(_mm(a, S.to(a.dtype), IEEE) * qdec[:, None], sc, c, causal, IEEE, NF)
        if EVEN:        # and the in-chunk decays the same for every chunk (hoisted out of the loop)
            tl.store(o_base + t[:, None] * so_t + jc[None, :], o.to(o_base.dtype.element_ty))
            cl = CHUNK
        else:
            tl.store(o_base + t[:, None] * so_t + jc[None, :], o.to(o_base.dtype.element_ty),
                     mask=valid[:, None] & mc[None, :])
            cl = tl.minimum(T - r0, CHUNK)
        kexp = cl - 1 - jj
        kdec = tl.where(kexp >= 0, _lam_pow(log_lam, tl.maximum(kexp, 0)), 0.0)
        if KDEC_C:      # the decay on the [CHUNK, BC] C tile; Bm^T read as it is (from shared memory)
            cd = (c * kdec[:, None]).to(c.dtype)
            S = S * _lam_pow(log_lam, cl + es) + _mm(tl.trans(bm), cd, IEEE)
        else:           # the decay on the [CHUNK, BA] Bm tile
            bd = (bm * kdec[:, None]).to(bm.dtype)
            S = S * _lam_pow(log_lam, cl + es) + _mm(tl.trans(bd), c, IEEE)
    return S


@triton.jit
def _sweep_program(
    pid, A, Bp, Cp, O, S0, SF, W, s_ptr, FL, CU, ORD,
    T, H, n_tiles, n_split, chunks_per_split,
    sa_b, sa_h, sa_t, sb_b, sb_h, sb_t, sc_b, sc_h, sc_t, so_b, so_h, so_t,
    s0_b, s0_h, s0_r, s0_c, sf_b, sf_h, sf_r, sf_c,
    DA: tl.constexpr, DC: tl.constexpr, BA: tl.constexpr, BC: tl.constexpr, CHUNK: tl.constexpr,
    REVERSE: tl.constexpr, E0: tl.constexpr, HAS_S0: tl.constexpr, WRITE_SF: tl.constexpr,
    SF_SHIFT: tl.constexpr, IEEE: tl.constexpr, NF: tl.constexpr, WRITE_FLAG: tl.constexpr, VARLEN: tl.constexpr,
    WT: tl.constexpr, PREFIX: tl.constexpr, KDEC_C: tl.constexpr, WHERE0: tl.constexpr, EVEN: tl.constexpr,
    ST: tl.constexpr,
):
    """One program of the sweep: its (b*h, split, DC tile) from pid, the chunk loop, the final state; with
    WRITE_FLAG, FL[pid] = the number of non-finite entries of its final state tile."""
    tile = pid % n_tiles
    rest = pid // n_tiles
    split = rest % n_split
    bh = rest // n_split
    h = bh % H
    if VARLEN:
        # packed sequences (batch 1): b is the sequence (programs in the order ORD, longest first), its
        # rows [bos, bos + T) of the T axis; the states are indexed by b
        b = tl.load(ORD + bh // H).to(tl.int64)
        bos = tl.load(CU + b).to(tl.int64)
        T = (tl.load(CU + b + 1).to(tl.int64) - bos).to(tl.int32)
        ra, rb, rc, ro = bos * sa_t, bos * sb_t, bos * sc_t, bos * so_t
    else:
        b = bh // H
        ra, rb, rc, ro = b.to(tl.int64) * sa_b, b.to(tl.int64) * sb_b, b.to(tl.int64) * sc_b, b.to(tl.int64) * so_b
    log_lam = -tl.load(s_ptr + h).to(tl.float32)
    ja = tl.arange(0, BA)
    jc = tile * BC + tl.arange(0, BC)
    jj = tl.arange(0, CHUNK)
    ma = ja < DA
    mc = jc < DC
    mS = ma[:, None] & mc[None, :]

    S = _start_state(S0, W, b, h, bh, split, n_split, chunks_per_split, s0_b, s0_h, s0_r, s0_c, log_lam,
                     ja, jc, mS, DA, DC, BA, BC, CHUNK, E0, HAS_S0, WT, PREFIX)
    diff = jj[:, None] - jj[None, :]
    causal = diff >= 0
    Dm = tl.where(causal, _lam_pow(log_lam, tl.maximum(diff, 0)), 0.0)
    a_base = A + ra + h.to(tl.int64) * sa_h
    b_base = Bp + rb + h.to(tl.int64) * sb_h
    c_base = Cp + rc + h.to(tl.int64) * sc_h
    o_base = O + ro + h.to(tl.int64) * so_h
    n_chunks = tl.cdiv(T, CHUNK)
    n0 = split * chunks_per_split
    n1 = tl.minimum(n0 + chunks_per_split, n_chunks)
    S = _sweep_chunks(a_base, b_base, c_base, o_base, sa_t, sb_t, sc_t, so_t, T, n0, n1, S, log_lam, Dm, causal,
                      ja, jc, ma, mc, REVERSE, E0, CHUNK, IEEE, NF, KDEC_C, WHERE0, EVEN, ST)
    if WRITE_FLAG:   # a non-finite entry of C always reaches the state (Bm^T C sums every valid row, 0 * inf too)
        tl.store(FL + pid, tl.sum((~(tl.abs(S) < float("inf"))).to(tl.int32)))

    if WRITE_SF:
        if split == n_split - 1:
            if SF_SHIFT:
                if VARLEN:      # an empty sequence passes its final-state gradient through unchanged
                    S = S * tl.where(T > 0, tl.exp(log_lam), 1.0)
                else:
                    S = S * tl.exp(log_lam)
            sf = SF + b.to(tl.int64) * sf_b + h.to(tl.int64) * sf_h
            tl.store(sf + ja[:, None] * sf_r + jc[None, :] * sf_c, S, mask=mS)


# Unspecialised: the length, the grid's factors and the state strides (read once per program; a transposed
# S0 view then shares the compile of a plain one): one compile per widths, dtype and flags.
@triton.jit(do_not_specialize=["T", "H", "n_tiles", "n_split", "chunks_per_split",
                               "s0_b", "s0_h", "s0_r", "s0_c", "sf_b", "sf_h", "sf_r", "sf_c"])
def _la_sweep_kernel(
    A, Bp, Cp, O, S0, SF, W, s_ptr, FL, CU, ORD,
    T, H, n_tiles, n_split, chunks_per_split,
    sa_b, sa_h, sa_t, sb_b, sb_h, sb_t, sc_b, sc_h, sc_t, so_b, so_h, so_t,
    s0_b, s0_h, s0_r, s0_c, sf_b, sf_h, sf_r, sf_c,
    DA: tl.constexpr, DC: tl.constexpr, BA: tl.constexpr, BC: tl.constexpr, CHUNK: tl.constexpr,
    REVERSE: tl.constexpr, E0: tl.constexpr, HAS_S0: tl.constexpr, WRITE_SF: tl.constexpr,
    SF_SHIFT: tl.constexpr, IEEE: tl.constexpr, NF: tl.constexpr, WRITE_FLAG: tl.constexpr, REDO: tl.constexpr,
    VARLEN: tl.constexpr, WT: tl.constexpr, PREFIX: tl.constexpr, KDEC_C: tl.constexpr, WHERE0: tl.constexpr,
    EVEN: tl.constexpr, ST: tl.constexpr,
):
    """A program per (b*h, split, DC tile). REDO: only the programs with FL[pid] != 0 run (the masked redo
    launch of the optimistic mode, see _sweep)."""
    pid = tl.program_id(0)
    if REDO:
        if tl.load(FL + pid) != 0:
            _sweep_program(pid, A, Bp, Cp, O, S0, SF, W, s_ptr, FL, CU, ORD, T, H, n_tiles, n_split, chunks_per_split,
                           sa_b, sa_h, sa_t, sb_b, sb_h, sb_t, sc_b, sc_h, sc_t, so_b, so_h, so_t,
                           s0_b, s0_h, s0_r, s0_c, sf_b, sf_h, sf_r, sf_c,
                           DA, DC, BA, BC, CHUNK, REVERSE, E0, HAS_S0, WRITE_SF, SF_SHIFT, IEEE, NF, False, VARLEN,
                           WT, PREFIX, KDEC_C, WHERE0, EVEN, ST)
    else:
        _sweep_program(pid, A, Bp, Cp, O, S0, SF, W, s_ptr, FL, CU, ORD, T, H, n_tiles, n_split, chunks_per_split,
                       sa_b, sa_h, sa_t, sb_b, sb_h, sb_t, sc_b, sc_h, sc_t, so_b, so_h, so_t,
                       s0_b, s0_h, s0_r, s0_c, sf_b, sf_h, sf_r, sf_c,
                       DA, DC, BA, BC, CHUNK, REVERSE, E0, HAS_S0, WRITE_SF, SF_SHIFT, IEEE, NF, WRITE_FLAG, VARLEN,
                       WT, PREFIX, KDEC_C, WHERE0, EVEN, ST)


@triton.jit(do_not_specialize=["T", "H", "n_split", "chunks_per_split",
                               "g0_b", "g0_h", "g0_r", "g0_c", "sf_b", "sf_h", "sf_r", "sf_c"])
def _la_dkdv_kernel(
    Q, K, V, DO, DK, DV, G0, SF, W, s_ptr, FL,
    T, H, n_split, chunks_per_split,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sd_b, sd_h, sd_t,
    sdk_b, sdk_h, sdk_t, sdv_b, sdv_h, sdv_t,
    g0_b, g0_h, g0_r, g0_c, sf_b, sf_h, sf_r, sf_c,
    DKW: tl.constexpr, DVW: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CHUNK: tl.constexpr,
    HAS_G0: tl.constexpr, IEEE: tl.constexpr, NF: tl.constexpr, WRITE_FLAG: tl.constexpr, REDO: tl.constexpr,
    PREFIX: tl.constexpr, WHERE0: tl.constexpr, EVEN: tl.constexpr, DIAG: tl.constexpr,
):
    """dk and dv in one reverse sweep (the dk and dv sweeps of the module docstring share their state: the dk
    sweep's is the transpose of the dv sweep's, G = sum lam^.. q^T do). A program per (b*h, split) holds the
    whole [Dk, Dv] tile of G in fp32 and per chunk loads q, k, v, do once:
        dk = ((v do^T) * D) q + lam^(i+1) v G^T,   dv = ((k q^T) * D) do + lam^(i+1) k G,
        G <- lam^CHUNK G + (q * lam^(CHUNK-1-i))^T do,
    and the last split writes SF = lam * G (the initial-state gradient). FL / REDO / NF as in _la_sweep_kernel
    (NF masks q's non-finite entries in dk's intra product and do's in dv's). Not for packed sequences."""
    pid = tl.program_id(0)
    split = pid % n_split
    bh = pid // n_split
    h = bh % H
    b = (bh // H).to(tl.int64)
    rq, rk, rv, rd, rdk, rdv = b * sq_b, b * sk_b, b * sv_b, b * sd_b, b * sdk_b, b * sdv_b
    hh = h.to(tl.int64)
    q_base = Q + rq + hh * sq_h
    k_base = K + rk + hh * sk_h
    v_base = V + rv + hh * sv_h
    d_base = DO + rd + hh * sd_h
    dk_base = DK + rdk + hh * sdk_h
    dv_base = DV + rdv + hh * sdv_h
    log_lam = -tl.load(s_ptr + h).to(tl.float32)
    jk = tl.arange(0, BK)
    jv = tl.arange(0, BV)
    jj = tl.arange(0, CHUNK)
    mk = jk < DKW
    mv = jv < DVW
    mS = mk[:, None] & mv[None, :]
    G = _start_state(G0, W, b, h, bh, split, n_split, chunks_per_split, g0_b, g0_h, g0_r, g0_c, log_lam,
                     jk, jv, mS, DKW, DVW, BK, BV, CHUNK, -1, HAS_G0, False, PREFIX)
    diff = jj[:, None] - jj[None, :]
    causal = diff >= 0
    Dm = tl.where(causal, _lam_pow(log_lam, tl.maximum(diff, 0)), 0.0)
    n_chunks = tl.cdiv(T, CHUNK)
    n0 = split * chunks_per_split
    n1 = tl.minimum(n0 + chunks_per_split, n_chunks)
    last = split == n_split - 1
    if DIAG and EVEN:   # the same for every (full) chunk
        kh, kl = _diag_hi_lo(_lam_pow(log_lam, CHUNK - 1 - jj), jj, Q.dtype.element_ty)
    if REDO:            # only the programs whose flag is set run their chunks and store
        run = tl.load(FL + pid) != 0
        n1 = tl.where(run, n1, n0)
        last = last & run
    for n in range(n0, n1):
        r0 = n * CHUNK
        t, valid = _rows(r0, T, True, CHUNK)
        if EVEN:        # every chunk full, the tiles exactly the widths (as in _sweep_chunks): no masks
            q = tl.load(q_base + t[:, None] * sq_t + jk[None, :])
            k = tl.load(k_base + t[:, None] * sk_t + jk[None, :])
            v = tl.load(v_base + t[:, None] * sv_t + jv[None, :])
            do = tl.load(d_base + t[:, None] * sd_t + jv[None, :])
        else:
            vk = valid[:, None] & mk[None, :]
            vv = valid[:, None] & mv[None, :]
            q = tl.load(q_base + t[:, None] * sq_t + jk[None, :], mask=vk, other=0.0)
            k = tl.load(k_base + t[:, None] * sk_t + jk[None, :], mask=vk, other=0.0)
            v = tl.load(v_base + t[:, None] * sv_t + jv[None, :], mask=vv, other=0.0)
            do = tl.load(d_base + t[:, None] * sd_t + jv[None, :], mask=vv, other=0.0)
        es = tl.where(r0 == 0, -1, 0)               # the chunk at frame 0 takes G0 with lam^i, not lam^(i+1)
        qdec = tl.where(r0 == 0, _lam_pow(log_lam, jj), _lam_pow(log_lam, jj + 1))     # loop-invariant vectors
        if NF == 0 and not WHERE0:  # as in _sweep_chunks: a non-finite do or q always makes G non-finite
            s1 = _mm(v, tl.trans(do), IEEE) * Dm
        else:
            s1 = tl.where(causal, _mm(v, tl.trans(do), IEEE) * Dm, 0.0)
        if DIAG:        # one 16-bit copy of the state in shared memory for both products (the other a
            Gb = G.to(v.dtype)  # transposed view of it), where two were written
            Gt = tl.trans(Gb)
        else:           # (the default converts each copy where it is used: moved up, its SASS changes)
            Gt = tl.trans(G).to(v.dtype)
        dk = _add_intra(_mm(v, Gt, IEEE) * qdec[:, None], s1, q, causal, IEEE, NF)
        if EVEN:
            tl.store(dk_base + t[:, None] * sdk_t + jk[None, :], dk.to(dk_base.dtype.element_ty))
        else:
            tl.store(dk_base + t[:, None] * sdk_t + jk[None, :], dk.to(dk_base.dtype.element_ty), mask=vk)
        if NF == 0 and not WHERE0:
            s2 = _mm(k, tl.trans(q), IEEE) * Dm
        else:
            s2 = tl.where(causal, _mm(k, tl.trans(q), IEEE) * Dm, 0.0)
        if not DIAG:
            Gb = G.to(k.dtype)
        dv = _add_intra(_mm(k, Gb, IEEE) * qdec[:, None], s2, do, causal, IEEE, NF)
        if EVEN:
            tl.store(dv_base + t[:, None] * sdv_t + jv[None, :], dv.to(dv_base.dtype.element_ty))
            cl = CHUNK
        else:
            tl.store(dv_base + t[:, None] * sdv_t + jv[None, :], dv.to(dv_base.dtype.element_ty), mask=vv)
            cl = tl.minimum(T - r0, CHUNK)
        if DIAG and EVEN:   # q^T diag(kdec)
            G = G * _lam_pow(log_lam, cl + es) + _mm(_mm_diag(tl.trans(q), kh, kl, IEEE), do, IEEE)
        else:
            kexp = cl - 1 - jj
            kdec = tl.where(kexp >= 0, _lam_pow(log_lam, tl.maximum(kexp, 0)), 0.0)
            qd = (q * kdec[:, None]).to(q.dtype)
            G = G * _lam_pow(log_lam, cl + es) + _mm(tl.trans(qd), do, IEEE)
    if WRITE_FLAG:
        tl.store(FL + pid, tl.sum((~(tl.abs(G) < float("inf"))).to(tl.int32)))
    if last:
        G = G * tl.exp(log_lam)
        sf = SF + b * sf_b + hh * sf_h
        tl.store(sf + jk[:, None] * sf_r + jv[None, :] * sf_c, G, mask=mS)


@dataclass(frozen=True)
class SweepConfig:
    """Tiles and launch parameters of one sweep. ``n_split=0``: automatic (see _sweep, auto_split).
    ``num_stages=1`` gave a wrong output at T = 1 on the H200 (triton 3.6); no default uses it."""
    BC: int = 64
    CHUNK: int = 64
    num_warps: int = 4
    num_stages: int = 2
    n_split: int = 0
    nonfinite: int = -1     # the masking of non-finite C entries (NF of _la_sweep_kernel); -1: NONFINITE_MODE

    @classmethod
    def from_spec(cls, spec: str) -> "SweepConfig":
        """``"<BC>x<CHUNK>w<warps>"`` (e.g. ``"128x32w8"``) -> SweepConfig(BC, CHUNK, num_warps), 2 stages, automatic
        splits: how the benchmark and the test option ``--sweep-wide`` name a configuration."""
        try:
            bc, rest = spec.split("x")
            chunk, warps = rest.split("w")
            return cls(BC=int(bc), CHUNK=int(chunk), num_warps=int(warps), num_stages=2)
        except ValueError:
            raise ValueError(f"SweepConfig.from_spec: expected '<BC>x<CHUNK>w<warps>' (e.g. '128x32w8'), got "
                             f"{spec!r}") from None


# The sweeps' configuration for 16-bit state tiles of more than TILE_D rows (DA over 128) where WIDE_ONE_LAUNCH runs
# them in one launch: [DA, 32] tiles over 32-row chunks in 4 warps, two programs per SM.
WIDE_DA_CONFIG = SweepConfig(BC=32, CHUNK=32, num_warps=4, num_stages=2)


def auto_split(programs: int, n_chunks: int, num_sms: int, per_sm: int = 2) -> int:
    """Sequence splits for a sweep of ``programs`` (b*h, DC tile) programs over ``n_chunks`` chunks: 1 when
    the programs fill at least half the SMs (``2 * programs > num_sms``) or the sequence is short (< 8
    chunks). Else the split count k (at most 16, each split at least 4 chunks long) that minimises the
    chunk steps of the slowest program, waves x chunks per split, counting ``per_sm`` resident programs per SM
    (waves = ceil(programs * k / (per_sm * num_sms)); two for the 4-warp tiles, one for 8 warps, whose ~250
    registers per thread fill the register file); ties go to more splits. Whole waves matter: on the H200
    (132 SMs) at B2 H8 T8192 D128 (32 programs, 128 chunks; the 385M training step) the forward sweep took
    0.161 ms with 4 splits, 0.240 with 9 (288 programs: a third wave almost empty) and 0.135 with 16
    (bench/attention.py --sweep --sweep-shapes train). A split costs a pre-pass over its Bm and C rows, so
    it pays only where most SMs would otherwise idle: at 128 programs (B8 H16 D64, one tile) 3 splits were
    slower, 1.30 -> 1.70 ms fwd+bwd, so those run unsplit."""
    if 2 * programs > num_sms or n_chunks < 8:
        return 1
    key = (programs, n_chunks, num_sms, per_sm)
    best = _AUTO_SPLIT_MEMO.get(key)
    if best is None:
        if len(_AUTO_SPLIT_MEMO) > 4096:        # many distinct lengths (e.g. prefills of every prompt length)
            _AUTO_SPLIT_MEMO.clear()
        best = _AUTO_SPLIT_MEMO[key] = _min_cost_split(programs, n_chunks, per_sm * num_sms)
    return best


_AUTO_SPLIT_MEMO: dict = {}     # (programs, n_chunks, num_sms, per_sm) -> splits: a launch asks again every call


def _min_cost_split(programs: int, n_chunks: int, slots: int) -> int:
    best_cost, best = None, 1
    for k in range(1, min(16, n_chunks // 4) + 1):
        cps = -(-n_chunks // k)
        k_eff = -(-n_chunks // cps)                  # the splits _sweep actually launches
        cost = -(-programs * k_eff // slots) * cps
        if best_cost is None or cost <= best_cost:
            best_cost, best = cost, k_eff
    return best


def _flag(name: str) -> bool:
    """The boolean module setting ``name`` (AUTO_SPLIT, PREFIX_SCAN, KDEC_ON_C, UNMASKED_WHERE, EVEN_TILES,
    DIAG_DECAY, WIDE_ONE_LAUNCH), checked at each launch."""
    value = globals()[name]
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _state_t(BA: int, even: bool) -> bool:
    """Whether a sweep of a [BA, BC] state tile runs its loop on the transposed state (STATE_T, checked at each
    launch: "auto" means BA >= 128 at even lengths, ``even``: the unmasked-tile variant, where it was timed; the
    masked loop of the reverse frame spills a few registers on the transposed state, 2-3 loads / stores per chunk).
    Tiles of more than TILE_D rows (WIDE_DA_CONFIG's) always take it: the [256, 32] tile spills less so."""
    value = STATE_T
    if not (isinstance(value, bool) or (isinstance(value, str) and value == "auto")):
        raise ValueError(f"STATE_T must be True, False or 'auto', got {value!r}")
    if BA > TILE_D:
        return True
    return BA >= 128 and even if value == "auto" else value


def _pow2(n: int) -> int:
    return max(16, next_pow2(n))


def default_config(DA: int, DC: int, dtype: torch.dtype) -> SweepConfig:
    """Tile choice (H200 sweep in docs/benchmarks.md): state tile [DA <= 128, BC = 64] fp32 in
    registers, CHUNK_ROWS rows per chunk, 4 warps, 2 stages; fp32 (ieee dots) takes BC = 32; WIDE_CONFIG, when
    set, for 16-bit tiles wider than 64; WIDE_DA_CONFIG for 16-bit tiles of more than TILE_D rows (launched only
    with WIDE_ONE_LAUNCH). Only configurations that passed the GPU suite on triton 3.6 / H200 are defaults
    (launches with DA or DC = 256 did not: see _sweep). Memoised on its inputs and the module settings it reads
    (a launch asks on every sweep)."""
    key = (DA, DC, dtype, WIDE_CONFIG, CHUNK_ROWS, WIDE_DA_CONFIG)
    cfg = _CONFIG_MEMO.get(key)
    if cfg is None:
        if _pow2(DA) > TILE_D and dtype != torch.float32:      # only reached with WIDE_ONE_LAUNCH
            cfg = WIDE_DA_CONFIG
        elif WIDE_CONFIG is not None and dtype != torch.float32 and _pow2(DC) > 64:
            cfg = WIDE_CONFIG
        else:
            BC = min(_pow2(DC), 64)
            if dtype == torch.float32:
                BC = min(BC, 32)
            cfg = SweepConfig(BC=BC, CHUNK=CHUNK_ROWS, num_warps=4, num_stages=2)
        if len(_CONFIG_MEMO) > 1024:
            _CONFIG_MEMO.clear()
        _CONFIG_MEMO[key] = cfg
    return cfg


_CONFIG_MEMO: dict = {}


def _last_unit(x: Tensor) -> Tensor:
    """``x`` itself when its last stride is 1 and its base and row strides are 16-byte aligned, else a
    contiguous copy. The model's layouts (views of the fused qkvu projection) pass as they are; a view
    with a misaligned start or row stride (e.g. ``t[..., 1:D + 1]`` of a wider tensor) faulted on the
    H200 (illegal memory access in the backward sweeps), so it is copied first. The copy is a ``clone``:
    ``contiguous()`` returns such a view itself when every dimension but the last has size 1 (T = 1 at
    B = H = 1: ``is_contiguous`` ignores the strides of size-1 dimensions), and that view, misaligned,
    gave wrong outputs in bf16 and illegal memory accesses in fp16 on the H200 (triton 3.6)."""
    st = x.stride()
    if (st[-1] == 1 or x.shape[-1] == 1) and x.data_ptr() % 16 == 0:
        outer = 0
        for v in st[:-1]:
            outer |= v
        # elements per 16 bytes (a power of 2): every outer stride a multiple of it, i.e. of their bitwise or
        if outer % (16 // x.element_size()) == 0:
            return x
    return x.clone(memory_format=torch.contiguous_format)


def _split_plan(n_split: int, programs: int, n_chunks: int, device, num_warps: int = 4) -> tuple[int, int]:
    """(splits, chunks per split) of a sweep: ``n_split`` <= 0 is automatic (one split unless AUTO_SPLIT, see
    auto_split, for ``programs`` programs per split of ``num_warps`` warps); every split non-empty, all but the
    last full."""
    if n_split <= 0:
        per_sm = 2 if num_warps <= 4 else 1
        n_split = auto_split(programs, n_chunks, _num_sms(device), per_sm) if _flag("AUTO_SPLIT") else 1
    n_split = max(1, min(n_split, n_chunks))
    cps = cdiv(n_chunks, n_split)
    return cdiv(n_chunks, cps), cps


def _local_states(Bm: Tensor, C: Tensor, s32: Tensor, n_split: int, cps: int, *, BC: int, CHUNK: int,
                  reverse: bool, ieee: bool, num_warps: int, num_stages: int, prefix: bool = False) -> Tensor:
    """The split pre-pass: each earlier split's local state [DA, DC] (fp32, flat [B * H * (n_split - 1) * DA * DC]),
    or ``s32`` itself (never read) for one split. ``prefix``: folded into prefixes (PREFIX_SCAN)."""
    if n_split == 1:
        return s32
    B, H, T, DA = Bm.shape
    DC = C.shape[-1]
    if PREPASS_BC is not None and not ieee:
        BC = min(_pow2(PREPASS_BC), _pow2(DC))
        num_warps = 8 if _pow2(DA) * BC > 128 * 64 else num_warps
    W = torch.empty(B * H * (n_split - 1) * DA * DC, device=C.device, dtype=torch.float32)
    n_tiles = cdiv(DC, BC)
    launch(_la_local_state_kernel, B * H * (n_split - 1) * n_tiles,
           (Bm, C, W, s32, T, H, n_tiles, n_split - 1, cps, *Bm.stride()[:3], *C.stride()[:3]),
           dict(DA=DA, DC=DC, BA=_pow2(DA), BC=BC, CHUNK=CHUNK, REVERSE=reverse, IEEE=ieee,
                DIAG=_flag("DIAG_DECAY") and not ieee, num_warps=num_warps, num_stages=num_stages))
    if prefix and n_split > 2:
        N = DA * DC
        BLOCK = min(1024, _pow2(N))
        launch(_la_prefix_kernel, B * H * cdiv(N, BLOCK), (W, s32, H, n_split - 1, cps * CHUNK),
               dict(N=N, BLOCK=BLOCK, num_warps=4))
    return W


def _sweep(A: Tensor, Bm: Tensor, C: Tensor, s: Tensor, S0: Tensor | None, *, reverse: bool, e0: int,
           final: Tensor | None = None, sf_shift: bool = False, cfg: SweepConfig | None = None,
           out: Tensor | None = None, cu: Tensor | None = None, order: Tensor | None = None,
           local: dict | None = None) -> Tensor:
    """One sweep (module docstring). A, Bm [B, H, T, DA]; C [B, H, T, DC]; S0 [B, H, DA, DC] view or None;
    ``final`` [B, H, DA, DC] fp32 view to receive the final state; ``out`` an optional [B, H, T, DC]
    view (unit last stride) to write. Returns Out [B, H, T, DC] in C's dtype (contiguous if allocated here).

    Packed sequences: ``cu`` (int32/int64 [N + 1] on the device, read only by the kernel) cuts the one row
    (B = 1) into N sequences, each swept on its own from its own state; S0 and ``final`` are then
    [N, H, DA, DC]. ``order`` (int32 [N]) is the order in which the sequences' programs are launched.

    ``local``: a dict shared by two mirrored sweeps (the backward's dv sweep, Bm = q and C = do, then its dk sweep,
    Bm = do and C = q, both in the reverse frame), whose split pre-passes give transposed local states. The first
    sweep that splits stores its pre-pass there; the second reads it transposed (WT) instead of running its own,
    when its split plan, chunk rows and widths mirror the first's.

    With WIDE_ONE_LAUNCH (the default), 16-bit widths up to MAX_D run in one launch (DA over TILE_D on
    WIDE_DA_CONFIG's tile). Otherwise, and in fp32, widths over TILE_D are cut into launches of <= TILE_D (the
    first 256-wide launches, [256, 32] tiles over 64-row chunks in 8 warps and one stage, faulted or gave wrong
    results on triton 3.6 / H200): DC by column slices of Out, S0 and the final state; DA by summing the partial
    outputs (the sweep is linear in a split of the A.Bm contraction, and S0 / the final state split by rows)."""
    B, H, T, DA = A.shape
    DC = C.shape[-1]
    if out is None:
        out = torch.empty(B, H, T, DC, device=C.device, dtype=C.dtype)
    # fp32 (ieee dots: not the fast path) always masks: one kernel to compile, not two
    nf = cfg.nonfinite if cfg is not None and cfg.nonfinite >= 0 else (1 if A.dtype == torch.float32 else NONFINITE_MODE)
    kw = dict(reverse=reverse, e0=e0, sf_shift=sf_shift, cfg=cfg, cu=cu, order=order)
    tile_d = MAX_D if _flag("WIDE_ONE_LAUNCH") and A.dtype != torch.float32 else TILE_D
    if DC > tile_d:
        for c0 in range(0, DC, TILE_D):
            sl = slice(c0, c0 + TILE_D)
            _sweep(A, Bm, C[..., sl], s, None if S0 is None else S0[..., sl],
                   final=None if final is None else final[..., sl], out=out[..., sl], **kw)
        return out
    if DA > tile_d:
        for a0 in range(0, DA, TILE_D):
            sl = slice(a0, a0 + TILE_D)
            part = _sweep(A[..., sl], Bm[..., sl], C, s, None if S0 is None else S0[..., sl, :],
                          final=None if final is None else final[..., sl, :], out=out if a0 == 0 else None, **kw)
            if a0:
                out.add_(part)
        return out
    cfg = cfg or default_config(DA, DC, A.dtype)
    A, Bm, C = _last_unit(A), _last_unit(Bm), _last_unit(C)
    assert out.stride(-1) == 1
    BA = _pow2(DA)
    BC = min(cfg.BC, _pow2(DC))
    CHUNK = cfg.CHUNK
    n_tiles = cdiv(DC, BC)
    n_chunks = cdiv(T, CHUNK)
    n_split = cfg.n_split
    varlen = cu is not None
    if varlen:
        # one program walks one whole sequence: no split pre-pass (its local states would be per sequence)
        assert B == 1 and order is not None
        n_split = 1
    n_split, cps = _split_plan(n_split, B * H * n_tiles, n_chunks, C.device, cfg.num_warps)
    s32 = s.to(device=C.device, dtype=torch.float32).contiguous()
    ieee = A.dtype == torch.float32
    prefix = _flag("PREFIX_SCAN") and n_split > 1
    plan = (n_split, cps, CHUNK, reverse, e0, B, H, T, prefix)
    wt = local is not None and n_split > 1 and local.get("plan") == plan and local.get("widths") == (DC, DA)
    if wt:
        W = local["W"]
    else:
        W = _local_states(Bm, C, s32, n_split, cps, BC=BC, CHUNK=CHUNK, reverse=reverse, ieee=ieee,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages, prefix=prefix)
        if local is not None and n_split > 1:
            local.update(W=W, plan=plan, widths=(DA, DC))
    s0 = S0 if S0 is not None else s32
    s0_st = tuple(S0.stride()) if S0 is not None else (0, 0, 0, 0)
    # The final state is always stored (to scratch when unused): on triton 3.6 / H200 the variant
    # whose last state is dead gave wrong results with 4 DC tiles (tests/gpu); the store costs
    # B*H*DA*DC*4 bytes, ~0.5% of a sweep's traffic.
    NS = cu.shape[0] - 1 if varlen else B           # states (and program groups): sequences or rows
    sf = final if final is not None else torch.empty(NS, H, DA, DC, device=C.device, dtype=torch.float32)
    sf_st = tuple(sf.stride())
    grid = NS * H * n_split * n_tiles
    fl = torch.empty(grid, device=C.device, dtype=torch.int32) if nf == 2 else s32
    args = (A, Bm, C, out, s0, sf, W, s32, fl, cu if varlen else s32, order if varlen else s32, T, H, n_tiles, n_split, cps,
            *A.stride()[:3], *Bm.stride()[:3], *C.stride()[:3], *out.stride()[:3], *s0_st, *sf_st)
    even = _flag("EVEN_TILES") and not varlen and T % CHUNK == 0 and BA == DA and DC % BC == 0
    kw = dict(DA=DA, DC=DC, BA=BA, BC=BC, CHUNK=CHUNK, REVERSE=reverse, E0=e0, HAS_S0=S0 is not None,
              WRITE_SF=True, SF_SHIFT=sf_shift, IEEE=ieee, VARLEN=varlen, WT=wt, PREFIX=prefix,
              KDEC_C=_flag("KDEC_ON_C") and BC <= BA, WHERE0=_flag("UNMASKED_WHERE"),
              EVEN=even,
              ST=_state_t(BA, even),
              num_warps=cfg.num_warps,
              num_stages=cfg.num_stages)
    if nf == 2:
        # optimistic: the unmasked sweep, each program counting the non-finite entries of its final state; then
        # the masked sweep over the same grid, where only the programs with a non-zero count run (they redo
        # their split; the others exit at once): two single-loop kernels, the fast one unburdened by the masking
        launch(_la_sweep_kernel, grid, args, dict(kw, NF=0, WRITE_FLAG=True, REDO=False))
        launch(_la_sweep_kernel, grid, args, dict(kw, NF=1, WRITE_FLAG=False, REDO=True))
    else:
        launch(_la_sweep_kernel, grid, args, dict(kw, NF=nf, WRITE_FLAG=False, REDO=False))
    return out


def supported(q: Tensor, v: Tensor) -> bool:
    """Whether the Triton kernels handle these inputs (else the op uses the blocked form)."""
    return (q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and 1 <= q.shape[-1] <= MAX_D and 1 <= v.shape[-1] <= MAX_D)


def lightning_attn_fwd_triton(q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor | None,
                              cfg: SweepConfig | None = None) -> tuple[Tensor, Tensor]:
    """Forward: (o [B, H, T, Dv] in q's dtype, final state [B, H, Dk, Dv] fp32), both contiguous."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    if not supported(q, v):
        from .blocked import blocked_fwd
        return blocked_fwd(q, k, v, s, initial_state)
    S0 = initial_state.float() if initial_state is not None else None
    S = torch.empty(B, H, Dk, Dv, device=q.device, dtype=torch.float32)
    if T == 0:
        S.copy_(S0) if S0 is not None else S.zero_()
        return q.new_empty(B, H, 0, Dv), S
    o = _sweep(q, k, v, s, S0, reverse=False, e0=0, final=S, cfg=cfg)
    return o, S


def lightning_attn_bwd_triton(do: Tensor, dS: Tensor | None, q: Tensor, k: Tensor, v: Tensor, s: Tensor,
                              initial_state: Tensor | None, cfgs: dict | None = None):
    """Backward: (dq, dk, dv in the dtypes of q/k/v, laid out as ``empty_grad`` of q/k/v (token-major for
    token-major inputs), dS0 [B, H, Dk, Dv] fp32 contiguous).

    ``cfgs`` optionally maps "dq"/"dk"/"dv" to a SweepConfig (benchmark sweeps)."""
    if not supported(q, v):
        from .blocked import blocked_bwd
        return grads_in_layout(q, k, v, blocked_bwd(do, dS, q, k, v, s, initial_state))
    return _bwd_sweeps(do, dS, q, k, v, s, initial_state, q.shape[0], cfgs)


def _bwd_sweeps(do, dS, q, k, v, s, initial_state, NS: int, cfgs: dict | None, cu=None, order=None):
    """The three backward sweeps (module docstring) for NS states (batch rows, or packed sequences with ``cu``)."""
    H, T, Dk = q.shape[1:]
    Dv = v.shape[-1]
    cfgs = cfgs or {}
    do = do.to(v.dtype)
    dS0 = torch.empty(NS, H, Dk, Dv, device=q.device, dtype=torch.float32)
    # the dense op writes the gradients in their inputs' order of heads and positions (empty_grad); the packed op
    # (cu) keeps contiguous ones, as its fake kernel says
    grad = empty_grad if cu is None else (lambda x: torch.empty_like(x, memory_format=torch.contiguous_format))
    if T == 0:
        dS0.copy_(dS) if dS is not None else dS0.zero_()
        return grad(q), grad(k), grad(v), dS0
    S0 = initial_state.float() if initial_state is not None else None
    G = dS.float() if dS is not None else None
    kw = dict(cu=cu, order=order)
    dq = _sweep(do, v, k, s, S0.transpose(-1, -2) if S0 is not None else None, reverse=False, e0=0,
                cfg=cfgs.get("dq"), out=grad(q), **kw)
    fused = FUSED_DKDV if FUSED_DKDV != "auto" else (Dk <= FUSED_MAX_D and Dv <= FUSED_MAX_D)
    # packed sequences keep the two sweeps: on the H200 (triton 3.6) a packed variant of the fused sweep hit an
    # illegal memory access on inputs with a non-finite entry (tests/gpu/test_varlen_gpu.py), not seen under
    # the interpreter; the cause was not found, so the fused kernel has no packed variant
    if fused and q.dtype != torch.float32 and cu is None:
        dk, dv = _dkdv(q, k, v, do, s, G, dS0, cfg=cfgs.get("dkdv"), dk=grad(k), dv=grad(v))
    else:
        # dv first: its split pre-pass (local states of q^T do) serves the dk sweep too, transposed
        local = {}
        dv = _sweep(k, q, do, s, G, reverse=True, e0=-1, final=dS0, sf_shift=True, cfg=cfgs.get("dv"),
                    out=grad(v), local=local, **kw)
        dk = _sweep(v, do, q, s, G.transpose(-1, -2) if G is not None else None, reverse=True, e0=-1,
                    cfg=cfgs.get("dk"), out=grad(k), local=local, **kw)
    return dq, dk, dv, dS0


def default_dkdv_config(Dk: int, Dv: int) -> SweepConfig:
    """Launch parameters of the fused dk/dv sweep (BC unused: a program holds the whole [Dk, Dv] state)."""
    big = _pow2(Dk) * _pow2(Dv) > 64 * 128
    return SweepConfig(BC=0, CHUNK=64, num_warps=8 if big else 4, num_stages=2)


def _dkdv(q: Tensor, k: Tensor, v: Tensor, do: Tensor, s: Tensor, G: Tensor | None, dS0: Tensor, *,
          cfg: SweepConfig | None = None, dk: Tensor | None = None, dv: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """dk, dv (in do's dtype) by the fused reverse sweep, writing lam * G_final to ``dS0`` [B, H, Dk, Dv] fp32.
    G: the final-state gradient (fp32 view) or None. Widths over TILE_D are cut: Dk by row blocks of the
    state (each gives its columns of dk and a partial dv, summed), Dv by column blocks (its columns of dv,
    a partial dk)."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    if dk is None:
        dk = torch.empty(B, H, T, Dk, device=q.device, dtype=do.dtype)
    if dv is None:
        dv = torch.empty(B, H, T, Dv, device=q.device, dtype=do.dtype)
    kw = dict(cfg=cfg)
    if Dk > TILE_D:
        for a0 in range(0, Dk, TILE_D):
            sl = slice(a0, a0 + TILE_D)
            part = None if a0 == 0 else torch.empty_like(dv)
            _dkdv(q[..., sl], k[..., sl], v, do, s, None if G is None else G[..., sl, :], dS0[..., sl, :],
                  dk=dk[..., sl], dv=dv if a0 == 0 else part, **kw)
            if a0:
                dv.add_(part)
        return dk, dv
    if Dv > TILE_D:
        for c0 in range(0, Dv, TILE_D):
            sl = slice(c0, c0 + TILE_D)
            part = None if c0 == 0 else torch.empty_like(dk)
            _dkdv(q, k, v[..., sl], do[..., sl], s, None if G is None else G[..., sl], dS0[..., sl],
                  dk=dk if c0 == 0 else part, dv=dv[..., sl], **kw)
            if c0:
                dk.add_(part)
        return dk, dv
    cfg = cfg or default_dkdv_config(Dk, Dv)
    q, k, v, do = _last_unit(q), _last_unit(k), _last_unit(v), _last_unit(do)
    assert dk.stride(-1) == 1 and dv.stride(-1) == 1
    BK, BV, CHUNK = _pow2(Dk), _pow2(Dv), cfg.CHUNK
    n_chunks = cdiv(T, CHUNK)
    n_split, cps = _split_plan(cfg.n_split, B * H, n_chunks, q.device, cfg.num_warps)
    s32 = s.to(device=q.device, dtype=torch.float32).contiguous()
    # the earlier splits' local states of G: those of the dv sweep (Bm = q, C = do, reverse frame)
    prefix = _flag("PREFIX_SCAN") and n_split > 1
    W = _local_states(q, do, s32, n_split, cps, BC=min(64, BV), CHUNK=CHUNK, reverse=True, ieee=False,
                      num_warps=4, num_stages=2, prefix=prefix)
    g0 = G if G is not None else s32
    g0_st = tuple(G.stride()) if G is not None else (0, 0, 0, 0)
    grid = B * H * n_split
    nf = cfg.nonfinite if cfg.nonfinite >= 0 else NONFINITE_MODE
    fl = torch.empty(grid, device=q.device, dtype=torch.int32) if nf == 2 else s32
    args = (q, k, v, do, dk, dv, g0, dS0, W, s32, fl, T, H, n_split, cps, *q.stride()[:3], *k.stride()[:3],
            *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], *g0_st, *dS0.stride())
    kw = dict(DKW=Dk, DVW=Dv, BK=BK, BV=BV, CHUNK=CHUNK, HAS_G0=G is not None, IEEE=False, PREFIX=prefix,
              WHERE0=_flag("UNMASKED_WHERE"), EVEN=_flag("EVEN_TILES") and T % CHUNK == 0 and BK == Dk and BV == Dv,
              DIAG=_flag("DIAG_DECAY"),
              num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if nf == 2:         # optimistic, as in _sweep: unmasked with flags, then the masked redo of flagged programs
        launch(_la_dkdv_kernel, grid, args, dict(kw, NF=0, WRITE_FLAG=True, REDO=False))
        launch(_la_dkdv_kernel, grid, args, dict(kw, NF=1, WRITE_FLAG=False, REDO=True))
    else:
        launch(_la_dkdv_kernel, grid, args, dict(kw, NF=nf, WRITE_FLAG=False, REDO=False))
    return dk, dv


# -- packed variable-length sequences -----------------------------------------------------------------
# The same four sweeps with ``cu`` set: each program takes one sequence's rows [cu[i], cu[i+1]) of the one
# packed row and its own initial / final state; the boundaries stay on the device (the grid depends only on
# N = cu.numel() - 1 and the widths).

def launch_order(cu: Tensor) -> Tensor:
    """int32 [N]: the sequences longest first (stable), so the long programs start in the first wave and
    the short ones fill in behind them instead of a long one starting last; computed on the device."""
    lengths = cu[1:] - cu[:-1]
    return torch.argsort(lengths, descending=True, stable=True).to(torch.int32)


def lightning_attn_varlen_fwd_triton(q: Tensor, k: Tensor, v: Tensor, s: Tensor, cu: Tensor,
                                     initial_state: Tensor | None, cfg: SweepConfig | None = None,
                                     order: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Packed forward: q, k [1, H, T, Dk], v [1, H, T, Dv], cu [N + 1] -> (o [1, H, T, Dv] in q's dtype,
    final states [N, H, Dk, Dv] fp32), both contiguous. ``order`` defaults to ``launch_order(cu)``."""
    _, H, T, Dk = q.shape
    Dv = v.shape[-1]
    N = cu.shape[0] - 1
    S0 = initial_state.float() if initial_state is not None else None
    S = torch.empty(N, H, Dk, Dv, device=q.device, dtype=torch.float32)
    if T == 0:
        S.copy_(S0) if S0 is not None else S.zero_()
        return q.new_empty(1, H, 0, Dv), S
    order = launch_order(cu) if order is None else order
    o = _sweep(q, k, v, s, S0, reverse=False, e0=0, final=S, cfg=cfg, cu=cu, order=order)
    return o, S


def lightning_attn_varlen_bwd_triton(do: Tensor, dS: Tensor | None, q: Tensor, k: Tensor, v: Tensor, s: Tensor,
                                     cu: Tensor, initial_state: Tensor | None, cfgs: dict | None = None,
                                     order: Tensor | None = None):
    """Packed backward: (dq, dk, dv in the dtypes of q/k/v, dS0 [N, H, Dk, Dv] fp32), all contiguous."""
    order = launch_order(cu) if order is None else order
    return _bwd_sweeps(do, dS, q, k, v, s, initial_state, cu.shape[0] - 1, cfgs, cu=cu, order=order)
