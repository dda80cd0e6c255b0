"""The reference decode step of the token mixer after ``qkvu_proj``, for one token, in plain PyTorch.

The same operations, in the same order and dtypes, as ``NormLinearAttention.step`` of
``tnllm.model`` (activation in the input dtype, LRPE with fp32 angles, the recurrent update in the
state's dtype, SRMSNorm in fp32 over the whole width, times the gate u):

    q, k, v, u = split(qkvu)                               # [B, h] each, h = H * e, head-major
    q, k = act(q), act(k)
    LRPE:  q, k <- [x cos(theta pos), x sin(theta pos)]     # Dk = 2e (else Dk = e)
    S_new = lam * S + k^T v,  lam = exp(-s)                 # per head, fp32
    o = q S_new                                             # [B, H, e], rounded to the input dtype
    y = srms_norm(o over the width h) * u                   # [B, h], the input dtype
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..norm import EPS, srms_norm

ACTS = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "none": lambda x: x}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(qkvu: Tensor, state: Tensor, s: Tensor, theta: Tensor | None, pos: Tensor | None,
                 act: str) -> tuple[int, int, int, bool]:
    """Shapes, dtypes and devices of a decode step's inputs; returns (B, H, e, lrpe). Reads no data."""
    name = "gla_decode_step"
    for arg, t in (("qkvu", qkvu), ("state", state), ("s", s)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: `{arg}` must be a torch.Tensor, got {type(t).__name__}")
    if qkvu.dim() != 2:
        raise ValueError(f"{name}: `qkvu` must have shape [B, 4*h] (one token per row), got {tuple(qkvu.shape)}")
    if qkvu.dtype not in _FLOATS:
        raise TypeError(f"{name}: `qkvu` must be fp16, bf16, fp32 or fp64, got {qkvu.dtype}")
    if state.dim() != 4:
        raise ValueError(f"{name}: `state` must have shape [B, H, Dk, e], got {tuple(state.shape)}")
    B, H, Dk, e = state.shape
    if qkvu.shape[0] != B or qkvu.shape[1] != 4 * H * e:
        raise ValueError(f"{name}: `qkvu` must have shape [B, 4*H*e] = {(B, 4 * H * e)} for a state of shape "
                         f"{tuple(state.shape)}, got {tuple(qkvu.shape)}")
    if state.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name}: `state` must be fp32 (or fp64), got {state.dtype}")
    if s.dim() != 1 or s.shape[0] != H or not s.is_floating_point():
        raise ValueError(f"{name}: `s` (decay rates, lam = exp(-s)) must be a float tensor of shape [H] = [{H}], "
                         f"got {s.dtype} {tuple(s.shape)}")
    lrpe = theta is not None
    if Dk != (2 * e if lrpe else e):
        raise ValueError(f"{name}: `state` must have Dk = {'2e' if lrpe else 'e'} = {2 * e if lrpe else e} "
                         f"({'with' if lrpe else 'without'} LRPE theta), got state shape {tuple(state.shape)}")
    if lrpe:
        if not isinstance(theta, Tensor) or tuple(theta.shape) != (H, 1, e) or not theta.is_floating_point():
            got = f"{theta.dtype} {tuple(theta.shape)}" if isinstance(theta, Tensor) else type(theta).__name__
            raise ValueError(f"{name}: `theta` (LRPE) must be a float tensor of shape [H, 1, e] = {(H, 1, e)}, got {got}")
        if not isinstance(pos, Tensor) or pos.dim() != 1 or pos.shape[0] != B or pos.is_floating_point() \
                or pos.dtype == torch.bool:
            got = f"{pos.dtype} {tuple(pos.shape)}" if isinstance(pos, Tensor) else type(pos).__name__
            raise ValueError(f"{name}: `pos` (the position of each row's token) must be an integer tensor of "
                             f"shape [B] = [{B}] when LRPE is on, got {got}")
    elif pos is not None and not isinstance(pos, Tensor):
        raise TypeError(f"{name}: `pos` must be an integer tensor [B] or None, got {type(pos).__name__}")
    if act not in ACTS:
        raise ValueError(f"{name}: `act` must be one of {sorted(ACTS)}, got {act!r}")
    for arg, t in (("state", state), ("s", s), ("theta", theta), ("pos", pos)):
        if isinstance(t, Tensor) and t.device != qkvu.device:
            raise ValueError(f"{name}: `{arg}` is on {t.device}, `qkvu` on {qkvu.device}")
    return B, H, e, lrpe


def gla_decode_naive(qkvu: Tensor, state: Tensor, s: Tensor, theta: Tensor | None = None,
                     pos: Tensor | None = None, act: str = "silu", eps: float = EPS) -> tuple[Tensor, Tensor]:
    """One decode step of the token mixer after ``qkvu_proj``.

    Args:
        qkvu: [B, 4*h] the output of ``qkvu_proj`` for one token per row (h = H * e; q | k | v | u, head-major).
        state: [B, H, Dk, e] fp32 (or fp64); Dk = 2e with LRPE, else e. Not modified.
        s: [H] decay rates, lam = exp(-s).
        theta: [H, 1, e] LRPE frequencies, or None (no LRPE).
        pos: [B] integer position of each row's token (needed with LRPE).
        act: activation of q and k: "silu" ("swish"), "relu" or "none".

    Returns (y [B, h] in qkvu's dtype, S_new [B, H, Dk, e] in the state's dtype).
    """
    B, H, e, lrpe = check_inputs(qkvu, state, s, theta, pos, act)
    f = ACTS[act]
    q, k, v, u = qkvu.chunk(4, dim=-1)
    q, k, v = (t.reshape(B, H, 1, e) for t in (q, k, v))
    q, k = f(q), f(k)
    if lrpe:
        dt = torch.promote_types(q.dtype, torch.float32)                   # fp32 angles (fp64 for fp64)
        ang = theta.to(dt) * pos.to(dt)[:, None, None, None]                # [B, H, 1, e]
        cos, sin = torch.cos(ang), torch.sin(ang)
        q, k = (torch.cat([x.to(dt) * cos, x.to(dt) * sin], dim=-1).to(x.dtype) for x in (q, k))
    acc = state.dtype
    lam = torch.exp(-s.to(acc))[:, None, None]                             # [H, 1, 1]
    S = lam * state + k.to(acc).transpose(-1, -2) * v.to(acc)              # [B, H, Dk, 1] * [B, H, 1, e]
    o = (q.to(acc).transpose(-1, -2) * S).sum(-2, keepdim=True).to(q.dtype)  # [B, H, 1, e]
    o = o.reshape(B, H * e)
    return srms_norm(o, eps) * u, S
