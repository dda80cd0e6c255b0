"""SRMSNorm: y = x * rsqrt(mean(x^2, -1) + eps), computed in fp32, cast back; no weight."""
from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-6


def srms_norm(x: Tensor, eps: float = EPS) -> Tensor:
    """Simple RMS norm over the last dim, in fp32 inside, returned in x's dtype."""
    xf = x.float() if x.dtype != torch.float64 else x
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
