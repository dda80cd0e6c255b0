"""The reference residual projection, in plain PyTorch.

    out = x + y W^T                                 # gate None: y [B, K]
    out = x + sglu_gate(y, norm_input=x, act) W^T   # gate = act: y = [l1 | l2] [B, 2K], x's SRMSNorm folded

The product accumulates in fp64 and ``x + y W^T`` is rounded once to x's dtype, as a GEMM with the
residual in its fp32 epilogue does (up to fp32's rounding of the sum). With a gate, the gate is the
``sglu_gate`` reference itself, rounded to the dtype as the model's GLU is.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..sglu.naive import ACTS, sglu_gate_naive

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(x: Tensor, y: Tensor, w: Tensor, gate: str | None) -> tuple[int, int, int]:
    """Shapes, dtypes and devices; returns (B, K, N). Reads no data."""
    name = "residual_gemv"
    for arg, t in (("x", x), ("y", y), ("w", w)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: `{arg}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name}: `{arg}` must be 2-D, got shape {tuple(t.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name}: `x` must be fp16, bf16, fp32 or fp64, got {x.dtype}")
    if y.dtype != x.dtype or w.dtype != x.dtype:
        raise TypeError(f"{name}: `x`, `y` and `w` must share one dtype, got {x.dtype}, {y.dtype} and {w.dtype}")
    if y.device != x.device or w.device != x.device:
        raise ValueError(f"{name}: `x`, `y` and `w` must be on one device, got {x.device}, {y.device} and {w.device}")
    if gate is not None and gate not in ACTS:
        raise ValueError(f"{name}: `gate` must be None or one of {sorted(ACTS)}, got {gate!r}")
    B, N = x.shape
    K = w.shape[1]
    if w.shape[0] != N:
        raise ValueError(f"{name}: `w` must have shape [N, K] with N = x.shape[1] = {N}, got {tuple(w.shape)}")
    want = 2 * K if gate is not None else K
    if y.shape != (B, want):
        what = "[B, 2K] (the l1 | l2 projections side by side)" if gate is not None else "[B, K]"
        raise ValueError(f"{name}: `y` must have shape {what} = {(B, want)} for x {tuple(x.shape)} and w "
                         f"{tuple(w.shape)}, got {tuple(y.shape)}")
    return B, K, N


def residual_gemv_naive(x: Tensor, y: Tensor, w: Tensor, gate: str | None = None) -> Tensor:
    """x + y W^T (or x + sglu_gate(y, x, gate) W^T) -> [B, N] in x's dtype (module docstring)."""
    check_inputs(x, y, w, gate)
    g = sglu_gate_naive(y, x, gate) if gate is not None else y
    return (x.double() + g.double() @ w.double().t()).to(x.dtype)
