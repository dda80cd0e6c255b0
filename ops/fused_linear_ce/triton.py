"""The per-chunk softmax cross entropy of the fused linear + cross entropy in one Triton launch.

``ce_rows_triton(logits, target, ignore_index)`` takes one chunk's logits [c, V] (fp16, bf16 or fp32, as the
head's matmul wrote them) and, per row, computes the logsumexp in fp32 (an online max and sum over blocks of
BV columns), the loss term ``lse - logits[target]`` (0 for an ignored row), and then overwrites the row in
place with the gradient of that term, ``softmax - onehot(target)`` (zeros for an ignored row), rounded to the
logits' dtype. A target outside [0, V) (other than ``ignore_index``) gives a NaN loss term and a NaN row.
So the chunk's [c, V] buffer is read twice and written once, and no fp32 copy of it exists;
the next matmuls (dx = g W, dW += g^T x) read it directly.

Grid: one program per row. The maths is ``naive.py``'s ``F.cross_entropy(logits.float(), target)`` per row.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._launch import next_pow2

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


def _kernels():
    import triton
    import triton.language as tl
    from .._triton_interp import patch as _patch_interpreter
    _patch_interpreter()

    @triton.jit
    def ce_rows_kernel(L, TGT, LOSS, s_l, V, ignore_index, BV: tl.constexpr, GRAD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = L + row * s_l
        t = tl.load(TGT + row)
        valid = t != ignore_index
        t = tl.where(valid, t, 0)
        cols0 = tl.arange(0, BV)
        m = tl.full([BV], float("-inf"), tl.float32)
        s = tl.zeros([BV], tl.float32)
        for v0 in range(0, V, BV):
            cols = v0 + cols0
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)   # a lane that has seen only padding so far
            s = s * tl.exp(m - m_ref) + tl.exp(x - m_ref)
            m = m_new
        mx = tl.max(m, 0)                                # finite: V >= 1 real columns
        lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), 0))
        inrange = (t >= 0) & (t < V)                     # a class outside [0, V): NaN, never a plausible loss
        picked = tl.load(base + tl.where(inrange, t, 0)).to(tl.float32)
        tl.store(LOSS + row, tl.where(valid, tl.where(inrange, lse - picked, float("nan")), 0.0))
        if GRAD:
            for v0 in range(0, V, BV):
                cols = v0 + cols0
                msk = cols < V
                x = tl.load(base + cols, mask=msk, other=0.0)
                g = tl.exp(x.to(tl.float32) - lse)
                g = tl.where(cols == t, g - 1.0, g)
                g = tl.where(valid, tl.where(inrange, g, float("nan")), 0.0)
                tl.store(base + cols, g.to(x.dtype), mask=msk)

    return triton, ce_rows_kernel


_get_kernels = functools.cache(_kernels)     # built (and triton imported) at the first launch


def supported(logits_dtype: torch.dtype) -> bool:
    """Whether the kernel takes logits of this dtype (fp64 runs the reference form)."""
    return logits_dtype in _SUPPORTED


def ce_rows_triton(logits: Tensor, target: Tensor, ignore_index: int, grad: bool = True,
                   block: int | None = None) -> Tensor:
    """Per-row loss terms [c] in fp32 of ``logits`` [c, V] (rows contiguous in memory: stride 1 along V)
    against ``target`` [c] int64; with ``grad`` the logits are overwritten in place by
    ``softmax - onehot(target)`` (zeros in ignored rows). ``block`` overrides the columns per step."""
    triton, kernel = _get_kernels()
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"`logits` must be 2-D [c, V] with unit stride along V, got shape {tuple(logits.shape)} "
                         f"and strides {logits.stride()}")
    if not supported(logits.dtype):
        raise ValueError(f"`logits` must be float16, bfloat16 or float32, got {logits.dtype}")
    c, V = logits.shape
    if target.shape != (c,) or target.dtype != torch.int64:
        raise ValueError(f"`target` must be int64 of shape ({c},), got {target.dtype} {tuple(target.shape)}")
    loss = torch.empty(c, device=logits.device, dtype=torch.float32)
    if c == 0:
        return loss
    BV = block or min(4096 if logits.element_size() == 2 else 2048, next_pow2(V))
    kernel[(c,)](logits, target.contiguous(), loss, logits.stride(0), V, ignore_index, BV=BV, GRAD=grad,
                 num_warps=8 if BV >= 2048 else 4)
    return loss
