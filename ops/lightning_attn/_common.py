"""Shared pieces of the Lightning Attention forms: input validation and decay tables.

Legend (SPEC section 2): B batch, H heads, T length, Dk key/query width, Dv value width,
s [H] the non-negative per-head decay rate, lam = exp(-s), S [B, H, Dk, Dv] the state.
Every form accumulates in ``acc_dtype(q.dtype)``: fp32, or fp64 for fp64 inputs.
"""
from __future__ import annotations

import torch
from torch import Tensor

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and state) dtype for inputs of ``dtype``: fp64 stays fp64, all else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor | None,
                 check_decay: bool = True) -> None:
    """Validate the arguments shared by every form; raise TypeError/ValueError naming the argument.

    Runs on shapes and dtypes only (no data-dependent checks except the sign of ``s`` in eager
    mode, skipped with ``check_decay=False``: on CUDA it is a host sync), so it is safe under
    torch.compile and torch.export.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("s", s)):
        if not isinstance(t, Tensor):
            raise TypeError(f"lightning_attn: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in _FLOATS:
            raise TypeError(f"lightning_attn: `{name}` must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"lightning_attn: `{name}` must have shape [B, H, T, D] (4 dims), got {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"lightning_attn: `q`, `k`, `v` must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    B, H, T, Dk = q.shape
    if tuple(k.shape) != (B, H, T, Dk):
        raise ValueError(f"lightning_attn: `k` must have q's shape [B, H, T, Dk] = {(B, H, T, Dk)}, got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != (B, H, T):
        raise ValueError(f"lightning_attn: `v` must have shape [B, H, T, Dv] with [B, H, T] = {(B, H, T)}, got {tuple(v.shape)}")
    Dv = v.shape[3]
    if s.dtype not in _FLOATS:
        raise TypeError(f"lightning_attn: `s` (decay rate) must be a floating tensor, got {s.dtype}")
    if s.dim() != 1 or s.shape[0] != H:
        raise ValueError(f"lightning_attn: `s` (decay rate) must have shape [H] = [{H}], got {tuple(s.shape)}")
    devices = {"q": q.device, "k": k.device, "v": v.device, "s": s.device}
    if initial_state is not None:
        if not isinstance(initial_state, Tensor):
            raise TypeError(f"lightning_attn: `initial_state` must be a Tensor or None, got {type(initial_state).__name__}")
        if initial_state.dtype not in _FLOATS:
            raise TypeError(f"lightning_attn: `initial_state` must be floating, got {initial_state.dtype}")
        if tuple(initial_state.shape) != (B, H, Dk, Dv):
            raise ValueError(
                f"lightning_attn: `initial_state` must have shape [B, H, Dk, Dv] = {(B, H, Dk, Dv)}, got {tuple(initial_state.shape)}")
        devices["initial_state"] = initial_state.device
    if len(set(devices.values())) > 1:
        where = ", ".join(f"`{n}` on {d}" for n, d in devices.items())
        raise ValueError(f"lightning_attn: all inputs must be on one device, got {where}")
    if check_decay and not torch.compiler.is_compiling() and not _is_fake(s) and s.numel() and bool((s < 0).any()):
        raise ValueError("lightning_attn: `s` (decay rate) must be >= 0 (lambda = exp(-s) <= 1), got a negative entry")


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t) or t.device.type == "meta"


def intra_decay(s: Tensor, C: int, dtype: torch.dtype) -> Tensor:
    """D[h, j, i] = lam_h^(j-i) for j >= i else 0, shape [H, C, C]; never forms lam^(-t)."""
    idx = torch.arange(C, device=s.device, dtype=dtype)
    diff = idx[:, None] - idx[None, :]
    D = torch.exp(-s.to(dtype)[:, None, None] * diff.clamp(min=0))
    return D * (diff >= 0)
