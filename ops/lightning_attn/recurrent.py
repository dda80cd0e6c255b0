"""The recurrent form: S_t = lam S_{t-1} + k_t^T v_t, o_t = q_t S_t.

The update multiplies by lam = exp(-s) <= 1 only, so it stays finite for any length (it never
forms lam^(-t)). ``lightning_attn_step`` is the one-token update used by ``TransNormerLLM.step``
and by the exported recurrent decoder.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._common import acc_dtype, check_inputs


def lightning_attn_step(q: Tensor, k: Tensor, v: Tensor, s: Tensor, state: Tensor):
    """One recurrent step for every head. q, k [B, H, 1, Dk]; v [B, H, 1, Dv]; s [H];
    state [B, H, Dk, Dv] (fp32/fp64). Returns (o [B, H, 1, Dv] in q's dtype, new state).

    Plain aten ops only, so it traces into ONNX and torch.export without a custom op. Written as
    broadcast products and a sum (an outer product and a row-vector times matrix), not matmuls: at
    T = 1 those are pointwise work, which inductor fuses with the neighbouring ops of the decode
    step instead of launching two batched-matmul kernels per layer.
    """
    if q.shape[-2] != 1 or k.shape[-2] != 1 or v.shape[-2] != 1:
        raise ValueError(f"lightning_attn_step: q, k, v must hold one position (T = 1), got "
                         f"{q.shape[-2]}, {k.shape[-2]}, {v.shape[-2]}")
    acc = state.dtype
    lam = torch.exp(-s.to(acc))[:, None, None]                      # [H, 1, 1]
    S = lam * state + k.to(acc).transpose(-1, -2) * v.to(acc)       # [B, H, Dk, 1] * [B, H, 1, Dv]
    o = (q.to(acc).transpose(-1, -2) * S).sum(-2, keepdim=True)     # [B, H, 1, Dv]
    return o.to(q.dtype), S


def lightning_attn_recurrent(q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor | None = None,
                             output_final_state: bool = False):
    """Token-by-token Lightning Attention, same signature and results as ``lightning_attn``.

    A reference form: a Python loop over T, differentiable by autograd.
    """
    check_inputs(q, k, v, s, initial_state)
    acc = acc_dtype(q.dtype)
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    S = (initial_state.to(acc) if initial_state is not None
         else torch.zeros(B, H, Dk, Dv, dtype=acc, device=q.device))
    outs = []
    for t in range(T):
        o, S = lightning_attn_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], s, S)
        outs.append(o)
    o = torch.cat(outs, dim=2) if outs else v.new_zeros(B, H, 0, Dv).to(q.dtype)
    return (o, S) if output_final_state else o
