"""The quadratic (masked) form: the test oracle.

O = ((Q K^T) * D) V + lam^(t+1) q_t S0, with D[t, s] = lam^(t-s) for t >= s (0-based t);
final S = lam^T S0 + sum_s lam^(T-1-s) k_s^T v_s. Memory O(T^2): use it for checking only.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._common import acc_dtype, causal_mask, check_inputs, decay_pow, intra_decay, masked_matmul


def lightning_attn_naive(q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor | None = None,
                         output_final_state: bool = False):
    """Quadratic Lightning Attention. q, k [B, H, T, Dk]; v [B, H, T, Dv]; s [H] decay rate.

    Returns o [B, H, T, Dv] in q's dtype, and the final state [B, H, Dk, Dv] (fp32, fp64 for fp64
    inputs) when ``output_final_state``. Differentiable by autograd.
    """
    check_inputs(q, k, v, s, initial_state)
    acc = acc_dtype(q.dtype)
    T = q.shape[2]
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    sa = s.to(acc)
    D = intra_decay(sa, T, acc)                                    # [H, T, T]
    # Non-finite entries never meet a zero weight inside a product: q and k are zeroed for the score
    # matmul and their rows/columns marked NaN instead, the mask is a where, and v goes through
    # masked_matmul. So a NaN/inf at position t reaches neither o nor dq before t (nor dk, dv after t).
    zero = torch.zeros((), dtype=acc, device=q.device)
    nan = torch.full((), float("nan"), dtype=acc, device=q.device)
    fq, fk = torch.isfinite(qa), torch.isfinite(ka)
    scores = torch.where(fq, qa, zero) @ torch.where(fk, ka, zero).transpose(-1, -2)
    scores = scores + torch.where(fq.all(-1), zero, nan)[..., :, None] + torch.where(fk.all(-1), zero, nan)[..., None, :]
    A = torch.where(causal_mask(T, q.device), scores * D, zero)
    o = masked_matmul(A, va)
    t = torch.arange(T, device=q.device, dtype=acc)
    if initial_state is not None:
        S0 = initial_state.to(acc)
        q_dec = decay_pow(sa[:, None], t + 1)[..., None]           # [H, T, 1]
        o = o + (qa * q_dec) @ S0
    out = o.to(q.dtype)
    if not output_final_state:
        return out
    k_dec = decay_pow(sa[:, None], T - 1 - t)[..., None]           # [H, T, 1]
    S = (ka * k_dec).transpose(-1, -2) @ va
    if initial_state is not None:
        S = S + decay_pow(sa, torch.full_like(sa, T))[:, None, None] * initial_state.to(acc)
    return out, S
