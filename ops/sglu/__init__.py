"""The SGLU gate of the decode step: act(a) * b from the fused [a | b] = x [W1; W2]^T projection.

Forms side by side: ``naive`` (the reference, plain PyTorch, the model's GLU maths), ``triton`` (one
kernel launch) and ``op`` (the ``tnllm::sglu_gate`` custom op: the reference on CPU, Triton on CUDA;
``sglu_gate`` is the public entry point).
"""
from .naive import sglu_gate_naive
from .op import sglu_gate

__all__ = ["sglu_gate", "sglu_gate_naive"]
