"""tnllm.export: the recurrent decoder outside eager PyTorch.

* ``export_onnx(model, "step.onnx")``: the one-token step as ONNX (dynamic batch), run by
  ``OnnxRecurrentDecoder`` (``tnllm.export.runtime``) in onnxruntime (imported lazily); ``export_onnx_prefill`` adds a
  parallel prefill graph with dynamic length.
* ``export_checkpoint_onnx(ckpt, out, opset, quantize)``: the CLI's entry (``tnllm export onnx``).
* ``export_program`` / ``save_program`` / ``load_program``: torch.export ``.pt2`` of the same step.

Graph inputs and outputs are documented in ``tnllm.export.step``.
"""
from .onnx import export_checkpoint_onnx, export_onnx, export_onnx_prefill, quantize_int8
from .runtime import OnnxDecoder, OnnxRecurrentDecoder, OnnxState, compare_decoders
from .step import RecurrentPrefill, RecurrentStep, check_step_inputs
from .torch_export import export_program, load_program, run_program, save_program

__all__ = ["export_onnx", "export_onnx_prefill", "OnnxRecurrentDecoder", "OnnxState", "OnnxDecoder", "export_checkpoint_onnx",
           "quantize_int8", "compare_decoders", "RecurrentStep", "RecurrentPrefill", "check_step_inputs",
           "export_program", "save_program", "load_program", "run_program"]
