"""The reference SGLU gate, in plain PyTorch: the model's ``GLU`` between its projections and ``l3``.

    a, b = split(l12)              # [B, g] each: l1 x and l2 x, one [2g, d] projection
    g = act(a) * b                 # act in the input dtype, then the product, rounded as in the model

With ``norm_input`` x [B, d], l12 is the projection of x itself rather than of srms_norm(x): x's
SRMSNorm scale is applied first, l12 <- round(l12 * rsqrt(mean(x^2) + eps)), which folds the layer's
channel norm into the gate (SRMSNorm has no weight, so srms_norm(x) W^T = r(x) x W^T).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..gla_decode.naive import check_norm_input, prescale
from ..norm import EPS

ACTS = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "none": lambda x: x}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(l12: Tensor, norm_input: Tensor | None, act: str) -> tuple[int, int]:
    """Shapes, dtypes and devices; returns (B, g). Reads no data."""
    name = "sglu_gate"
    if not isinstance(l12, Tensor):
        raise TypeError(f"{name}: `l12` must be a torch.Tensor, got {type(l12).__name__}")
    if l12.dim() != 2 or l12.shape[1] % 2:
        raise ValueError(f"{name}: `l12` must have shape [B, 2g] (the l1 | l2 projections side by side), got "
                         f"{tuple(l12.shape)}")
    if l12.dtype not in _FLOATS:
        raise TypeError(f"{name}: `l12` must be fp16, bf16, fp32 or fp64, got {l12.dtype}")
    if act not in ACTS:
        raise ValueError(f"{name}: `act` must be one of {sorted(ACTS)}, got {act!r}")
    check_norm_input(name, norm_input, l12.shape[0], l12)
    return l12.shape[0], l12.shape[1] // 2


def sglu_gate_naive(l12: Tensor, norm_input: Tensor | None = None, act: str = "none", eps: float = EPS) -> Tensor:
    """act(a) * b for [a | b] = l12 [B, 2g] -> [B, g] in l12's dtype (module docstring)."""
    check_inputs(l12, norm_input, act)
    a, b = prescale(l12, norm_input, eps).chunk(2, dim=-1)
    return ACTS[act](a) * b
