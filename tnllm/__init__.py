"""tnllm: TransNormerLLM and Lightning Attention, compiler-first, in pure PyTorch.

>>> from tnllm import TransNormerConfig, TransNormerLLM, generate
>>> model = TransNormerLLM(TransNormerConfig.from_preset("tiny"))
"""
from .config import PRESETS, TransNormerConfig, list_presets
from .model import RecurrentState, TransNormerLLM, decay_rates
# imported eagerly: the submodule tnllm.generate and the function share a name, and a lazy import would leave
# `tnllm.generate` bound to the module once anything imports tnllm.generate directly
from .generate import generate

__version__ = "0.1.0"

__all__ = ["TransNormerConfig", "TransNormerLLM", "RecurrentState", "PRESETS", "list_presets", "decay_rates",
           "generate"]

