"""The SGLU gate in one Triton launch (the maths of ``naive.py``).

Grid: one program per (row b, block of BG gate columns: 256, or 1024 from 32 rows on). With ``norm_input`` (NORM) each program also
reads x's row (d elements) for the SRMSNorm scale. The activation runs in fp32 and is rounded to the
input dtype, then the product is rounded, as the model's ``act(l1 x) * l2 x`` does.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._launch import cdiv, next_pow2
from ..norm import EPS

ACT_CODE = {"none": 0, "silu": 1, "swish": 1, "relu": 2}
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


def _kernels():
    global row_rms_rsqrt          # a jit kernel looks its callees up among the module's globals
    import triton
    import triton.language as tl
    from .._triton_interp import patch as _patch_interpreter
    _patch_interpreter()
    from .._triton_rows import row_rms_rsqrt

    @triton.jit
    def sglu_gate_kernel(L12, X, OUT, s_b, sx_b, so_b, eps, G: tl.constexpr, BG: tl.constexpr, NG: tl.constexpr,
                         ACT: tl.constexpr, NORM: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
        pid = tl.program_id(0)
        b = (pid // NG).to(tl.int64)
        cols = (pid % NG) * BG + tl.arange(0, BG)
        m = cols < G
        a = tl.load(L12 + b * s_b + cols, mask=m, other=0.0)
        DT = a.dtype
        c = tl.load(L12 + b * s_b + G + cols, mask=m, other=0.0)
        if NORM:
            rn = row_rms_rsqrt(X + b * sx_b, eps, D, BD)
            a = (a.to(tl.float32) * rn).to(DT)
            c = (c.to(tl.float32) * rn).to(DT)
        af = a.to(tl.float32)
        if ACT == 1:
            af = af * tl.sigmoid(af)
        elif ACT == 2:
            af = tl.maximum(af, 0.0)
        af = af.to(DT).to(tl.float32)
        tl.store(OUT + b * so_b + cols, (af * c.to(tl.float32)).to(DT), mask=m)

    return triton, sglu_gate_kernel


_get_kernels = functools.cache(_kernels)     # built (and triton imported) at the first launch


def supported(l12: Tensor) -> bool:
    """Whether the Triton kernel handles this dtype (else the op runs the reference form)."""
    return l12.dtype in _SUPPORTED


def sglu_gate_triton(l12: Tensor, norm_input: Tensor | None, act: str, eps: float = EPS,
                     block: int | None = None) -> Tensor:
    """Launcher (CUDA, or the CPU under TRITON_INTERPRET=1); inputs as ``sglu_gate_naive``, checked.
    Returns [B, g] contiguous in l12's dtype; ``block`` overrides the gate columns per program."""
    triton, kernel = _get_kernels()
    B, G = l12.shape[0], l12.shape[1] // 2
    if l12.stride(-1) != 1:
        l12 = l12.contiguous()
    norm = norm_input is not None
    if norm and norm_input.stride(-1) != 1:
        norm_input = norm_input.contiguous()
    out = torch.empty(B, G, device=l12.device, dtype=l12.dtype)
    if B == 0 or G == 0:
        return out
    # 256 columns per program at small batch (more programs in flight); 1024 from 32 rows on, where the
    # grid is large anyway and each program's read of the x row (for the folded norm) costs more
    BG = block or min(256 if B < 32 else 1024, next_pow2(G))
    NG = cdiv(G, BG)
    D = norm_input.shape[1] if norm else 1
    kernel[(B * NG,)](l12, norm_input if norm else l12, out, l12.stride(0), norm_input.stride(0) if norm else 0,
                      out.stride(0), eps, G=G, BG=BG, NG=NG, ACT=ACT_CODE[act], NORM=norm, D=D,
                      BD=min(4096, next_pow2(D)), num_warps=4 if BG <= 256 else 8)
    return out
