"""Compile policies: per-block ``fullgraph`` compile, never changing the math.

Blocks are compiled one by one (``nn.Module.compile`` keeps the module type and the state_dict keys);
identical blocks share the compiled code, so the cost is that of one or
two blocks (the LRPE layer differs), not of the whole stack.
"""
from __future__ import annotations

import torch.nn as nn

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    return mode


def _layers(model) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise TypeError(f"compile_model expects a tnllm model with `.model.layers` (TransNormerLLM, TransformerLM), "
                        f"got {type(model).__name__}")
    return layers


def compile_model(model, mode: str = "default", *, dynamic: bool | None = None, fullgraph: bool = True,
                  backend: str = "inductor"):
    """``layer.compile(fullgraph=True, mode=mode)`` for every decoder layer; returns ``model``. The one
    per-block compile: ``tnllm.train.parallelize.apply_compile`` (training, after TP and AC) calls it too.

    ``dynamic=None`` lets dynamo mark a dim dynamic after the first recompile (sequence length in
    training; batch in decode). The head and the embedding stay eager (one matmul, one gather)."""
    check_mode(mode)
    if dynamic not in (None, True, False):
        raise ValueError(f"`dynamic` must be None, True or False, got {dynamic!r}")
    for layer in _layers(model):
        layer.compile(fullgraph=fullgraph, mode=mode, dynamic=dynamic, backend=backend)
    return model


def is_compiled(model) -> bool:
    """True when every decoder layer has a compiled forward (``compile_model`` ran)."""
    return all(getattr(layer, "_compiled_call_impl", None) is not None for layer in _layers(model))
