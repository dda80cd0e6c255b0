"""tnllm.compile: compile policies that never change the math.

* ``compile_model(model, mode)``: per-block ``fullgraph`` torch.compile.
* ``CudaGraphDecoder(model, batch_size)``: static state buffers, the step captured in a CUDA graph
  (optionally compiled first); eager on CPU. Drives ``tnllm.generate`` through its start/step protocol.
"""
from .decode import CudaGraphDecoder
from .policy import MODES, compile_model, is_compiled

__all__ = ["compile_model", "is_compiled", "MODES", "CudaGraphDecoder"]
