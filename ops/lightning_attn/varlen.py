"""Packed variable-length sequences: N sequences laid end to end along T, ``cu_seqlens`` their boundaries.

Sequence i is positions [cu_seqlens[i], cu_seqlens[i+1]) of the one packed row; it starts from
``initial_state[i]`` (zero without one), never sees another sequence's tokens, and ends in final state i:
exactly ``lightning_attn`` called once per sequence, in one op call.

``tnllm::lightning_attn_varlen_fwd`` / ``_bwd`` are torch.library custom ops like the dense pair (fake
kernels with contiguous outputs, autograd through the backward op), so ``torch.compile(fullgraph=True)``
traces a caller with no graph break:

* CUDA: the Triton sweeps with per-program row offsets (``triton.py``): each program reads its sequence's
  start and end from ``cu_seqlens`` on the device, so nothing is read back to the host; the grid depends
  only on N = ``cu_seqlens.numel() - 1``. fp64, or widths over 256, fall back to the blocked form per
  sequence, which reads the boundaries to the host.
* CPU: the blocked form once per sequence (the boundaries are read; a host read costs nothing there).

The boundaries are checked (0 first, non-decreasing, the packed length last): eagerly with a ValueError on
the CPU, by a device-side assertion on CUDA and under torch.compile (no host sync; a bad ``cu_seqlens``
then aborts the CUDA context with the message below).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._common import _is_fake, acc_dtype, check_inputs
from .blocked import DEFAULT_BLOCK, _check_block, blocked_bwd, blocked_fwd

_INTS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_BOUNDS_MSG = ("lightning_attn_varlen: `cu_seqlens` must start at 0, be non-decreasing and end at the packed "
               "length T")


def _boundary_list(cu: Tensor, T: int) -> list[int]:
    """The boundaries read to the host as ints, with the value checks (ValueError naming what is wrong)."""
    c = [int(x) for x in cu.tolist()]
    if c[0] != 0 or c[-1] != T:
        raise ValueError(f"lightning_attn_varlen: `cu_seqlens` must start at 0 and end at the packed length T = {T}, "
                         f"got {c[0]} ... {c[-1]}")
    if any(b < a for a, b in zip(c, c[1:])):
        raise ValueError(f"lightning_attn_varlen: `cu_seqlens` must be non-decreasing, got {c}")
    return c


def check_cu_seqlens(cu_seqlens, device: torch.device, what: str = "q") -> Tensor:
    """``cu_seqlens`` checked by shape, dtype and device (no value read): a 1-D integer tensor [N + 1],
    N >= 1, on ``device`` (``what``'s device, named in the error). Returns it as int32 or int64 (other
    integer dtypes widened to int64)."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype not in _INTS or cu_seqlens.dim() != 1:
        got = f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, Tensor) else type(cu_seqlens).__name__
        raise TypeError(f"lightning_attn_varlen: `cu_seqlens` must be a 1-D integer tensor [N + 1], got {got}")
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"lightning_attn_varlen: `cu_seqlens` must hold N + 1 >= 2 boundaries, got {cu_seqlens.shape[0]}")
    if cu_seqlens.device != torch.device(device):
        raise ValueError(f"lightning_attn_varlen: `cu_seqlens` must be on {what}'s device {device} (the boundaries are "
                         f"read there), got {cu_seqlens.device}")
    return cu_seqlens if cu_seqlens.dtype in (torch.int32, torch.int64) else cu_seqlens.to(torch.int64)


def check_boundary_values(cu: Tensor, T) -> None:
    """0 first, non-decreasing, ``T`` last: a ValueError in eager mode on the CPU; a device-side assertion
    (no host sync) on other devices and under torch.compile (where the CPU kernel checks when it runs)."""
    if cu.device.type == "cpu":
        if not (torch.compiler.is_compiling() or _is_fake(cu)):
            _boundary_list(cu, T)
        return
    if cu.device.type == "meta":
        return
    ok = (cu[0] == 0) & (cu[-1] == T) & (cu[1:] >= cu[:-1]).all()
    torch._assert_async(ok, _BOUNDS_MSG)


# -- the blocked form per sequence (the CPU kernel, and the CUDA fallback) ------------------------------------

def blocked_varlen_fwd(q: Tensor, k: Tensor, v: Tensor, s: Tensor, cu: Tensor, initial_state: Tensor | None,
                       block_size: int = DEFAULT_BLOCK) -> tuple[Tensor, Tensor]:
    """(o [1, H, T, Dv] in q's dtype, final states [N, H, Dk, Dv] in the acc dtype), both contiguous."""
    _, H, T, Dk = q.shape
    Dv = v.shape[-1]
    c = _boundary_list(cu, T)
    o = torch.empty(1, H, T, Dv, dtype=q.dtype, device=q.device)
    finals = []
    for i in range(len(c) - 1):
        a, b = c[i], c[i + 1]
        oi, Si = blocked_fwd(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], s,
                             None if initial_state is None else initial_state[i:i + 1], block_size)
        o[:, :, a:b] = oi
        finals.append(Si)
    return o, torch.cat(finals, dim=0).contiguous()


def blocked_varlen_bwd(do: Tensor, dS: Tensor | None, q: Tensor, k: Tensor, v: Tensor, s: Tensor, cu: Tensor,
                       initial_state: Tensor | None, block_size: int = DEFAULT_BLOCK):
    """(dq, dk, dv in the dtypes of q/k/v, dS0 [N, H, Dk, Dv] in the acc dtype), all contiguous."""
    T = q.shape[2]
    c = _boundary_list(cu, T)
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    dS0 = []
    for i in range(len(c) - 1):
        a, b = c[i], c[i + 1]
        gi = blocked_bwd(do[:, :, a:b], None if dS is None else dS[i:i + 1], q[:, :, a:b], k[:, :, a:b],
                         v[:, :, a:b], s, None if initial_state is None else initial_state[i:i + 1], block_size)
        dq[:, :, a:b], dk[:, :, a:b], dv[:, :, a:b] = gi[:3]
        dS0.append(gi[3])
    return dq, dk, dv, torch.cat(dS0, dim=0).contiguous()


# -- the custom ops ---------------------------------------------------------------------------------------------

@torch.library.custom_op("tnllm::lightning_attn_varlen_fwd", mutates_args=())
def lightning_attn_varlen_fwd(q: Tensor, k: Tensor, v: Tensor, s: Tensor, cu_seqlens: Tensor,
                              initial_state: Tensor | None, block_size: int) -> tuple[Tensor, Tensor]:
    """Packed forward: (o [1, H, T, Dv] in q's dtype, final states [N, H, Dk, Dv] in the acc dtype)."""
    return blocked_varlen_fwd(q, k, v, s, cu_seqlens, initial_state, block_size)


@lightning_attn_varlen_fwd.register_fake
def _(q, k, v, s, cu_seqlens, initial_state, block_size):
    _, H, T, Dk = q.shape
    Dv = v.shape[-1]
    N = cu_seqlens.shape[0] - 1
    return q.new_empty(1, H, T, Dv), q.new_empty(N, H, Dk, Dv, dtype=acc_dtype(q.dtype))


@torch.library.custom_op("tnllm::lightning_attn_varlen_bwd", mutates_args=())
def lightning_attn_varlen_bwd(do: Tensor, dS: Tensor | None, q: Tensor, k: Tensor, v: Tensor, s: Tensor,
                              cu_seqlens: Tensor, initial_state: Tensor | None,
                              block_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Packed backward: (dq, dk, dv, d initial_state [N, H, Dk, Dv]); the last is the gradient a zero
    initial state would get when there is none."""
    return blocked_varlen_bwd(do, dS, q, k, v, s, cu_seqlens, initial_state, block_size)


@lightning_attn_varlen_bwd.register_fake
def _(do, dS, q, k, v, s, cu_seqlens, initial_state, block_size):
    _, H, T, Dk = q.shape
    Dv = v.shape[-1]
    N = cu_seqlens.shape[0] - 1
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(N, H, Dk, Dv, dtype=acc_dtype(q.dtype)))


@lightning_attn_varlen_fwd.register_kernel("cuda")
def _varlen_fwd_cuda(q, k, v, s, cu_seqlens, initial_state, block_size):
    from . import triton as tri
    if not tri.supported(q, v):
        return blocked_varlen_fwd(q, k, v, s, cu_seqlens, initial_state, block_size)
    return tri.lightning_attn_varlen_fwd_triton(q, k, v, s, cu_seqlens, initial_state)


@lightning_attn_varlen_bwd.register_kernel("cuda")
def _varlen_bwd_cuda(do, dS, q, k, v, s, cu_seqlens, initial_state, block_size):
    from . import triton as tri
    if not tri.supported(q, v):
        return blocked_varlen_bwd(do, dS, q, k, v, s, cu_seqlens, initial_state, block_size)
    return tri.lightning_attn_varlen_bwd_triton(do, dS, q, k, v, s, cu_seqlens, initial_state)


def _setup_context(ctx, inputs, output):
    q, k, v, s, cu_seqlens, initial_state, block_size = inputs
    ctx.has_state = initial_state is not None
    ctx.block_size = block_size
    ctx.save_for_backward(q, k, v, s, cu_seqlens, initial_state)


def _backward(ctx, do, dS):
    q, k, v, s, cu, initial_state = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(q[..., :1].expand(*q.shape[:3], v.shape[-1]))
    dq, dk, dv, dS0 = torch.ops.tnllm.lightning_attn_varlen_bwd(do.contiguous(), dS, q, k, v, s, cu, initial_state,
                                                                 ctx.block_size)
    return dq, dk, dv, None, None, (dS0 if ctx.has_state else None), None


lightning_attn_varlen_fwd.register_autograd(_backward, setup_context=_setup_context)


def lightning_attn_varlen(q: Tensor, k: Tensor, v: Tensor, s: Tensor, cu_seqlens: Tensor,
                          initial_state: Tensor | None = None, output_final_state: bool = False,
                          block_size: int = DEFAULT_BLOCK, check_decay: bool = True, check_boundaries: bool = True):
    """Lightning Attention over N packed sequences, one op call.

    Args:
        q, k: [1, H, T, Dk]; v: [1, H, T, Dv]: the sequences end to end (T = their total length).
        s: [H] decay rate, as in ``lightning_attn``.
        cu_seqlens: integer [N + 1] (int32 or int64; other integer dtypes are widened) on q's device,
            0 = c_0 <= c_1 <= ... <= c_N = T; sequence i is [c_i, c_{i+1}) (may be empty).
        initial_state: optional [N, H, Dk, Dv], one state per sequence; gradients flow to it.
        output_final_state: also return the N final states [N, H, Dk, Dv] (fp32; fp64 for fp64 inputs).
            An empty sequence's final state is its initial state (zero without one).
        block_size: block length of the CPU blocked form.
        check_decay: the check of ``s`` of ``lightning_attn``.
        check_boundaries: check the values of ``cu_seqlens`` (a ValueError on the CPU; a device-side
            assertion on CUDA, without a host sync). False skips it, e.g. when one caller passes the same
            checked boundaries to many layers.

    Returns o [1, H, T, Dv] in q's dtype, or (o, S) with ``output_final_state``.
    """
    check_inputs(q, k, v, s, None, check_decay)      # shapes and dtypes, the op's own errors
    if q.shape[0] != 1:
        raise ValueError(f"lightning_attn_varlen: packed inputs have batch 1 ([1, H, T, D]), got q {tuple(q.shape)}")
    _check_block(block_size)
    cu = check_cu_seqlens(cu_seqlens, q.device)
    _, H, T, Dk = q.shape
    N, Dv = cu.shape[0] - 1, v.shape[-1]
    if initial_state is not None:
        if (not isinstance(initial_state, Tensor) or initial_state.dtype not in (torch.float16, torch.bfloat16,
                                                                                 torch.float32, torch.float64)
                or tuple(initial_state.shape) != (N, H, Dk, Dv)):
            got = (f"{initial_state.dtype} {tuple(initial_state.shape)}" if isinstance(initial_state, Tensor)
                   else type(initial_state).__name__)
            raise ValueError(f"lightning_attn_varlen: `initial_state` must be a floating tensor of shape [N, H, Dk, Dv] "
                             f"= {(N, H, Dk, Dv)} with N = {N} sequences, got {got}")
        if initial_state.device != q.device:
            raise ValueError(f"lightning_attn_varlen: `initial_state` must be on q's device {q.device}, got "
                             f"{initial_state.device}")
    if check_boundaries:
        check_boundary_values(cu, T)
    S0 = initial_state.to(acc_dtype(q.dtype)) if initial_state is not None else None
    o, S = torch.ops.tnllm.lightning_attn_varlen_fwd(q, k, v, s.detach(), cu, S0, block_size)
    return (o, S) if output_final_state else o
