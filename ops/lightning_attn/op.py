"""``tnllm::lightning_attn_fwd`` / ``tnllm::lightning_attn_bwd``: the torch.library registration.

* CPU (and any non-CUDA device): the blocked PyTorch form (``blocked.py``).
* CUDA: the Triton kernels (``triton.py``), imported lazily on first CUDA call.
* A fake kernel for tracing whose outputs have exactly the real ones' strides (inductor's custom-op layout
  constraint is "needs_exact_strides": a mismatch breaks compiled backward): o and the states contiguous; dq, dk
  and dv dense in the order of heads and positions of q, k and v (``empty_grad``: token-major for the model's
  head slices of its [B, T, 4h] projection, whose gradient then needs no transposing copy).
* Autograd through ``register_autograd``; the backward is itself a custom op, so compiled
  training graphs hold the two ops and nothing traced from Python.

The op is opaque to torch.compile, so its Python bodies are called at run time and never cached.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._common import acc_dtype, check_inputs, empty_grad, grads_in_layout
from .blocked import DEFAULT_BLOCK, _check_block, blocked_bwd, blocked_fwd


@torch.library.custom_op("tnllm::lightning_attn_fwd", mutates_args=())
def lightning_attn_fwd(q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor | None,
                       block_size: int) -> tuple[Tensor, Tensor]:
    """Forward: (o [B, H, T, Dv] in q's dtype, final state [B, H, Dk, Dv] in the acc dtype)."""
    return blocked_fwd(q, k, v, s, initial_state, block_size)


@lightning_attn_fwd.register_fake
def _(q, k, v, s, initial_state, block_size):
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    return q.new_empty(B, H, T, Dv), q.new_empty(B, H, Dk, Dv, dtype=acc_dtype(q.dtype))


@torch.library.custom_op("tnllm::lightning_attn_bwd", mutates_args=())
def lightning_attn_bwd(do: Tensor, dS: Tensor | None, q: Tensor, k: Tensor, v: Tensor, s: Tensor,
                       initial_state: Tensor | None, block_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward: (dq, dk, dv, d initial_state); the last is zeros when there is no initial state. dq, dk and dv
    are laid out as ``empty_grad`` of q, k and v."""
    return grads_in_layout(q, k, v, blocked_bwd(do, dS, q, k, v, s, initial_state, block_size))


@lightning_attn_bwd.register_fake
def _(do, dS, q, k, v, s, initial_state, block_size):
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    return empty_grad(q), empty_grad(k), empty_grad(v), q.new_empty(B, H, Dk, Dv, dtype=acc_dtype(q.dtype))


@lightning_attn_fwd.register_kernel("cuda")
def _fwd_cuda(q, k, v, s, initial_state, block_size):
    from . import triton as tri
    return tri.lightning_attn_fwd_triton(q, k, v, s, initial_state)


@lightning_attn_bwd.register_kernel("cuda")
def _bwd_cuda(do, dS, q, k, v, s, initial_state, block_size):
    from . import triton as tri
    return tri.lightning_attn_bwd_triton(do, dS, q, k, v, s, initial_state)


def _setup_context(ctx, inputs, output):
    q, k, v, s, initial_state, block_size = inputs
    ctx.has_state = initial_state is not None
    ctx.block_size = block_size
    ctx.save_for_backward(q, k, v, s, initial_state)


def _backward(ctx, do, dS, bwd=None):
    """The forward op's backward, through the backward op, or through ``bwd`` (the eager fast path's kernels)."""
    q, k, v, s, initial_state = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(q[..., :1].expand(*q.shape[:3], v.shape[-1]))
    bwd = bwd or torch.ops.tnllm.lightning_attn_bwd
    dq, dk, dv, dS0 = bwd(do.contiguous(), dS, q, k, v, s, initial_state, ctx.block_size)
    return dq, dk, dv, None, (dS0 if ctx.has_state else None), None


lightning_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def lightning_attn(q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor | None = None,
                   output_final_state: bool = False, block_size: int = DEFAULT_BLOCK, check_decay: bool = True):
    """Causal decayed linear attention: o_t = sum_{s<=t} lam^(t-s) (q_t . k_s) v_s + lam^(t+1) q_t S0.

    Args:
        q, k: [B, H, T, Dk]; v: [B, H, T, Dv]; one float dtype (fp16, bf16, fp32, fp64). Layout [B, H, T, D]
            (fla uses [B, T, H, K]).
        s: [H] non-negative decay rate, lam = exp(-s); no gradient flows to it.
        initial_state: optional [B, H, Dk, Dv] state to continue from; gradients flow to it.
        output_final_state: also return the final state [B, H, Dk, Dv] (fp32; fp64 for fp64 inputs).
        block_size: block length C of the CPU blocked form (the Triton path picks its own tiles).
        check_decay: verify every entry of s is >= 0 (inf allowed, NaN rejected: ValueError). The
            verdict is remembered per tensor and its version counter, so a fixed rate tensor is read
            back to the host once, and again only after an in-place change. Under torch.compile and
            while a CUDA graph is being captured, a tensor not checked before gets a device-side
            assertion instead of a host read. False skips the check.

    Returns o [B, H, T, Dv] in q's dtype, or (o, S) with ``output_final_state``.
    """
    check_inputs(q, k, v, s, initial_state, check_decay)
    _check_block(block_size)
    acc = acc_dtype(q.dtype)
    S0 = initial_state.to(acc) if initial_state is not None else None
    if EAGER_FAST_PATH and _plain_eager(q, k, v, s, S0):
        o, S = _LightningAttnEager.apply(q, k, v, s.detach(), S0, block_size)
    else:
        o, S = torch.ops.tnllm.lightning_attn_fwd(q, k, v, s.detach(), S0, block_size)
    return (o, S) if output_final_state else o


# -- the eager fast path -----------------------------------------------------------------------------------------
# In plain eager mode the public call skips the dispatcher: an autograd.Function runs the same kernels as the ops
# (``_fwd_kernel`` / ``_bwd_kernel``: Triton on CUDA, the blocked form elsewhere), so outputs and gradients are
# bit-identical. The custom op's Python wrappers (the dispatcher round trips, the output aliasing check, the
# generated autograd node and its backward op) cost about 60 us per forward + backward on a fast CPU and several
# hundred on a GPU host, where the eager op is otherwise host-bound at the 385M training shape. Whenever anything
# may be watching or transforming the call, the op is called instead, so every tracer, mode and policy sees
# ``tnllm::lightning_attn_fwd``: torch.compile / export (``is_compiling``), dispatch modes (fake tensors, make_fx,
# selective activation checkpointing, FlopCounterMode, the tests' counters), torch-function modes other than the
# default-device one, torch.func transforms (vmap), torch.jit tracing and tensor subclasses (DTensor, FakeTensor,
# functional tensors). The default-device mode (``torch.set_default_device``, ``with torch.device(...)``) only
# fills in the device of factory calls that name none; the kernels name theirs, so it keeps the fast path.
EAGER_FAST_PATH = True


def _plain_eager(*tensors) -> bool:
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._are_functorch_transforms_active() or torch._C._get_tracing_state() is not None):
        return False
    if torch._C._is_torch_function_mode_enabled() and not _only_device_modes():
        return False
    return all(t is None or type(t) is Tensor or type(t) is torch.nn.Parameter for t in tensors)


def _only_device_modes() -> bool:
    """Whether every active torch-function mode is the default-device one (``torch.set_default_device``)."""
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._device import DeviceContext
    stack = _get_current_function_mode_stack()
    return bool(stack) and all(type(m) is DeviceContext for m in stack)


def _fwd_kernel(q, k, v, s, initial_state, block_size):
    if q.device.type == "cuda":
        return _fwd_cuda(q, k, v, s, initial_state, block_size)
    return blocked_fwd(q, k, v, s, initial_state, block_size)


def _bwd_kernel(do, dS, q, k, v, s, initial_state, block_size):
    if q.device.type == "cuda":
        return _bwd_cuda(do, dS, q, k, v, s, initial_state, block_size)
    return grads_in_layout(q, k, v, blocked_bwd(do, dS, q, k, v, s, initial_state, block_size))


class _LightningAttnEager(torch.autograd.Function):
    """``tnllm::lightning_attn_fwd`` with its registered autograd, as one autograd.Function (see above)."""

    @staticmethod
    def forward(ctx, q, k, v, s, initial_state, block_size):
        ctx.set_materialize_grads(False)       # as the op's autograd: an unused output's gradient arrives as None
        o, S = _fwd_kernel(q, k, v, s, initial_state, block_size)
        _setup_context(ctx, (q, k, v, s, initial_state, block_size), (o, S))
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        # create_graph: through the backward op, whose missing derivative names it; else straight to the kernels
        return _backward(ctx, do, dS, None if torch.is_grad_enabled() else _bwd_kernel)
