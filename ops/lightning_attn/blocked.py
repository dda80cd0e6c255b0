"""The blocked form (Lightning Attention-2) in PyTorch: the CPU kernel of the op.

The sequence is cut into blocks of C positions (the last may be shorter: c_n <= C). Inside a
block the masked quadratic form ("intra"); across blocks the running state S [Dk, Dv] in the
accumulation dtype ("inter"). For block n with state S_n before it and local position j:

    o_j      = sum_{i<=j} lam^(j-i) (q_j . k_i) v_i  +  lam^(j+1) q_j S_n
    S_{n+1}  = lam^(c_n) S_n + sum_i lam^(c_n-1-i) k_i^T v_i

The intra products of all blocks run as one batched matmul; only the [Dk, Dv] state update is a
sequential scan over the T/C blocks, so memory is O(T (C + Dk Dv / C)), never T x T.

The backward is written out by hand with the mirrored split (not autograd through the scan):
dq takes a forward sweep over the recomputed states, dk/dv a reverse sweep over dS, where
    dS_n(before block n) = lam^(c_n) dS_{n+1} + sum_j lam^(j+1) q_j^T do_j
    dk_i = intra + lam^(c_n-1-i) v_i dS_{n+1}^T,   dv_i = intra + lam^(c_n-1-i) k_i dS_{n+1}
and the gradient of the initial state is dS_0. All decays are lam^m with m >= 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import acc_dtype, causal_mask, check_inputs, decay_pow, intra_decay, masked_matmul

DEFAULT_BLOCK = 64


class _Tables:
    """Decay tables for T positions cut into blocks of C, in dtype ``acc``.

    D [H, 1, C, C] intra mask; q_dec [H, 1, C, 1] = lam^(j+1); k_dec [H, nb, C, 1] = lam^(c_n-1-i)
    (zero past the tail); blk [H, nb, 1, 1] = lam^(c_n).
    """

    def __init__(self, s: Tensor, T: int, C: int, acc: torch.dtype):
        nb = max(1, -(-T // C))
        sa = s.to(acc)
        j = torch.arange(C, device=s.device, dtype=acc)
        c = torch.full((nb,), C, device=s.device, dtype=acc)
        c[-1] = T - (nb - 1) * C                                    # tail block length
        self.nb, self.C = nb, C
        self.D = intra_decay(sa, C, acc)[:, None]
        self.mask = causal_mask(C, s.device)
        self.q_dec = decay_pow(sa[:, None], j + 1)[:, None, :, None]
        kexp = c[:, None] - 1 - j[None, :]                          # [nb, C]
        zero = torch.zeros((), dtype=acc, device=s.device)
        self.k_dec = torch.where(kexp >= 0, decay_pow(sa[:, None, None], kexp.clamp(min=0)), zero)[..., None]
        self.blk = decay_pow(sa[:, None], c[None, :])[..., None, None]

    def causal(self, scores: Tensor) -> Tensor:
        """scores * D on and below the diagonal, exact 0 above it (a where: 0 * NaN would be NaN)."""
        return torch.where(self.mask, scores * self.D, torch.zeros((), dtype=scores.dtype, device=scores.device))


def _blocks(x: Tensor, C: int, nb: int, acc: torch.dtype) -> Tensor:
    """[B, H, T, D] -> [B, H, nb, C, D] in ``acc``, zero-padded at the tail."""
    B, H, T, D = x.shape
    x = x.to(acc)
    if nb * C != T:
        x = F.pad(x, (0, 0, 0, nb * C - T))
    return x.reshape(B, H, nb, C, D)


def _scan_states(kv: Tensor, blk: Tensor, S0: Tensor | None) -> tuple[Tensor, Tensor]:
    """States before each block and after the last: kv [B, H, nb, Dk, Dv] -> ([B, H, nb, Dk, Dv], [B, H, Dk, Dv])."""
    B, H, nb, Dk, Dv = kv.shape
    S = kv.new_zeros(B, H, Dk, Dv) if S0 is None else S0.to(kv.dtype)
    before = []
    for n in range(nb):
        before.append(S)
        S = blk[:, n] * S + kv[:, :, n]
    return torch.stack(before, dim=2), S


def blocked_fwd(q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor | None = None,
                block_size: int = DEFAULT_BLOCK) -> tuple[Tensor, Tensor]:
    """Blocked forward. Returns (o [B, H, T, Dv] in q's dtype, contiguous; final S [B, H, Dk, Dv] in acc dtype)."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    acc = acc_dtype(q.dtype)
    if T == 0:
        # a copy, never the input itself: a custom op's output may not alias an input
        S = (initial_state.to(acc, copy=True) if initial_state is not None else q.new_zeros(B, H, Dk, Dv, dtype=acc))
        return v.new_empty(B, H, 0, Dv).to(q.dtype), S.contiguous()
    C = block_size
    tb = _Tables(s, T, C, acc)
    Q, K, V = (_blocks(x, C, tb.nb, acc) for x in (q, k, v))
    kv = (K * tb.k_dec).transpose(-1, -2) @ V                      # [B, H, nb, Dk, Dv]
    S_before, S_last = _scan_states(kv, tb.blk, initial_state)
    O = masked_matmul(tb.causal(Q @ K.transpose(-1, -2)), V) + (Q * tb.q_dec) @ S_before
    o = O.reshape(B, H, tb.nb * C, Dv)[:, :, :T]
    return o.to(q.dtype).contiguous(), S_last.contiguous()


def blocked_bwd(do: Tensor, dS: Tensor | None, q: Tensor, k: Tensor, v: Tensor, s: Tensor,
                initial_state: Tensor | None = None, block_size: int = DEFAULT_BLOCK):
    """Blocked backward. ``do`` [B, H, T, Dv], ``dS`` [B, H, Dk, Dv] or None (grad of the final state).

    Returns (dq, dk, dv, dS0): dq/dk/dv in the dtypes of q/k/v, dS0 in the acc dtype (zeros-shaped
    like the state when there is no initial state), all contiguous.
    """
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    acc = acc_dtype(q.dtype)
    if T == 0:
        dS0 = dS.to(acc, copy=True) if dS is not None else q.new_zeros(B, H, Dk, Dv, dtype=acc)
        return (torch.zeros_like(q, memory_format=torch.contiguous_format), torch.zeros_like(k, memory_format=torch.contiguous_format),
                torch.zeros_like(v, memory_format=torch.contiguous_format), dS0.contiguous())
    C = block_size
    tb = _Tables(s, T, C, acc)
    Q, K, V, dO = (_blocks(x, C, tb.nb, acc) for x in (q, k, v, do))
    # forward sweep: recompute the states before each block -> dq
    kv = (K * tb.k_dec).transpose(-1, -2) @ V
    S_before, _ = _scan_states(kv, tb.blk, initial_state)
    P = tb.causal(dO @ V.transpose(-1, -2))                        # [.., C(j), C(i)] = lam^(j-i) do_j . v_i
    dQ = masked_matmul(P, K) + (dO * tb.q_dec) @ S_before.transpose(-1, -2)
    # reverse sweep over dS: state gradient after each block
    qdo = (Q * tb.q_dec).transpose(-1, -2) @ dO                    # [B, H, nb, Dk, Dv]
    G = dS.to(acc) if dS is not None else kv.new_zeros(B, H, Dk, Dv)
    after = [None] * tb.nb
    for n in range(tb.nb - 1, -1, -1):
        after[n] = G
        G = tb.blk[:, n] * G + qdo[:, :, n]
    G_after = torch.stack(after, dim=2)                            # [B, H, nb, Dk, Dv]
    A = tb.causal(Q @ K.transpose(-1, -2))                         # [.., j, i]
    # the intra products never let a non-finite row meet a zero weight (masked_matmul): a NaN in
    # k or v at t stays out of dq before t; one in q at t stays out of dk and dv after t
    dK = masked_matmul(P.transpose(-1, -2), Q, reverse=True) + (V @ G_after.transpose(-1, -2)) * tb.k_dec
    dV = masked_matmul(A.transpose(-1, -2), dO, reverse=True) + (K * tb.k_dec) @ G_after

    def unblock(x: Tensor, like: Tensor) -> Tensor:
        return x.reshape(B, H, tb.nb * C, x.shape[-1])[:, :, :T].to(like.dtype).contiguous()

    return unblock(dQ, q), unblock(dK, k), unblock(dV, v), G.contiguous()


def lightning_attn_blocked(q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor | None = None,
                           output_final_state: bool = False, block_size: int = DEFAULT_BLOCK):
    """The blocked form called directly (no custom op), differentiable through the hand-written backward."""
    check_inputs(q, k, v, s, initial_state)
    _check_block(block_size)
    S0 = initial_state.to(acc_dtype(q.dtype)) if initial_state is not None else None
    o, S = _BlockedFn.apply(q, k, v, s, S0, block_size)
    return (o, S) if output_final_state else o


def _check_block(block_size) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"lightning_attn: `block_size` must be a positive int, got {block_size!r}")


class _BlockedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, s, S0, block_size):
        o, S = blocked_fwd(q, k, v, s, S0, block_size)
        ctx.save_for_backward(q, k, v, s, S0)
        ctx.block_size = block_size
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        q, k, v, s, S0 = ctx.saved_tensors
        dq, dk, dv, dS0 = blocked_bwd(do, dS, q, k, v, s, S0, ctx.block_size)
        return dq, dk, dv, None, (dS0 if S0 is not None else None), None
