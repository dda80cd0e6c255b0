"""The decode step's residual projection at small batch: out = x + y W^T, optionally with the SGLU gate
computed from y = [l1 | l2] inside the same kernel (the l3 projection of the channel mixer).

cuBLAS runs the [1, K] x [K, N] GEMM of a batch-1 decode step's out_proj (1024 x 1024 at 385M) at
0.29 TB/s on the H200 (7.3 us; bench/decode_profile.py). The Triton kernel here reads each weight row once,
contiguous along K, with the residual (and the gate) in its prologue and epilogue.

Forms side by side: ``naive`` (the reference, plain PyTorch, fp64 accumulation), ``triton`` (one launch)
and ``op`` (the ``tnllm::residual_gemv`` custom op: the reference on CPU, the Triton kernel on CUDA up to
``MAX_ROWS`` rows and cuBLAS above; ``residual_gemv`` is the public entry point).
"""
from .naive import residual_gemv_naive
from .op import residual_gemv

__all__ = ["residual_gemv", "residual_gemv_naive"]
