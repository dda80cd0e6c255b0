"""``tnllm::residual_gemv``: the registration (reference form on CPU and for fp64; on CUDA the Triton
kernel up to ``MAX_ROWS`` rows and cuBLAS above, where its GEMM kernels read the weight at speed; a fake
kernel with the real output's contiguous layout, so it runs inside torch.compile(fullgraph=True) and CUDA
graphs). No gradient: this is the decode step."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..sglu.op import sglu_gate
from .naive import check_inputs, residual_gemv_naive

# Rows up to which CUDA runs the Triton kernel; above, cuBLAS (bench/gemv.py: the kernel re-reads the
# weight per row, cuBLAS at batch 64 runs these shapes at full speed)
MAX_ROWS = 4


def _reference(x, y, w, gate):
    return residual_gemv_naive(x, y, w, gate).contiguous()


@torch.library.custom_op("tnllm::residual_gemv", mutates_args=())
def _residual_gemv(x: Tensor, y: Tensor, w: Tensor, gate: Optional[str]) -> Tensor:
    return _reference(x, y, w, gate)


@_residual_gemv.register_fake
def _(x, y, w, gate):
    return x.new_empty(x.shape)


def _cublas(x, y, w, gate):
    g = sglu_gate(y, x, gate) if gate is not None else y
    return torch.addmm(x, g, w.t())


def _cuda(x, y, w, gate):
    """The CUDA kernel of ``tnllm::residual_gemv``."""
    check_inputs(x, y, w, gate)
    from . import triton as tri
    if not tri.supported(x):
        return _reference(x, y, w, gate)
    if x.shape[0] > MAX_ROWS:
        return _cublas(x, y, w, gate)
    return tri.residual_gemv_triton(x, y, w, gate)


_residual_gemv.register_kernel("cuda")(_cuda)


def use_triton_on_cpu(enable: bool = True) -> None:
    """Register the CUDA dispatch (Triton kernel, cuBLAS above ``MAX_ROWS``) as the op's CPU kernel
    (``enable``), or the reference form again (tests under ``TRITON_INTERPRET=1``)."""
    torch.library.register_kernel("tnllm::residual_gemv", "cpu", _cuda if enable else _reference)


def residual_gemv(x: Tensor, y: Tensor, w: Tensor, gate: str | None = None) -> Tensor:
    """x + y W^T for the decode step's residual projections; a new [B, N] tensor in x's dtype.

    Args:
        x: [B, N] the residual; fp16, bf16, fp32 (Triton) or fp64 (the reference form).
        y: [B, K] the projection's input, or with ``gate`` [B, 2K], the l1 | l2 projections of x side by side.
        w: [N, K] the weight (``nn.Linear.weight``), x's dtype.
        gate: None, or the GLU activation ("none", "silu"/"swish", "relu"): the input is then
            ``sglu_gate(y, norm_input=x, act=gate)``, computed inside the kernel (the channel mixer's l3).
    """
    check_inputs(x, y, w, gate)
    return torch.ops.tnllm.residual_gemv(x, y, w, gate)
