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

With ``norm_input`` x [B, d], qkvu is the projection of x itself (not of srms_norm(x)): the layer's
input norm is folded in as a per-row scale, qkvu <- round(qkvu * rsqrt(mean(x^2) + eps)) (fp32 inside,
rounded to qkvu's dtype), before the rest. SRMSNorm has no weight, so srms_norm(x) W^T = r(x) x W^T:
the same maths; the roundings differ at the dtype's epsilon (x W^T is rounded before the scale).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..norm import EPS, srms_norm

ACTS = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "none": lambda x: x}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_norm_input(name: str, x, rows: int, ref: Tensor) -> None:
    """``norm_input`` must be None or a float tensor [rows, d] on ``ref``'s device."""
    if x is None:
        return
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] != rows or x.shape[1] < 1 or x.dtype not in _FLOATS:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name}: `norm_input` (the un-normalised layer input whose SRMSNorm scale is folded in) "
                         f"must be None or a float tensor [B, d] with B = {rows}, got {got}")
    if x.device != ref.device:
        raise ValueError(f"{name}: `norm_input` is on {x.device}, the other inputs on {ref.device}")


def norm_scale(x: Tensor, eps: float = EPS) -> Tensor:
    """The per-row SRMSNorm scale r = rsqrt(mean(x^2, -1) + eps), [B, 1], fp32 (fp64 for fp64)."""
    xf = x.float() if x.dtype != torch.float64 else x
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def prescale(t: Tensor, x: Tensor | None, eps: float = EPS) -> Tensor:
    """``t`` [B, n] times x's SRMSNorm scale, in fp32 (fp64), rounded back to t's dtype; ``t`` when x is None."""
    if x is None:
        return t
    r = norm_scale(x, eps)
    return (t.to(r.dtype) * r).to(t.dtype)


def check_mixer_args(name: str, state: Tensor, s: Tensor, theta, pos) -> bool:
    """The token mixer's arguments against its state [B, H, Dk, e] (``name`` opens the errors): the decay rates
    ``s`` [H]; with LRPE (``theta`` not None) Dk = 2e, ``theta`` [H, 1, e] and integer positions ``pos`` [B], else
    Dk = e. Returns whether LRPE is on; reads no data. Shared by every decode kernel's checks."""
    B, H, Dk, e = state.shape
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
    return lrpe


def check_inputs(qkvu: Tensor, state: Tensor, s: Tensor, theta: Tensor | None, pos: Tensor | None,
                 act: str, norm_input: Tensor | None = None) -> tuple[int, int, int, bool]:
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
    lrpe = check_mixer_args(name, state, s, theta, pos)
    if act not in ACTS:
        raise ValueError(f"{name}: `act` must be one of {sorted(ACTS)}, got {act!r}")
    for arg, t in (("state", state), ("s", s), ("theta", theta), ("pos", pos)):
        if isinstance(t, Tensor) and t.device != qkvu.device:
            raise ValueError(f"{name}: `{arg}` is on {t.device}, `qkvu` on {qkvu.device}")
    check_norm_input(name, norm_input, B, qkvu)
    return B, H, e, lrpe


def gla_decode_naive(qkvu: Tensor, state: Tensor, s: Tensor, theta: Tensor | None = None,
                     pos: Tensor | None = None, act: str = "silu", eps: float = EPS,
                     norm_input: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One decode step of the token mixer after ``qkvu_proj``.

    Args:
        qkvu: [B, 4*h] the output of ``qkvu_proj`` for one token per row (h = H * e; q | k | v | u, head-major).
        state: [B, H, Dk, e] fp32 (or fp64); Dk = 2e with LRPE, else e. Not modified.
        s: [H] decay rates, lam = exp(-s).
        theta: [H, 1, e] LRPE frequencies, or None (no LRPE).
        pos: [B] integer position of each row's token (needed with LRPE).
        act: activation of q and k: "silu" ("swish"), "relu" or "none".
        norm_input: None, or x [B, d] when qkvu = x W^T is the projection of the un-normalised input: its
            SRMSNorm scale is applied to qkvu first (module docstring).

    Returns (y [B, h] in qkvu's dtype, S_new [B, H, Dk, e] in the state's dtype).
    """
    B, H, e, lrpe = check_inputs(qkvu, state, s, theta, pos, act, norm_input)
    qkvu = prescale(qkvu, norm_input, eps)
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
