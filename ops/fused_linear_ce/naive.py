"""The reference form of the fused linear + cross entropy, and the argument checks both forms share."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum")


def check_inputs(x: Tensor, weight: Tensor, target: Tensor, ignore_index: int, reduction: str,
                 chunk_tokens: int | None = None, mixed_ok: bool = False) -> None:
    """ValueError naming the argument for anything the loss cannot take."""
    for name, t in (("x", x), ("weight", weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise ValueError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"`x` must be 2-D [N, d], got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"`weight` must be 2-D [V, d], got shape {tuple(weight.shape)}")
    if target.dim() != 1:
        raise ValueError(f"`target` must be 1-D [N], got shape {tuple(target.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"`x` [N, d] and `weight` [V, d] must share d, got x {tuple(x.shape)} and "
                         f"weight {tuple(weight.shape)}")
    if target.shape[0] != x.shape[0]:
        raise ValueError(f"`target` must have one entry per row of `x` ({x.shape[0]}), got {target.shape[0]}")
    if weight.shape[0] < 1:
        raise ValueError("`weight` must have at least one row (the vocabulary size V >= 1)")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"`x` must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"`weight` must be float16, bfloat16, float32 or float64, got {weight.dtype}")
    if x.dtype != weight.dtype and not mixed_ok:
        raise ValueError(f"`x` ({x.dtype}) and `weight` ({weight.dtype}) must have the same dtype outside "
                         "autocast (under autocast both run in the autocast dtype)")
    if target.dtype != torch.int64:
        raise ValueError(f"`target` must be int64 (class indices), got {target.dtype}")
    if not (x.device == weight.device == target.device):
        raise ValueError(f"`x`, `weight` and `target` must be on one device, got {x.device}, {weight.device}, "
                         f"{target.device}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"`ignore_index` must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool)
                                     or chunk_tokens < 1):
        raise ValueError(f"`chunk_tokens` must be an int >= 1, got {chunk_tokens!r}")


def fused_linear_cross_entropy_naive(x: Tensor, weight: Tensor, target: Tensor, ignore_index: int = -100,
                                     reduction: str = "mean") -> Tensor:
    """``F.cross_entropy((x @ weight.T).float(), target)``: the [N, V] logits in fp32 (fp64 for fp64 inputs)."""
    check_inputs(x, weight, target, ignore_index, reduction)
    logits = x @ weight.T
    if logits.dtype != torch.float64:
        logits = logits.float()
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
