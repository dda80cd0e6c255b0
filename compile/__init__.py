"""tnllm.compile: compile policies that never change the math.

* ``compile_model(model, mode)``: per-block ``fullgraph`` torch.compile.
* ``CudaGraphDecoder(model, batch_size)``: static state buffers, the step captured in a CUDA graph
  (optionally compiled first); eager on CPU. Drives ``tnllm.generate`` through its start/step protocol.
  ``decode_path`` picks the step: the aten step, the fused token-mixer kernel, or ``FusedDecodeStep``.
* ``quantize_int8(model)``: the decoder layers' Linear weights to torchao int8 weight-only (optional
  dependency, ``pip install 'tnllm[int8]'``).
"""
from .decode import DECODE_PATHS, CudaGraphDecoder, resolve_decode_path
from .fused_step import FusedDecodeStep, fused_unsupported
from .quant import quantize_int8, torchao_available
from .policy import MODES, compile_model, is_compiled

__all__ = ["compile_model", "is_compiled", "MODES", "CudaGraphDecoder", "DECODE_PATHS", "resolve_decode_path",
           "FusedDecodeStep", "fused_unsupported", "quantize_int8", "torchao_available"]
