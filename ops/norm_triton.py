"""Fused SRMSNorm + u gate (the token mixer's tail): y = srms_norm(o_BTd) * u.

``o`` comes straight from the attention op in [B, H, T, e] layout; the norm spans the whole width
d = H * e, so the fused kernel reads o through its strides and never materialises the
[B, T, d] transpose copy that the plain PyTorch path makes. One program per (b, t) row.

* ``srms_norm_gate(o, u)``: on CUDA the custom op ``tnllm::srms_norm_gate`` (Triton forward and
  backward); elsewhere exactly ``srms_norm(o.transpose(1, 2).reshape(B, T, -1)) * u`` (bit-identical
  to the unfused model code).
* Rounding follows the unfused code: n = (o * r) in fp32 rounded to o's dtype, then n * u rounded.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from ._launch import launch, next_pow2
from .norm import EPS, srms_norm


def _reference(o: Tensor, u: Tensor, eps: float = EPS) -> Tensor:
    B, H, T, e = o.shape
    return srms_norm(o.transpose(1, 2).reshape(B, T, H * e), eps) * u


def _check(o: Tensor, u: Tensor) -> None:
    if not isinstance(o, Tensor) or not isinstance(u, Tensor):
        raise TypeError("srms_norm_gate: `o` and `u` must be tensors")
    if o.dim() != 4:
        raise ValueError(f"srms_norm_gate: `o` must have shape [B, H, T, e], got {tuple(o.shape)}")
    B, H, T, e = o.shape
    if tuple(u.shape) != (B, T, H * e):
        raise ValueError(f"srms_norm_gate: `u` must have shape [B, T, H*e] = {(B, T, H * e)}, got {tuple(u.shape)}")


def srms_norm_gate(o: Tensor, u: Tensor) -> Tensor:
    """y [B, T, H*e] = srms_norm(o transposed to [B, T, H*e]) * u, with o [B, H, T, e] and u [B, T, H*e].

    Fused Triton kernel on CUDA (fp16/bf16/fp32, one dtype); the plain PyTorch expression elsewhere
    (which also promotes mixed dtypes)."""
    _check(o, u)
    if o.device.type == "cuda" and o.dtype == u.dtype and o.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return torch.ops.tnllm.srms_norm_gate(o, u)
    return _reference(o, u)


# ---------------------------------------------------------------------------------------------
# Triton kernels (imported lazily: CPU-only installs never import triton through this module)

def _kernels():
    import triton
    import triton.language as tl
    from ._triton_interp import patch as _patch_interpreter
    _patch_interpreter()

    @triton.jit
    def fwd_kernel(X, U, Y, T, sx_b, sx_h, sx_t, su_b, su_t, sy_b, sy_t, eps,
                   H: tl.constexpr, E: tl.constexpr, BH: tl.constexpr, BE: tl.constexpr):
        row = tl.program_id(0)
        b = (row // T).to(tl.int64)
        t = (row % T).to(tl.int64)
        hh = tl.arange(0, BH)
        ee = tl.arange(0, BE)
        m = (hh[:, None] < H) & (ee[None, :] < E)
        x = tl.load(X + b * sx_b + t * sx_t + hh[:, None] * sx_h + ee[None, :], mask=m, other=0.0).to(tl.float32)
        cols = hh[:, None] * E + ee[None, :]
        u = tl.load(U + b * su_b + t * su_t + cols, mask=m, other=0.0)
        r = tl.rsqrt(tl.sum(tl.sum(x * x, 1), 0) / (H * E) + eps)
        n = (x * r).to(u.dtype)
        y = (n.to(tl.float32) * u.to(tl.float32)).to(u.dtype)
        tl.store(Y + b * sy_b + t * sy_t + cols, y, mask=m)

    @triton.jit
    def bwd_kernel(DY, X, U, DX, DU, T, sx_b, sx_h, sx_t, su_b, su_t, sdy_b, sdy_t, eps,
                   H: tl.constexpr, E: tl.constexpr, BH: tl.constexpr, BE: tl.constexpr):
        row = tl.program_id(0)
        b = (row // T).to(tl.int64)
        t = (row % T).to(tl.int64)
        hh = tl.arange(0, BH)
        ee = tl.arange(0, BE)
        m = (hh[:, None] < H) & (ee[None, :] < E)
        x = tl.load(X + b * sx_b + t * sx_t + hh[:, None] * sx_h + ee[None, :], mask=m, other=0.0).to(tl.float32)
        cols = hh[:, None] * E + ee[None, :]
        u = tl.load(U + b * su_b + t * su_t + cols, mask=m, other=0.0)
        dy = tl.load(DY + b * sdy_b + t * sdy_t + cols, mask=m, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(tl.sum(x * x, 1), 0) / (H * E) + eps)
        n = (x * r).to(u.dtype).to(tl.float32)
        du = dy * n
        dn = dy * u.to(tl.float32)
        c = tl.sum(tl.sum(dn * x, 1), 0) * (r * r * r) / (H * E)
        dx = dn * r - x * c
        # dx in o's [B, H, T, E] layout, contiguous; du in u's [B, T, d] layout, contiguous
        tl.store(DX + ((b * H + hh[:, None]) * T + t) * E + ee[None, :], dx.to(u.dtype), mask=m)
        tl.store(DU + (b * T + t) * (H * E) + cols, du.to(u.dtype), mask=m)

    return triton, fwd_kernel, bwd_kernel


_get_kernels = functools.cache(_kernels)     # built (and triton imported) at the first launch


def _warps(n: int) -> int:
    return 4 if n <= 2048 else 8


def srms_norm_gate_fwd_triton(o: Tensor, u: Tensor, eps: float = EPS) -> Tensor:
    """Launcher (any device Triton runs on, the interpreter included). Returns y [B, T, d] contiguous."""
    triton, fwd_kernel, _ = _get_kernels()
    B, H, T, E = o.shape
    if o.stride(-1) != 1:
        o = o.contiguous()
    if u.stride(-1) != 1:
        u = u.contiguous()
    y = torch.empty(B, T, H * E, device=u.device, dtype=u.dtype)
    if B * T == 0:
        return y
    BH, BE = next_pow2(H), next_pow2(E)
    launch(fwd_kernel, B * T, (o, u, y, T, *o.stride()[:3], *u.stride()[:2], *y.stride()[:2], eps),
           dict(H=H, E=E, BH=BH, BE=BE, num_warps=_warps(H * E)))
    return y


def srms_norm_gate_bwd_triton(dy: Tensor, o: Tensor, u: Tensor, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """Launcher of the backward: (do [B, H, T, e], du [B, T, d]), both contiguous, in u's dtype."""
    triton, _, bwd_kernel = _get_kernels()
    B, H, T, E = o.shape
    if o.stride(-1) != 1:
        o = o.contiguous()
    if u.stride(-1) != 1:
        u = u.contiguous()
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dx = torch.empty(B, H, T, E, device=u.device, dtype=u.dtype)
    du = torch.empty(B, T, H * E, device=u.device, dtype=u.dtype)
    if B * T == 0:
        return dx, du
    BH, BE = next_pow2(H), next_pow2(E)
    launch(bwd_kernel, B * T, (dy, o, u, dx, du, T, *o.stride()[:3], *u.stride()[:2], *dy.stride()[:2], eps),
           dict(H=H, E=E, BH=BH, BE=BE, num_warps=_warps(H * E)))
    return dx, du


def _reference_bwd(dy: Tensor, o: Tensor, u: Tensor, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """The same backward in PyTorch (fp32 inside): the op's non-CUDA kernel."""
    B, H, T, E = o.shape
    x = o.transpose(1, 2).reshape(B, T, H * E).float()
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    n = (x * r).to(u.dtype).float()
    dyf = dy.float()
    du = dyf * n
    dn = dyf * u.float()
    dx = dn * r - x * (dn * x).mean(-1, keepdim=True) * r.pow(3)
    dx = dx.reshape(B, T, H, E).transpose(1, 2).contiguous()
    return dx.to(u.dtype), du.to(u.dtype).contiguous()


@torch.library.custom_op("tnllm::srms_norm_gate", mutates_args=())
def _srms_norm_gate_op(o: Tensor, u: Tensor) -> Tensor:
    return _reference(o, u).contiguous()


@_srms_norm_gate_op.register_fake
def _(o, u):
    return u.new_empty(u.shape)


@_srms_norm_gate_op.register_kernel("cuda")
def _(o, u):
    return srms_norm_gate_fwd_triton(o, u)


@torch.library.custom_op("tnllm::srms_norm_gate_bwd", mutates_args=())
def _srms_norm_gate_bwd_op(dy: Tensor, o: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    return _reference_bwd(dy, o, u)


@_srms_norm_gate_bwd_op.register_fake
def _(dy, o, u):
    return o.new_empty(o.shape), u.new_empty(u.shape)


@_srms_norm_gate_bwd_op.register_kernel("cuda")
def _(dy, o, u):
    return srms_norm_gate_bwd_triton(dy, o, u)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    o, u = ctx.saved_tensors
    return torch.ops.tnllm.srms_norm_gate_bwd(dy.contiguous(), o, u)


_srms_norm_gate_op.register_autograd(_backward, setup_context=_setup)
