"""The recurrent step as a module with flat tensor inputs: what ONNX and torch.export trace.

Contract (the names are what ``export_onnx`` writes and ``OnnxRecurrentDecoder`` reads):

==============  ==========================  ================================================
name            shape / dtype               meaning
==============  ==========================  ================================================
``ids``         [B] int64                   the token of each row
``position``    [B] int64                   that token's position (= tokens consumed before it);
                                            LRPE needs it and the state does not carry it
``state_i``     [B, H, Dk_i, Dv] fp32       layer i's state, i = 0..L-1 (Dk = 2e on LRPE layers)
``logits``      [B, V] fp32                 next-token logits
``new_state_i`` [B, H, Dk_i, Dv] fp32       layer i's state after the token
==============  ==========================  ================================================

The position is per row so that rows of one batch may sit at different positions; the caller adds
one per step (``OnnxRecurrentDecoder`` does it in its state object). The math is the model's own
public path (``model.step`` / ``model.prefill`` on a ``RecurrentState`` holding these tensors), not a copy.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from tnllm.model import RecurrentState

STEP_INPUTS = ("ids", "position")     # followed by state_0 .. state_{L-1}
STEP_OUTPUTS = ("logits",)            # followed by new_state_0 .. new_state_{L-1}


def state_names(num_layers: int, prefix: str = "state") -> list[str]:
    return [f"{prefix}_{i}" for i in range(num_layers)]


def state_shapes(model) -> list[tuple[int, int, int]]:
    """Per-layer state shapes without the batch dim: (H, Dk, Dv)."""
    return model.state_shapes()


def _exporting() -> bool:
    is_exp = getattr(torch.compiler, "is_exporting", None)
    return torch.compiler.is_compiling() or (is_exp is not None and is_exp())


def check_step_inputs(model, ids: Tensor, position: Tensor, states: Sequence[Tensor]) -> None:
    """Eager checks of the step contract; TypeError/ValueError naming the argument.

    The id range is data-dependent, so it runs only in eager mode (never while tracing)."""
    if not isinstance(ids, Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
        got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
        raise TypeError(f"`ids` must be an int64 tensor [B], got {got}")
    B = ids.shape[0]
    if (not isinstance(position, Tensor) or position.dtype != torch.int64
            or tuple(position.shape) != (B,)):
        got = f"{position.dtype} {tuple(position.shape)}" if isinstance(position, Tensor) else type(position).__name__
        raise TypeError(f"`position` must be an int64 tensor [B] = [{B}], got {got}")
    shapes = state_shapes(model)
    if not isinstance(states, (list, tuple)) or len(states) != len(shapes):
        n = len(states) if hasattr(states, "__len__") else "?"
        raise ValueError(f"`states` must hold {len(shapes)} per-layer tensors [B, H, Dk, Dv], got {n}")
    for i, (S, hkv) in enumerate(zip(states, shapes)):
        if not isinstance(S, Tensor):
            raise TypeError(f"`state_{i}` must be a tensor, got {type(S).__name__}")
        if S.dtype != torch.float32:
            raise TypeError(f"`state_{i}` must be fp32, got {S.dtype}")
        if tuple(S.shape) != (B, *hkv):
            raise ValueError(f"`state_{i}` must have shape [B, H, Dk, Dv] = {(B, *hkv)}, got {tuple(S.shape)}")
    if B and not _exporting():
        lo, hi = int(ids.min()), int(ids.max())
        V = model.config.vocab_size
        if lo < 0 or hi >= V:
            raise ValueError(f"`ids` has token ids outside [0, vocab_size={V}): min {lo}, max {hi}")
        if int(position.min()) < 0:
            raise ValueError(f"`position` must be >= 0, got min {int(position.min())}")


class RecurrentStep(nn.Module):
    """``forward(ids [B], position [B], states) -> (logits [B, V], new_states)`` over ``model``'s weights.

    ``states`` is a tuple of L fp32 tensors. Holds a reference to the model (no weight copy)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor, position: Tensor, states: tuple[Tensor, ...]):
        m = self.model
        if not _exporting():
            check_step_inputs(m, ids, position, states)
        logits, new = m.step(ids, RecurrentState(list(states), position))
        return logits.float(), tuple(S.float() for S in new)


def prefill_decomposition(q, k, v, s, initial_state, block_size):
    """Decomposition of ``tnllm::lightning_attn_fwd`` into plain aten (the quadratic form), for the
    exported prefill graph: ONNX has no kernel for the custom op, and the naive form has a dynamic T."""
    from tnllm.ops import lightning_attn_naive
    return lightning_attn_naive(q, k, v, s, initial_state, output_final_state=True)


class RecurrentPrefill(nn.Module):
    """``forward(ids [B, T], position [B], states) -> (logits [B, T, V], new_states)``: the model's
    parallel path continued from a state (``model.prefill``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor, position: Tensor, states: tuple[Tensor, ...]):
        m = self.model
        logits, new = m.prefill(ids, RecurrentState(list(states), position))
        return logits.float(), tuple(S.float() for S in new)


def example_inputs(model, batch: int = 2, length: int | None = None, device=None):
    """Zero states and valid ids for tracing (batch >= 2 so the batch dim is not specialized)."""
    device = device if device is not None else model.lm_head.weight.device
    shape = (batch,) if length is None else (batch, length)
    ids = torch.randint(1, model.config.vocab_size, shape, dtype=torch.int64, device=device)
    position = torch.zeros(batch, dtype=torch.int64, device=device)
    states = tuple(torch.zeros(batch, *hkv, device=device) for hkv in state_shapes(model))
    return ids, position, states
