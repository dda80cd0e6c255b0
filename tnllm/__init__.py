"""tnllm: TransNormerLLM and Lightning Attention, compiler-first, in pure PyTorch.

>>> from tnllm import TransNormerConfig, TransNormerLLM, generate
>>> model = TransNormerLLM(TransNormerConfig.from_preset("tiny"))
"""
from .config import PRESETS, TransNormerConfig, list_presets
from .model import RecurrentState, TransNormerLLM, decay_rates

__version__ = "0.1.0"

__all__ = ["TransNormerConfig", "TransNormerLLM", "RecurrentState", "PRESETS", "list_presets", "decay_rates",
           "generate"]


def __getattr__(name):
    # generate lives in its own module (sampling code); imported on first use
    if name == "generate":
        from .generate import generate
        return generate
    raise AttributeError(f"module 'tnllm' has no attribute {name!r}")
