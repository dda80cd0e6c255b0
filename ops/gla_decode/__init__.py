"""The fused decode step of the token mixer after ``qkvu_proj`` (one token per row).

Forms side by side: ``naive`` (the reference, plain PyTorch, the model's step maths), ``triton``
(one fused kernel launch) and ``op`` (the ``tnllm::gla_decode_step`` custom ops: the reference on
CPU, Triton on CUDA; ``gla_decode_step`` is the public entry point).
"""
from .naive import gla_decode_naive
from .op import gla_decode_step

__all__ = ["gla_decode_step", "gla_decode_naive"]
