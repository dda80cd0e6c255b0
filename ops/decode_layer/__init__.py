"""One whole decoder layer's decode step (one token per row) in one kernel launch.

Forms side by side: ``naive`` (the reference, plain PyTorch: the fused decode step's layer maths), ``triton``
(one persistent launch per layer, grid barriers between its five stages; or five staged launches) and ``op``
(the ``tnllm::decode_layer_step`` custom op, in place on the residual and the state: the reference on CPU,
Triton on CUDA up to 4 rows; ``decode_layer_step`` is the public entry point).
"""
from .naive import decode_layer_naive
from .op import decode_layer_step

__all__ = ["decode_layer_step", "decode_layer_naive"]
