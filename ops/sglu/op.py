"""``tnllm::sglu_gate``: the registration (reference form on CPU and for fp64, Triton on CUDA; a fake
kernel with the real output's contiguous layout, so it runs inside torch.compile(fullgraph=True) and CUDA
graphs). No gradient: this is the decode step (training runs the model's GLU)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .naive import check_inputs, sglu_gate_naive


def _reference(l12, norm_input, act):
    return sglu_gate_naive(l12, norm_input, act).contiguous()


@torch.library.custom_op("tnllm::sglu_gate", mutates_args=())
def _sglu_gate(l12: Tensor, norm_input: Optional[Tensor], act: str) -> Tensor:
    return _reference(l12, norm_input, act)


@_sglu_gate.register_fake
def _(l12, norm_input, act):
    return l12.new_empty(l12.shape[0], l12.shape[1] // 2)


def _cuda(l12, norm_input, act):
    """The CUDA kernel of ``tnllm::sglu_gate`` (the Triton launcher; the reference form for fp64)."""
    check_inputs(l12, norm_input, act)
    from . import triton as tri
    if not tri.supported(l12):
        return _reference(l12, norm_input, act)
    return tri.sglu_gate_triton(l12, norm_input, act)


_sglu_gate.register_kernel("cuda")(_cuda)


def use_triton_on_cpu(enable: bool = True) -> None:
    """Register the Triton launcher as the op's CPU kernel (``enable``), or the reference form again
    (tests under ``TRITON_INTERPRET=1``, where Triton runs kernels on CPU tensors)."""
    torch.library.register_kernel("tnllm::sglu_gate", "cpu", _cuda if enable else _reference)


def sglu_gate(l12: Tensor, norm_input: Tensor | None = None, act: str = "none") -> Tensor:
    """The SGLU gate act(a) * b of [a | b] = l12 [B, 2g] -> [B, g]: one kernel on CUDA.

    Args:
        l12: [B, 2g] the l1 and l2 projections side by side (one GEMM with the weights stacked);
            fp16, bf16, fp32 (Triton) or fp64 (the reference form).
        norm_input: None, or x [B, d] when l12 = x [W1; W2]^T was projected from x itself rather than from
            srms_norm(x): x's SRMSNorm scale is applied first (the channel norm folded in; roundings differ
            from the unfused model at the dtype's epsilon).
        act: the GLU activation of a: "none" (every release), "silu" ("swish") or "relu".
    """
    check_inputs(l12, norm_input, act)
    return torch.ops.tnllm.sglu_gate(l12, norm_input, act)
