"""Whole decoder layers' decode step (one token per row) in one kernel launch.

Forms side by side: ``naive`` (the reference, plain PyTorch: the fused decode step's layer maths), ``triton``
(one persistent launch for one layer or a stack of like layers, grid barriers between the stages and the
layers; or five staged launches per layer) and ``op`` (the custom ops ``tnllm::decode_layer_step`` and
``tnllm::decode_stack_step``, in place on the residual and the state: the reference on CPU, Triton on CUDA up to
4 rows; ``decode_layer_step`` and ``decode_stack_step`` are the public entry points).
"""
from .naive import decode_layer_naive, decode_stack_naive
from .op import decode_layer_step, decode_stack_step

__all__ = ["decode_layer_step", "decode_stack_step", "decode_layer_naive", "decode_stack_naive"]
