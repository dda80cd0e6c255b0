"""Weight-only int8 for decoding, through torchao (an optional dependency: ``pip install 'tnllm[int8]'``).

``quantize_int8(model)`` replaces, in place, the weights of every ``nn.Linear`` inside the decoder layers
(qkvu_proj, out_proj, l1, l2, l3) with torchao's ``Int8WeightOnlyConfig`` tensors: int8 values and one
scale per output row, the activations staying in the model dtype. The embedding and the head (tied to the
embedding in the released models) keep their dtype. Decoding halves the bytes the layers' GEMVs read; the
fused decode path stacks l1 and l2 exactly (``fused_step.stack_rows``).
"""
from __future__ import annotations

import torch

INSTALL = "pip install 'tnllm[int8]'  (or: pip install torchao)"


def torchao_available() -> bool:
    try:
        import torchao  # noqa: F401
    except ImportError:
        return False
    return True


def require_torchao(option: str = "quantize_int8") -> None:
    """ValueError naming ``option`` and the install command when torchao is not installed."""
    if not torchao_available():
        raise ValueError(f"{option} needs torchao (weight-only int8), which is not installed: {INSTALL}")


def is_quantized(weight) -> bool:
    return type(weight) not in (torch.Tensor, torch.nn.Parameter)


@torch.no_grad()
def quantize_int8(model, option: str = "quantize_int8"):
    """In place: the decoder layers' Linear weights to torchao int8 weight-only (per-row scales). Returns
    ``model``. ValueError naming ``option`` when torchao is missing."""
    require_torchao(option)
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    layers = model.model.layers
    quantize_(layers, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear))
    return model


def weight_bytes_read(model) -> int:
    """Bytes of weights one decode step reads: every parameter once (a quantized weight by its int8 values
    and scales), except an untied embedding table, of which a step reads only B rows."""
    seen, n = set(), 0
    emb = model.model.embed_tokens.weight
    tied = model.lm_head.weight is emb
    for p in model.parameters():
        if id(p) in seen or (p is emb and not tied):
            continue
        seen.add(id(p))
        if is_quantized(p):
            n += sum(getattr(p, k).numel() * getattr(p, k).element_size() for k in p.__tensor_flatten__()[0]
                     if getattr(p, k) is not None)
        else:
            n += p.numel() * p.element_size()
    return n
