"""``tnllm::gla_decode_step`` (in place) and ``tnllm::gla_decode_step_functional``: the registration.

* CPU (and any non-CUDA device, and dtypes the kernel does not take: fp64): the reference form
  (``naive.py``).
* CUDA: the fused Triton kernel (``triton.py``), one launch per call, imported lazily.
* ``tnllm::gla_decode_step`` updates ``state`` in place (declared in ``mutates_args``) and returns y:
  a decode loop that owns its state buffers (``CudaGraphDecoder``) moves the state once per step.
  ``tnllm::gla_decode_step_functional`` leaves ``state`` alone and returns (y, S_new), S_new a new
  contiguous tensor (the kernel reads one buffer and writes the other: the same bytes moved).
* ``norm_input`` (optional, both ops): the layer input x whose SRMSNorm scale is folded into qkvu
  (``naive.py``), so the decoder needs no separate norm kernel before ``qkvu_proj``.
* Fake kernels return contiguous outputs exactly like the real ones. No host sync and no
  data-dependent allocation, so both run inside ``torch.compile(fullgraph=True)`` and CUDA graphs.

No gradient: this is the inference step (training uses the parallel Lightning Attention op).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .naive import check_inputs, gla_decode_naive


def _triton_ok(qkvu: Tensor, state: Tensor) -> bool:
    from . import triton as tri
    return tri.supported(qkvu, state)


@torch.library.custom_op("tnllm::gla_decode_step", mutates_args=("state",))
def _gla_decode_step_inplace(qkvu: Tensor, state: Tensor, s: Tensor, theta: Optional[Tensor],
                             pos: Optional[Tensor], act: str, norm_input: Optional[Tensor] = None) -> Tensor:
    return _reference_inplace(qkvu, state, s, theta, pos, act, norm_input)


@_gla_decode_step_inplace.register_fake
def _(qkvu, state, s, theta, pos, act, norm_input=None):
    return qkvu.new_empty(qkvu.shape[0], qkvu.shape[1] // 4)


def _cuda_inplace(qkvu, state, s, theta, pos, act, norm_input=None):
    """The CUDA kernel of ``tnllm::gla_decode_step`` (the Triton launcher; the reference form for fp64)."""
    check_inputs(qkvu, state, s, theta, pos, act, norm_input)
    if not _triton_ok(qkvu, state) or not state.is_contiguous():
        return _reference_inplace(qkvu, state, s, theta, pos, act, norm_input)
    from . import triton as tri
    return tri.gla_decode_triton(qkvu, state, s, theta, pos, act, norm_input=norm_input)


_gla_decode_step_inplace.register_kernel("cuda")(_cuda_inplace)


@torch.library.custom_op("tnllm::gla_decode_step_functional", mutates_args=())
def _gla_decode_step_functional(qkvu: Tensor, state: Tensor, s: Tensor, theta: Optional[Tensor],
                                pos: Optional[Tensor], act: str,
                                norm_input: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    return _reference_functional(qkvu, state, s, theta, pos, act, norm_input)


@_gla_decode_step_functional.register_fake
def _(qkvu, state, s, theta, pos, act, norm_input=None):
    return qkvu.new_empty(qkvu.shape[0], qkvu.shape[1] // 4), state.new_empty(state.shape)


def _cuda_functional(qkvu, state, s, theta, pos, act, norm_input=None):
    """The CUDA kernel of ``tnllm::gla_decode_step_functional``."""
    check_inputs(qkvu, state, s, theta, pos, act, norm_input)
    if not _triton_ok(qkvu, state):
        return _reference_functional(qkvu, state, s, theta, pos, act, norm_input)
    from . import triton as tri
    S = torch.empty(state.shape, device=state.device, dtype=state.dtype)
    return tri.gla_decode_triton(qkvu, state, s, theta, pos, act, state_out=S, norm_input=norm_input), S


_gla_decode_step_functional.register_kernel("cuda")(_cuda_functional)


def gla_decode_step(qkvu: Tensor, state: Tensor, s: Tensor, theta: Tensor | None = None,
                    pos: Tensor | None = None, act: str = "silu", inplace: bool = False,
                    norm_input: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One decode step of the token mixer after ``qkvu_proj``: activation, LRPE, S <- lam S + k^T v,
    o = q S, SRMSNorm over the width, times the gate u. One fused Triton kernel on CUDA.

    Args:
        qkvu: [B, 4*h] ``qkvu_proj`` output for one token per row (h = H * e; q | k | v | u, head-major);
            fp16, bf16, fp32 (the Triton kernel) or fp64 (the reference form).
        state: [B, H, Dk, e] fp32 (fp64 with fp64 inputs); Dk = 2e with LRPE, else e.
        s: [H] decay rates (lam = exp(-s); not checked for s >= 0, which would read the data).
        theta: [H, 1, e] LRPE frequencies, or None (no LRPE).
        pos: [B] integer position of each row's token, needed with LRPE.
        act: activation of q and k: "silu" ("swish"), "relu" or "none".
        inplace: update ``state`` in place and return it (what a decode loop that owns its state
            buffers wants: the state is read and written once), or leave it alone and return a new
            tensor (the same bytes moved: the kernel reads one buffer and writes the other).
        norm_input: None, or the layer input x [B, d] when qkvu = x W^T was projected from x itself rather
            than from srms_norm(x): x's SRMSNorm scale is applied to qkvu inside the kernel (one norm
            kernel less per layer; the roundings differ from the unfused model at the dtype's epsilon).

    Returns (y [B, h] in qkvu's dtype, the new state).
    """
    check_inputs(qkvu, state, s, theta, pos, act, norm_input)
    if isinstance(pos, Tensor) and theta is None:
        pos = None                                   # positions only matter with LRPE
    s = s.detach()
    if inplace:
        return torch.ops.tnllm.gla_decode_step(qkvu, state, s, theta, pos, act, norm_input), state
    return torch.ops.tnllm.gla_decode_step_functional(qkvu, state, s, theta, pos, act, norm_input)


def use_triton_on_cpu(enable: bool = True) -> None:
    """Register the Triton launchers as the CPU kernels of both ops (``enable``), or the reference form
    again. For tests under ``TRITON_INTERPRET=1``, where Triton runs its kernels on CPU tensors: the model
    and the decoders then run the real kernel through the registered ops on a machine without a GPU."""
    inplace = _cuda_inplace if enable else _reference_inplace
    functional = _cuda_functional if enable else _reference_functional
    torch.library.register_kernel("tnllm::gla_decode_step", "cpu", inplace)
    torch.library.register_kernel("tnllm::gla_decode_step_functional", "cpu", functional)


def _reference_inplace(qkvu, state, s, theta, pos, act, norm_input=None):
    y, S = gla_decode_naive(qkvu, state, s, theta, pos, act, norm_input=norm_input)
    state.copy_(S)
    return y.contiguous()


def _reference_functional(qkvu, state, s, theta, pos, act, norm_input=None):
    y, S = gla_decode_naive(qkvu, state, s, theta, pos, act, norm_input=norm_input)
    return y.contiguous(), S.contiguous()
