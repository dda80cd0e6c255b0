"""The fused decode step in one Triton kernel launch (the maths of ``naive.py``).

Grid: one program per (row b, head h, block j of BV value columns), P = H * cdiv(e, BV) programs
per row. Each program reads q_h, k_h (all Dk key rows) and its BV columns of v_h, applies the
activation and LRPE, updates its [Dk, BV] tile of the state (S <- lam S + k^T v, fp32, read once
and written once), and reads out o = q S for its BV columns. Tiles are independent, so the state,
the only large operand, streams through all SMs even at batch 1 (385M: 8 heads x 128/BV tiles).

SRMSNorm spans the whole width h = H * e, across programs. Design: *the last program of a row
normalises it*. Each program writes its o columns (rounded to the input dtype) into y and its
partial sum of squares into a workspace, then takes a ticket from a per-row counter with one
atomic (acq_rel, gpu scope). The program that draws the last ticket (P - 1) knows that every other
program of its row has stored its partials, so it sums the P partials in a fixed order (the result
is deterministic), rescales y in place and multiplies by u, then resets the counter to 0 for the
next call. No program ever waits for another (there is no grid-wide barrier and no spinning), so
it is correct for any number of resident programs and any schedule; there are no floating-point
atomics. Cost: one extra read and write of y (h elements) per row, by one program.

The counters are a persistent int32 buffer per device, zero between calls (each call leaves them
at 0). Calls on one device must therefore not run concurrently on two streams. Inside CUDA-graph
capture the cached buffer is reused when it is large enough (run the step once before capturing,
as ``CudaGraphDecoder`` does with its warm-up); otherwise the graph gets its own zeroed buffer.
A captured graph holds the buffer's address, so a buffer once handed out is never freed: when a
larger batch needs a larger one, the old one is retired (kept alive, still zero), not dropped. (It
was dropped before: ``SlotBatch`` captures one graph per bucket of rows, ascending, so the graphs of
the small buckets kept the address of a freed buffer whose memory later allocations reused.)

The state is updated in place (``state_out`` is ``state``) or written to a separate buffer.

With ``norm_input`` x (NORM), every program also reads x's row (d elements, from L2 after the first)
and scales its q, k, v (and the last program u) by x's SRMSNorm scale before anything else.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._device import num_sms as _num_sms
from .._launch import cdiv, next_pow2
from ..norm import EPS
from ..sglu.triton import ACT_CODE

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


def _kernels():
    global row_rms_rsqrt, apply_act, gla_state_tile   # a jit kernel looks its callees up among the module's globals
    import triton
    import triton.language as tl
    from .._triton_interp import patch as _patch_interpreter
    _patch_interpreter()
    from .._triton_rows import apply_act, gla_state_tile, row_rms_rsqrt

    @triton.jit
    def gla_decode_kernel(QKVU, S_IN, S_OUT, RATE, THETA, POS, Y, SS, CNT, X, sq_b, sy_b, sx_b, eps,
                          H: tl.constexpr, E: tl.constexpr, BE: tl.constexpr, BV: tl.constexpr,
                          NV: tl.constexpr, LRPE: tl.constexpr, ACT: tl.constexpr, BW: tl.constexpr,
                          BP: tl.constexpr, NORM: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
        pid = tl.program_id(0)
        j = pid % NV
        h = (pid // NV) % H
        b = (pid // (NV * H)).to(tl.int64)
        HE: tl.constexpr = H * E
        P: tl.constexpr = H * NV
        ee = tl.arange(0, BE)
        me = ee < E
        vv = j * BV + tl.arange(0, BV)
        mv = vv < E
        row = QKVU + b * sq_b + h * E
        q = tl.load(row + ee, mask=me, other=0.0)
        DT = q.dtype
        k = tl.load(row + HE + ee, mask=me, other=0.0)
        v = tl.load(row + 2 * HE + vv, mask=mv, other=0.0).to(tl.float32)
        rn = 1.0
        if NORM:
            # the folded input norm: qkvu = x W^T times rsqrt(mean(x^2) + eps), rounded to the input dtype
            rn = row_rms_rsqrt(X + b * sx_b, eps, D, BD)
            q = (q.to(tl.float32) * rn).to(DT)
            k = (k.to(tl.float32) * rn).to(DT)
            v = (v * rn).to(DT).to(tl.float32)
        # the activation runs in the input dtype, as in the model (fp32 inside, rounded)
        qf = apply_act(q.to(tl.float32), ACT).to(DT).to(tl.float32)
        kf = apply_act(k.to(tl.float32), ACT).to(DT).to(tl.float32)
        lam = tl.exp(-tl.load(RATE + h).to(tl.float32))
        if LRPE:
            base = (b * H + h) * (2 * E * E)
            th = tl.load(THETA + h * E + ee, mask=me, other=0.0).to(tl.float32)
            ang = th * tl.load(POS + b).to(tl.float32)               # fp32 angle, as the model forms it
        else:
            base = (b * H + h) * (E * E)
            ang = qf
        o = gla_state_tile(S_IN, S_OUT, base, ee, vv, me, mv, qf, kf, v, lam, ang, QKVU, E, LRPE)
        o = o.to(DT)                                                  # o in the input dtype, as in the model
        of = o.to(tl.float32)
        tl.store(Y + b * sy_b + h * E + vv, o, mask=mv)
        tl.store(SS + pid, tl.sum(of * of, 0))
        # every thread's stores of this program come before the release of its ticket
        tl.debug_barrier()
        ticket = tl.atomic_add(CNT + b, 1, sem="acq_rel", scope="gpu")
        if ticket == P - 1:
            # the last program of row b: all P partials are visible (acquire); .cg reads skip L1
            pp = tl.arange(0, BP)
            ss = tl.load(SS + b * P + pp, mask=pp < P, other=0.0, cache_modifier=".cg")
            r = tl.rsqrt(tl.sum(ss, 0) / HE + eps)
            for c0 in range(0, HE, BW):
                cols = c0 + tl.arange(0, BW)
                mc = cols < HE
                x = tl.load(Y + b * sy_b + cols, mask=mc, other=0.0, cache_modifier=".cg").to(tl.float32)
                u = tl.load(QKVU + b * sq_b + 3 * HE + cols, mask=mc, other=0.0)
                if NORM:
                    u = (u.to(tl.float32) * rn).to(DT)
                xn = (x * r).to(DT)
                tl.store(Y + b * sy_b + cols, (xn.to(tl.float32) * u.to(tl.float32)).to(DT), mask=mc)
            tl.atomic_xchg(CNT + b, 0, sem="relaxed", scope="gpu")    # ready for the next call

    return triton, gla_decode_kernel


_get_kernels = functools.cache(_kernels)     # built (and triton imported) at the first launch
_COUNTERS: dict = {}
_RETIRED: list = []      # counter buffers replaced by larger ones: captured graphs may still use them


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _counters(device: torch.device, B: int) -> Tensor:
    """The per-row ticket counters (int32, all zero between calls) for ``B`` rows on ``device``."""
    key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is not None and buf.numel() >= B:
        return buf
    if _capturing(device):          # memory allocated in capture belongs to the graph: keep it uncached
        return torch.zeros(B, dtype=torch.int32, device=device)
    if buf is not None:
        _RETIRED.append(buf)
    buf = torch.zeros(max(B, 64), dtype=torch.int32, device=device)
    _COUNTERS[key] = buf
    return buf


def block_v(B: int, H: int, e: int, Dk: int, num_sms: int) -> int:
    """Value columns per program: a tile of at most 8192 fp32 state elements, halved (down to 16)
    until the grid has at least two programs per SM."""
    BE = next_pow2(e)
    bv = min(BE, max(16, 8192 // next_pow2(Dk)))
    while bv > 16 and B * H * cdiv(e, bv) < 2 * num_sms:
        bv //= 2
    return bv


def supported(qkvu: Tensor, state: Tensor) -> bool:
    """Whether the Triton kernel handles these dtypes (else the op runs the reference form)."""
    return qkvu.dtype in _SUPPORTED and state.dtype == torch.float32


def gla_decode_triton(qkvu: Tensor, state: Tensor, s: Tensor, theta: Tensor | None, pos: Tensor | None,
                      act: str, state_out: Tensor | None = None, eps: float = EPS,
                      bv: int | None = None, norm_input: Tensor | None = None) -> Tensor:
    """Launcher (CUDA, or the CPU under TRITON_INTERPRET=1). Inputs as ``gla_decode_naive``, checked.

    Writes the new state into ``state_out`` ([B, H, Dk, e] fp32, contiguous; ``state`` itself for an
    in-place update, the default) and returns y [B, h] (contiguous, qkvu's dtype). ``bv`` overrides
    the value columns per program (a power of 2 >= 16)."""
    triton, kernel = _get_kernels()
    B, H, Dk, e = state.shape
    if state_out is None:
        state_out = state
    if not state_out.is_contiguous() or state_out.dtype != torch.float32 or state_out.shape != state.shape:
        raise ValueError(f"gla_decode_step: the state written must be a contiguous fp32 [B, H, Dk, e] tensor, got "
                         f"{state_out.dtype} {tuple(state_out.shape)} contiguous={state_out.is_contiguous()}")
    if not state.is_contiguous():
        if state_out is state:
            raise ValueError("gla_decode_step: an in-place update needs a contiguous `state`")
        state = state.contiguous()
    if qkvu.stride(-1) != 1:
        qkvu = qkvu.contiguous()
    norm = norm_input is not None
    if norm and norm_input.stride(-1) != 1:
        norm_input = norm_input.contiguous()
    lrpe = theta is not None
    rate = s.to(torch.float32).contiguous()
    th = theta.to(torch.float32).reshape(H, e).contiguous() if lrpe else rate
    ps = pos.to(torch.int64).contiguous() if lrpe else rate
    y = torch.empty(B, H * e, device=qkvu.device, dtype=qkvu.dtype)
    if B == 0:
        return y
    if bv is None:
        bv = block_v(B, H, e, Dk, _num_sms(qkvu.device))
    NV = cdiv(e, bv)
    P = H * NV
    ss = torch.empty(B * P, device=qkvu.device, dtype=torch.float32)
    cnt = _counters(qkvu.device, B)
    BE = next_pow2(e)
    BW = min(1024, next_pow2(H * e))
    warps = 4 if Dk * bv <= 4096 else 8
    D = norm_input.shape[1] if norm else 1
    kernel[(B * P,)](qkvu, state, state_out, rate, th, ps, y, ss, cnt, norm_input if norm else qkvu,
                     qkvu.stride(0), y.stride(0), norm_input.stride(0) if norm else 0, eps,
                     H=H, E=e, BE=BE, BV=bv, NV=NV, LRPE=lrpe, ACT=ACT_CODE[act], BW=BW,
                     BP=next_pow2(P), NORM=norm, D=D, BD=min(4096, next_pow2(D)),
                     num_warps=warps)
    return y
