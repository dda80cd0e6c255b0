"""Packed variable-length sequences: N sequences laid end to end along T, ``cu_seqlens`` their boundaries.

Sequence i is positions [cu_seqlens[i], cu_seqlens[i+1]) of the one packed row; it starts from
``initial_state[i]`` (zero without one), never sees another sequence's tokens, and ends in final state i:
exactly ``lightning_attn`` called once per sequence (which this composes, so forward, backward and the
edge semantics are the op's own). Eager only: the boundaries are read back to the host once per call (a
sync on CUDA), and each sequence is one op call. A fused kernel that takes ``cu_seqlens`` on the device
is future work; this fixes the signature and the semantics it must keep.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._common import check_inputs
from .blocked import DEFAULT_BLOCK
from .op import lightning_attn

_INTS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_cu_seqlens(cu_seqlens, T: int) -> list[int]:
    """The boundaries as a list of ints, checked: 1-D integer tensor [N + 1], 0 first, ``T`` last, non-decreasing."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype not in _INTS or cu_seqlens.dim() != 1:
        got = f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, Tensor) else type(cu_seqlens).__name__
        raise TypeError(f"lightning_attn_varlen: `cu_seqlens` must be a 1-D integer tensor [N + 1], got {got}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"lightning_attn_varlen: `cu_seqlens` must hold N + 1 >= 2 boundaries, got {cu_seqlens.numel()}")
    cu = [int(c) for c in cu_seqlens.tolist()]
    if cu[0] != 0 or cu[-1] != T:
        raise ValueError(f"lightning_attn_varlen: `cu_seqlens` must start at 0 and end at the packed length T = {T}, "
                         f"got {cu[0]} ... {cu[-1]}")
    if any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"lightning_attn_varlen: `cu_seqlens` must be non-decreasing, got {cu}")
    return cu


def lightning_attn_varlen(q: Tensor, k: Tensor, v: Tensor, s: Tensor, cu_seqlens: Tensor,
                          initial_state: Tensor | None = None, output_final_state: bool = False,
                          block_size: int = DEFAULT_BLOCK, check_decay: bool = True):
    """Lightning Attention over N packed sequences.

    Args:
        q, k: [1, H, T, Dk]; v: [1, H, T, Dv]: the sequences end to end (T = their total length).
        s: [H] decay rate, as in ``lightning_attn``.
        cu_seqlens: integer [N + 1], 0 = c_0 <= c_1 <= ... <= c_N = T; sequence i is [c_i, c_{i+1}) (may be empty).
        initial_state: optional [N, H, Dk, Dv], one state per sequence; gradients flow to it.
        output_final_state: also return the N final states [N, H, Dk, Dv] (fp32; fp64 for fp64 inputs).

    Returns o [1, H, T, Dv] in q's dtype, or (o, S) with ``output_final_state``.
    """
    check_inputs(q, k, v, s, None, check_decay=False)      # shapes and dtypes, the op's own errors
    if q.shape[0] != 1:
        raise ValueError(f"lightning_attn_varlen: packed inputs have batch 1 ([1, H, T, D]), got q {tuple(q.shape)}")
    cu = check_cu_seqlens(cu_seqlens, q.shape[2])
    N = len(cu) - 1
    if initial_state is not None and (not isinstance(initial_state, Tensor) or initial_state.dim() != 4
                                      or initial_state.shape[0] != N):
        got = tuple(initial_state.shape) if isinstance(initial_state, Tensor) else type(initial_state).__name__
        raise ValueError(f"lightning_attn_varlen: `initial_state` must have shape [N, H, Dk, Dv] with N = {N} "
                         f"sequences, got {got}")
    outs, finals = [], []
    for i in range(N):
        a, b = cu[i], cu[i + 1]
        S0 = None if initial_state is None else initial_state[i:i + 1]
        o, S = lightning_attn(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], s, initial_state=S0, output_final_state=True,
                              block_size=block_size, check_decay=check_decay and i == 0)
        outs.append(o)
        finals.append(S)
    o = torch.cat(outs, dim=2)
    return (o, torch.cat(finals, dim=0)) if output_final_state else o
