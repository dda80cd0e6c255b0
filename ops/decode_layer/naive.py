"""The reference of one whole decoder layer's decode step (one token per row), in plain PyTorch.

The maths of ``tnllm.compile.FusedDecodeStep`` for one layer, i.e. of the model's ``step`` with the two
weight-free SRMSNorms folded in as per-row scales (srms_norm(x) W^T = r(x) x W^T, r = rsqrt(mean(x^2) + eps)):

    qkvu = round(r(x) * x Wqkvu^T)                        # [B, 4h]: q | k | v | u, head-major
    y    = gla_decode(qkvu, S)                            # act, LRPE, S <- lam S + k^T v, o = q S, srms_norm(o) * u
    x    = round(x + y Wout^T)                            # the token mixer's residual
    a, b = round(r(x) * x W1^T), round(r(x) * x W2^T)
    g    = round(round(act(a)) * b)                       # SGLU
    x    = round(x + g W3^T)                              # the channel mixer's residual

Each product accumulates in fp32 (fp64 for fp64 inputs) and is rounded once to the model dtype, as a
kernel with the scale and the residual in its epilogue does; the token mixer is ``gla_decode_naive``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..gla_decode.naive import ACTS, check_mixer_args, gla_decode_naive, norm_scale
from ..norm import EPS

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(x: Tensor, state: Tensor, wqkvu: Tensor, wout: Tensor, w1: Tensor, w2: Tensor, w3: Tensor,
                 s: Tensor, theta: Tensor | None, pos: Tensor | None, act: str, glu_act: str) -> tuple[int, ...]:
    """Shapes, dtypes and devices of one layer's decode step; returns (B, d, H, Dk, e, g). Reads no data."""
    name = "decode_layer_step"
    named = (("x", x), ("state", state), ("wqkvu", wqkvu), ("wout", wout), ("w1", w1), ("w2", w2), ("w3", w3),
             ("s", s))
    for arg, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: `{arg}` must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2 or x.dtype not in _FLOATS:
        raise ValueError(f"{name}: `x` (the residual stream, one token per row) must be a float tensor [B, d], got "
                         f"{x.dtype} {tuple(x.shape)}")
    B, d = x.shape
    if state.dim() != 4 or state.shape[0] != B:
        raise ValueError(f"{name}: `state` must have shape [B, H, Dk, e] with B = {B}, got {tuple(state.shape)}")
    if state.dtype != (torch.float64 if x.dtype == torch.float64 else torch.float32):
        raise TypeError(f"{name}: `state` must be fp32 (fp64 with fp64 inputs), got {state.dtype}")
    _, H, Dk, e = state.shape
    h = H * e
    for arg, w, shape in (("wqkvu", wqkvu, (4 * h, d)), ("wout", wout, (d, h))):
        if tuple(w.shape) != shape:
            raise ValueError(f"{name}: `{arg}` must have shape {shape} for x {tuple(x.shape)} and state "
                             f"{tuple(state.shape)}, got {tuple(w.shape)}")
    if w1.dim() != 2 or w1.shape[1] != d or tuple(w2.shape) != tuple(w1.shape):
        raise ValueError(f"{name}: `w1` and `w2` must both have shape [g, d] with d = {d}, got {tuple(w1.shape)} and "
                         f"{tuple(w2.shape)}")
    g = w1.shape[0]
    if tuple(w3.shape) != (d, g):
        raise ValueError(f"{name}: `w3` must have shape [d, g] = {(d, g)}, got {tuple(w3.shape)}")
    for arg, t in named[2:7]:
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: `{arg}` must have x's dtype {x.dtype}, got {t.dtype}")
    for arg, t in named[1:]:
        if t.device != x.device:
            raise ValueError(f"{name}: `{arg}` is on {t.device}, `x` on {x.device}")
    check_mixer_args(name, state, s, theta, pos)
    for arg, a in (("act", act), ("glu_act", glu_act)):
        if a not in ACTS:
            raise ValueError(f"{name}: `{arg}` must be one of {sorted(ACTS)}, got {a!r}")
    return B, d, H, Dk, e, g


def _proj(x: Tensor, w: Tensor, scale: Tensor | None = None) -> Tensor:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = x.to(acc) @ w.to(acc).t()
    return (out if scale is None else out * scale).to(x.dtype)


def decode_layer_naive(x: Tensor, state: Tensor, wqkvu: Tensor, wout: Tensor, w1: Tensor, w2: Tensor, w3: Tensor,
                       s: Tensor, theta: Tensor | None = None, pos: Tensor | None = None, act: str = "silu",
                       glu_act: str = "none", eps: float = EPS) -> tuple[Tensor, Tensor]:
    """(x_new [B, d] in x's dtype, S_new [B, H, Dk, e]) for one layer and one token per row (module docstring);
    ``x`` and ``state`` are left alone."""
    check_inputs(x, state, wqkvu, wout, w1, w2, w3, s, theta, pos, act, glu_act)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    qkvu = _proj(x, wqkvu, norm_scale(x, eps))
    y, S = gla_decode_naive(qkvu, state, s, theta, pos if theta is not None else None, act, eps=eps)
    x = (x.to(acc) + y.to(acc) @ wout.to(acc).t()).to(x.dtype)
    r = norm_scale(x, eps)
    a, b = _proj(x, w1, r), _proj(x, w2, r)
    g = (ACTS[glu_act](a.to(acc)).to(x.dtype).to(acc) * b.to(acc)).to(x.dtype)
    x = (x.to(acc) + g.to(acc) @ w3.to(acc).t()).to(x.dtype)
    return x, S


def _layer_list(arg: str, value, L: int | None, name: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}: `{arg}` must be a list of per-layer tensors, got {type(value).__name__}")
    if L is not None and len(value) != L:
        raise ValueError(f"{name}: `{arg}` has {len(value)} entries, `wqkvu` {L}: one per layer in each list")
    return list(value)


def check_stack_inputs(x: Tensor, state: Tensor, wqkvu, wout, w1, w2, w3, s, theta, pos: Tensor | None, act: str,
                       glu_act: str) -> tuple[int, ...]:
    """Shapes, dtypes and devices of L layers' decode step (``decode_stack_naive``); returns (L, B, d, H, Dk, e, g).
    Every layer is checked as ``check_inputs`` checks one. Reads no data."""
    name = "decode_stack_step"
    wq = _layer_list("wqkvu", wqkvu, None, name)
    L = len(wq)
    if L == 0:
        raise ValueError(f"{name}: `wqkvu` is empty: the stack needs at least one layer")
    lists = [wq] + [_layer_list(a, v, L, name) for a, v in (("wout", wout), ("w1", w1), ("w2", w2), ("w3", w3),
                                                             ("s", s))]
    thetas = None if theta is None else _layer_list("theta", theta, L, name)
    if thetas is not None and any(t is None for t in thetas):
        raise ValueError(f"{name}: `theta` has None for some layers: a stack's layers all have LRPE (a tensor each) or "
                         f"none has (theta=None); launch layers of the two kinds as separate stacks")
    if not isinstance(state, Tensor) or state.dim() != 5 or state.shape[0] != L:
        got = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
        raise ValueError(f"{name}: `state` must be one tensor [L, B, H, Dk, e] with L = {L} (the layers' states "
                         f"stacked), got {got}")
    for i in range(L):
        try:
            dims = check_inputs(x, state[i], *(ws[i] for ws in lists), None if thetas is None else thetas[i], pos, act,
                                glu_act)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{name}: layer {i}: {str(err).split(': ', 1)[-1]}") from None
    return (L, *dims)


def decode_stack_naive(x: Tensor, state: Tensor, wqkvu, wout, w1, w2, w3, s, theta=None, pos: Tensor | None = None,
                       act: str = "silu", glu_act: str = "none", eps: float = EPS) -> tuple[Tensor, Tensor]:
    """(x_new [B, d], S_new [L, B, H, Dk, e]) for L layers in order, each ``decode_layer_naive``: ``state`` is
    the layers' states stacked, the weights, ``s`` and ``theta`` (None: no LRPE) lists of one tensor per layer.
    ``x`` and ``state`` are left alone."""
    L = check_stack_inputs(x, state, wqkvu, wout, w1, w2, w3, s, theta, pos, act, glu_act)[0]
    out = []
    for i in range(L):
        x, S = decode_layer_naive(x, state[i], wqkvu[i], wout[i], w1[i], w2[i], w3[i], s[i],
                                  None if theta is None else theta[i], pos, act, glu_act, eps)
        out.append(S)
    return x, torch.stack(out)
