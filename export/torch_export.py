"""torch.export of the recurrent step: an ``ExportedProgram`` with a dynamic batch, saved as ``.pt2``.

The step holds no custom op (plain aten, ``export.step``), so a saved program loads in a process
that never imported tnllm (a prefill graph holds the custom op and needs `import tnllm` first).
Calling convention of the program's module: ``(ids [B] int64, position [B] int64, states tuple)``
-> ``(logits [B, V], new_states tuple)``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.export import ExportedProgram

from .step import RecurrentStep, example_inputs


def export_program(model, *, max_batch: int = 4096, strict: bool = False, device=None) -> ExportedProgram:
    """``torch.export.export`` of ``RecurrentStep(model)`` with batch dim 1..max_batch.

    The program keeps ``model``'s dtype and device (``device`` overrides where the example inputs live)."""
    from tnllm.model import TransNormerLLM
    if not isinstance(model, TransNormerLLM):
        raise TypeError(f"`model` must be a TransNormerLLM, got {type(model).__name__}")
    if not isinstance(max_batch, int) or max_batch < 2:
        raise ValueError(f"`max_batch` must be an int >= 2, got {max_batch!r}")
    L = model.config.decoder_layers
    ids, position, states = example_inputs(model, 2, device=device)
    b = torch.export.Dim("batch", min=1, max=max_batch)
    dyn = {"ids": {0: b}, "position": {0: b}, "states": tuple({0: b} for _ in range(L))}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.export.export(RecurrentStep(model), (ids, position, states), dynamic_shapes=dyn,
                                       strict=strict)
    finally:
        model.train(was_training)


def save_program(ep: ExportedProgram, path) -> Path:
    """Write ``ep`` to ``path`` (conventionally ``*.pt2``)."""
    if not isinstance(ep, ExportedProgram):
        raise TypeError(f"`ep` must be a torch.export.ExportedProgram, got {type(ep).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, str(path))
    return path


def load_program(path) -> ExportedProgram:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_program: no .pt2 file at {path}")
    return torch.export.load(str(path))


def run_program(ep: ExportedProgram, ids, position, states):
    """Run an exported step: (logits [B, V], tuple of new states). ``position`` may be an int
    (broadcast to every row) or an int64 tensor [B]."""
    if not isinstance(position, torch.Tensor):
        position = torch.full((ids.shape[0],), int(position), dtype=torch.int64, device=ids.device)
    with torch.no_grad():
        return ep.module()(ids, position, tuple(states))
