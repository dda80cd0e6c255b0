"""``tnllm::fused_linear_cross_entropy``: the loss of ``x @ weight.T`` against ``target`` computed over
chunks of rows, so the [N, V] logits never exist.

Per chunk of rows: logits [c, V], their logsumexp, the loss terms, and, in the same pass, the softmax
gradient (softmax - onehot): on CUDA one Triton kernel over the matmul's logits, in place (``triton.py``);
elsewhere torch ops on fp32 logits (fp64 for fp64 inputs); the chunk's ``dx`` rows are written and ``dW``
accumulated in fp32. The forward returns the loss together with both gradients (``dx`` without the mean's
1 / count, which would push fp16 values into the subnormal range; ``dW`` with it, applied in fp32), and the
backward only scales them by the incoming gradient (the head's matmuls run three
times per step, forward and backward together, instead of four with a recomputing checkpoint).

One ``torch.library`` custom op with a fake kernel and a registered autograd formula, so the loss runs
inside ``torch.compile(fullgraph=True)`` without a graph break.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .naive import check_inputs

_AUTOCAST_DEVICES = ("cpu", "cuda")


def auto_chunk_tokens(n: int, vocab: int, d: int) -> int:
    """Rows per chunk when none is given: about N * d / V, rounded up to a power of two, so one chunk's
    fp32 logits [c, V] are about as large as ``x`` itself (at least 1, at most N)."""
    if n <= 1:
        return 1
    per = max(1, math.ceil(n / max(1, math.ceil(vocab / d))))
    return min(n, 1 << (per - 1).bit_length())


TRITON_CHUNK_BYTES = 256 * 2 ** 20


def triton_chunk_tokens(n: int, vocab: int, itemsize: int) -> int:
    """Rows per chunk on the Triton path when none is given: the largest power of two whose [c, V] logits
    (in the matmul's dtype, the only copy) take at most ``TRITON_CHUNK_BYTES`` (at least 1, at most N)."""
    per = max(1, TRITON_CHUNK_BYTES // max(1, vocab * itemsize))
    return max(1, min(n, 1 << (per.bit_length() - 1)))


_TRITON_ON_CPU = False


def use_triton_on_cpu(enable: bool = True) -> None:
    """Run the Triton row kernel on CPU tensors too (tests under ``TRITON_INTERPRET=1``), or not."""
    global _TRITON_ON_CPU
    _TRITON_ON_CPU = bool(enable)


def _use_triton(x: Tensor) -> bool:
    from . import triton as tri
    if not tri.supported(x.dtype) or not (x.is_cuda or (_TRITON_ON_CPU and x.device.type == "cpu")):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _mean_scale(count: Tensor, mean: bool, acc: torch.dtype) -> Tensor:
    """The factor of the loss's gradient, a 0-dim ``acc`` tensor: 1 / ``count`` (the rows not ignored) for the
    mean (all rows ignored: 1, the gradients being zero then, as F.cross_entropy gives), 1 for the sum."""
    return 1.0 / count.clamp(min=1).to(acc) if mean else torch.ones((), dtype=acc, device=count.device)


def _no_autocast(device: torch.device):
    if device.type in _AUTOCAST_DEVICES:
        return torch.autocast(device.type, enabled=False)
    import contextlib
    return contextlib.nullcontext()


def _chunk_torch(xc: Tensor, w: Tensor, tc: Tensor, vc: Tensor, acc: torch.dtype,
                 need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """One chunk as torch ops: (the loss terms' sum, the unscaled softmax gradient in x's dtype or None)."""
    tc = torch.where(vc, tc, 0).unsqueeze(1)                            # ignored rows pick class 0, masked below
    logits = (xc @ w.T).to(acc)                                          # [c, V]
    lse = torch.logsumexp(logits, dim=1)
    picked = logits.gather(1, tc).squeeze(1)
    loss = torch.where(vc, lse - picked, 0).sum()
    if not need_grad:
        return loss, None
    g = logits.sub_(lse.unsqueeze(1)).exp_()                             # softmax, in place of the logits
    g.scatter_add_(1, tc, torch.full_like(picked, -1.0).unsqueeze(1))
    g.mul_(vc.to(acc).unsqueeze(1))
    return loss, g if g.dtype == xc.dtype else g.to(xc.dtype)


def _fused_impl(x: Tensor, weight: Tensor, target: Tensor, ignore_index: int, chunk_tokens: int, mean: bool,
                need_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    n, d = x.shape
    vocab = weight.shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    fast = _use_triton(x)
    if fast:
        from .triton import ce_rows_triton
    if chunk_tokens > 0:
        c = chunk_tokens
    else:
        c = triton_chunk_tokens(n, vocab, x.element_size()) if fast else auto_chunk_tokens(n, vocab, d)
    with _no_autocast(x.device):
        w = weight if weight.dtype == x.dtype else weight.to(x.dtype)
        valid = target != ignore_index
        count = valid.sum()
        loss = torch.zeros((), dtype=acc, device=x.device)
        if need_grad:
            scale = _mean_scale(count, mean, acc)
            dx = torch.empty_like(x)
            dw = torch.zeros(weight.shape, dtype=acc, device=x.device)
        else:
            dx, dw = x.new_empty(0), weight.new_empty(0)
        for i in range(0, n, c):
            xc = x[i:i + c]
            if fast:
                # logits in the matmul's dtype; one kernel turns them into the loss terms and, in place, the
                # unscaled softmax gradient
                g = xc @ w.T
                loss = loss + ce_rows_triton(g, target[i:i + c], ignore_index, grad=need_grad).sum()
            else:
                part, g = _chunk_torch(xc, w, target[i:i + c], valid[i:i + c], acc, need_grad)
                loss = loss + part
            if not need_grad:
                continue
            # g is not yet scaled by 1 / count: softmax / count (~1e-9 at V = 64k) underflows in fp16, and dx
            # rows (bounded by 2 max|w|) stay in range; the backward applies 1 / count and the incoming gradient
            torch.mm(g, w, out=dx[i:i + c])                               # dx is contiguous: rows are a view
            if g.dtype == acc:
                dw.addmm_(g.T, xc)
            elif dw.is_cuda:
                # fp16/bf16 operands accumulated by cuBLAS straight into the fp32 dW (beta = 1): no rounded
                # product and no separate fp32 add over [V, d] per chunk
                torch.addmm(dw, g.T, xc, out_dtype=acc, out=dw)
            else:
                dw.add_(g.T @ xc)                                        # bf16/fp16 product, fp32 accumulation
        if mean:
            loss = loss / count                                         # 0 / 0 = NaN when all rows are ignored
        if need_grad:
            dw.mul_(scale)                                               # fp32: the sum over rows may not fit fp16
            dw = dw if dw.dtype == weight.dtype else dw.to(weight.dtype)
    return loss.float() if acc == torch.float32 else loss, dx, dw


@torch.library.custom_op("tnllm::fused_linear_cross_entropy", mutates_args=())
def _fused(x: Tensor, weight: Tensor, target: Tensor, ignore_index: int, chunk_tokens: int, mean: bool,
           need_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _fused_impl(x.contiguous(), weight, target, ignore_index, chunk_tokens, mean, need_grad)


@_fused.register_fake
def _(x, weight, target, ignore_index, chunk_tokens, mean, need_grad):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    loss = x.new_empty((), dtype=acc)
    if need_grad:
        return loss, torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
            weight, memory_format=torch.contiguous_format)
    return loss, x.new_empty(0), weight.new_empty(0)


def _setup_context(ctx, inputs, output):
    _, dx, dw = output
    x, _, target, ignore_index, _, mean, need_grad = inputs
    ctx.need_grad = need_grad
    # dx comes out of the forward without the mean's 1 / count (see _fused_impl): kept here, in fp32
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    ctx.save_for_backward(dx, dw, _mean_scale((target != ignore_index).sum(), mean, acc))


def _backward(ctx, g_loss, _g_dx, _g_dw):
    if not ctx.need_grad:
        raise RuntimeError("fused_linear_cross_entropy ran without gradients (no input required grad, or "
                           "grad mode was off); backward is not available")
    dx, dw, scale = ctx.saved_tensors
    # one rounding: the 0-dim fp32 factor keeps dx's dtype, the product is formed at fp32 (a loss scaler's
    # large g_loss then lifts fp16 gradients out of the subnormal range before they are rounded)
    return (dx * (g_loss.to(scale.dtype) * scale), dw * g_loss.to(dw.dtype), None, None, None, None, None)


_fused.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_cross_entropy(x: Tensor, weight: Tensor, target: Tensor, ignore_index: int = -100,
                               chunk_tokens: Optional[int] = None, reduction: str = "mean") -> Tensor:
    """Cross entropy of the logits ``x @ weight.T`` against ``target``, without the [N, V] logits.

    Equal (to fp rounding) to ``F.cross_entropy((x @ weight.T).float(), target, ignore_index=...,
    reduction=...)``, gradients of ``x`` and ``weight`` included.

    Args:
        x: [N, d] the head's inputs (after the final norm); fp16, bf16, fp32 or fp64.
        weight: [V, d] the head's weight (``lm_head.weight``), the same dtype as ``x`` outside autocast;
            under autocast (cpu or cuda) both run in the autocast dtype, and ``weight``'s gradient comes
            back in its own dtype (fp32 master weights get an fp32 gradient accumulated in fp32).
        target: [N] int64 class indices in [0, V), or ``ignore_index``.
        ignore_index: rows with this target add nothing to the loss or the gradients and are not counted
            in the mean.
        chunk_tokens: rows per chunk (the peak extra memory is one chunk's [chunk_tokens, V] logits);
            None: on the Triton path (CUDA, fp16/bf16/fp32) the largest power of two whose logits in the
            matmul's dtype take at most 256 MiB; elsewhere about N * d / V rows, a power of two (one
            chunk's fp32 logits are then about the size of ``x``).
        reduction: "mean" (over the rows not ignored; all rows ignored gives NaN with zero gradients,
            as ``F.cross_entropy`` does) or "sum" (0 with zero gradients when all are ignored).

    On CUDA (fp16, bf16, fp32) each chunk is three matmuls around one Triton kernel: the logits in the
    input dtype (as ``x @ weight.T`` rounds them), then per row the fp32 logsumexp and loss term, with the
    softmax gradient written over the logits in place. Elsewhere (CPU, fp64) the chunk's logits are
    upcast to fp32 (fp64 for fp64 inputs) and the same maths runs as torch ops. The matmuls run in the
    input dtype and ``dW`` is accumulated over chunks in fp32. A target outside [0, V) gives a NaN loss
    on the Triton path. The gradients are computed in
    the forward (when grad mode is on and ``x`` or ``weight`` requires grad), so the loss supports one
    backward and no double backward. Returns a 0-dim tensor: fp32, or fp64 for fp64 inputs.
    """
    mixed = False
    dev = x.device.type if isinstance(x, Tensor) else None
    if dev in _AUTOCAST_DEVICES and torch.is_autocast_enabled(dev):
        mixed = True
        cast = torch.get_autocast_dtype(dev)
        if x.dtype in (torch.float16, torch.bfloat16, torch.float32):
            x = x.to(cast)
    check_inputs(x, weight, target, ignore_index, reduction, chunk_tokens, mixed_ok=mixed)
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    loss, _, _ = torch.ops.tnllm.fused_linear_cross_entropy(x, weight, target, ignore_index, chunk_tokens or 0,
                                                            reduction == "mean", need_grad)
    return loss
