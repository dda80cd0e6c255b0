"""The residual projection in one Triton launch (the maths of ``naive.py``).

Grid: (N / BN, B): one program per block of BN output features and one row. Each program walks K in
steps of BK, loading a [BN, BK] tile of W (contiguous along K, so every load is a full line) and the
row's [BK] input, and keeps a [BN, BK] fp32 partial sum that is reduced once at the end; the epilogue
adds the residual x in fp32 and rounds once. With a gate (GATE) the input is computed in the prologue
from y = [l1 | l2]: x's SRMSNorm scale r (each program reads x's row), a = round(l1 r), b = round(l2 r),
round(act(a)) * b rounded, as ``sglu_gate`` does, so no [B, K] gate tensor is written.

At batch 1 the weight is read once; row b > 0 re-reads it (from L2 at the decode step's sizes), so the
op uses this kernel only up to ``op.MAX_ROWS`` rows.
"""
from __future__ import annotations

import functools

from dataclasses import dataclass

import torch
from torch import Tensor

from .._launch import cdiv, next_pow2
from ..norm import EPS
from ..sglu.triton import ACT_CODE

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class GemvConfig:
    BN: int = 8          # output features per program
    BK: int = 256        # reduction step
    num_warps: int = 4


def _kernels():
    global row_rms_rsqrt          # a jit kernel looks its callees up among the module's globals
    import triton
    import triton.language as tl
    from .._triton_interp import patch as _patch_interpreter
    _patch_interpreter()
    from .._triton_rows import row_rms_rsqrt

    @triton.jit
    def residual_gemv_kernel(X, Y, W, OUT, sx_b, sy_b, sw_n, so_b, eps, N, K: tl.constexpr,
                             BN: tl.constexpr, BK: tl.constexpr, GATE: tl.constexpr, ACT: tl.constexpr,
                             BD: tl.constexpr):
        pid_n = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        rows = pid_n * BN + tl.arange(0, BN)
        rmask = rows < N
        kk = tl.arange(0, BK)
        xrow = X + b * sx_b
        yrow = Y + b * sy_b
        DT = X.dtype.element_ty
        if GATE:
            rn = row_rms_rsqrt(xrow, eps, N, BD)
        acc = tl.zeros([BN, BK], dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + kk
            kmask = ks < K
            if GATE:
                a = (tl.load(yrow + ks, mask=kmask, other=0.0).to(tl.float32) * rn).to(DT).to(tl.float32)
                c = (tl.load(yrow + K + ks, mask=kmask, other=0.0).to(tl.float32) * rn).to(DT).to(tl.float32)
                if ACT == 1:
                    a = a * tl.sigmoid(a)
                elif ACT == 2:
                    a = tl.maximum(a, 0.0)
                yv = (a.to(DT).to(tl.float32) * c).to(DT).to(tl.float32)
            else:
                yv = tl.load(yrow + ks, mask=kmask, other=0.0).to(tl.float32)
            wt = tl.load(W + rows[:, None].to(tl.int64) * sw_n + ks[None, :],
                         mask=rmask[:, None] & kmask[None, :], other=0.0)
            acc += wt.to(tl.float32) * yv[None, :]
        r = tl.sum(acc, 1) + tl.load(xrow + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(OUT + b * so_b + rows, r.to(DT), mask=rmask)

    return triton, residual_gemv_kernel


_get_kernels = functools.cache(_kernels)     # built (and triton imported) at the first launch


def supported(x: Tensor) -> bool:
    """Whether the Triton kernel handles this dtype (else the op runs the reference form or cuBLAS)."""
    return x.dtype in _SUPPORTED


def default_config(N: int, K: int) -> GemvConfig:
    """Tiles for an [N, K] weight: BN = 8 output features per program (a 1024-wide projection -> 128
    programs, about one per SM of an H200), BK = 256, 4 warps: the configuration measured inside the 385M
    decode step on the H200 (out_proj 4.3 us against cuBLAS addmm's 7.3). BN grows with N so wide
    projections keep the grid near 1-4 programs per SM."""
    BN = 8 if N <= 2048 else 16 if N <= 8192 else 32
    return GemvConfig(BN=BN, BK=256, num_warps=4)


def residual_gemv_triton(x: Tensor, y: Tensor, w: Tensor, gate: str | None, eps: float = EPS,
                         cfg: GemvConfig | None = None) -> Tensor:
    """Launcher (CUDA, or the CPU under TRITON_INTERPRET=1); inputs as ``residual_gemv_naive``, checked
    by the caller. Returns [B, N] contiguous in x's dtype; ``cfg`` overrides the tiles."""
    triton, kernel = _get_kernels()
    B, N = x.shape
    K = w.shape[1]
    x, y, w = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, y, w))
    out = torch.empty(B, N, device=x.device, dtype=x.dtype)
    if B == 0 or N == 0:
        return out
    if K == 0:
        return out.copy_(x)
    cfg = cfg or default_config(N, K)
    kernel[(cdiv(N, cfg.BN), B)](
        x, y, w, out, x.stride(0), y.stride(0), w.stride(0), out.stride(0), eps, N, K=K, BN=cfg.BN, BK=cfg.BK,
        GATE=gate is not None, ACT=ACT_CODE[gate] if gate is not None else 0,
        BD=min(4096, next_pow2(N)), num_warps=cfg.num_warps)
    return out
