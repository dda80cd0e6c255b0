"""``tnllm::decode_layer_step``: one decoder layer's decode step, in place on the residual ``x`` and the state.

* CPU (and any non-CUDA device, fp64, more than ``MAX_ROWS`` rows, weights that are not plain contiguous
  tensors, layers too wide for the kernel's one-tile stages: ``one_fits``): the reference form (``naive.py``).
* CUDA: the persistent Triton kernel (``triton.py``), one launch per layer, imported lazily.
* The fake kernel returns nothing (both outputs are the mutated inputs), so the op traces under
  ``torch.compile(fullgraph=True)`` and is captured by CUDA graphs; no host sync, no data-dependent shapes.
"""
from __future__ import annotations

import functools
import os
from typing import List, Optional

import torch
from torch import Tensor

from ..norm import EPS
from .naive import check_inputs, check_stack_inputs, decode_layer_naive, decode_stack_naive

MAX_ROWS = 4        # the kernel's limit (triton.MAX_ROWS, repeated here so that triton is imported lazily)
ONE_TILE = 32768     # the default LayerConfig.one_tile
TRITON_ON_CPU = False   # set by use_triton_on_cpu: the op's CPU kernel is then the (staged) Triton launcher


def shared_gpu() -> bool:
    """Whether this process may share its GPU's SMs with other processes through the CUDA MPS (its client
    variables are set): the persistent launch's grid barriers need all of its programs resident at once, which
    an MPS SM limit can prevent (the launch would then wait forever), so the launcher runs the staged launches
    instead and ``decode_path="auto"`` keeps the fused step."""
    return any(os.environ.get(v) for v in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"))


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def one_fits(B: int, d: int, h: int, g: int, nprog: int, one_tile: int = ONE_TILE) -> bool:
    """Whether every GEMV stage of a layer (width d, h = H * e, SGLU width g) gives each of ``nprog`` programs at
    most 32 rows whose [rows, pow2(K)] weight tile has <= ``one_tile`` elements: the kernel's one-tile stages,
    whose weight loads run ahead of the barriers (the 385M layer on 132 SMs: yes; 1B and 7B: no)."""
    for N, K in ((4 * h, d), (d, h), (g, d), (d, g)):
        br = max(2, _pow2(-(-N // nprog)))
        if br > 32 or br * _pow2(K) > one_tile:
            return False
    return True


def _reference(x, state, wqkvu, wout, w1, w2, w3, s, theta, pos, act, glu_act):
    xn, S = decode_layer_naive(x, state, wqkvu, wout, w1, w2, w3, s, theta, pos, act, glu_act)
    x.copy_(xn)
    state.copy_(S)


@torch.library.custom_op("tnllm::decode_layer_step", mutates_args=("x", "state"))
def _decode_layer_step(x: Tensor, state: Tensor, wqkvu: Tensor, wout: Tensor, w1: Tensor, w2: Tensor, w3: Tensor,
                       s: Tensor, theta: Optional[Tensor], pos: Optional[Tensor], act: str, glu_act: str) -> None:
    _reference(x, state, wqkvu, wout, w1, w2, w3, s, theta, pos, act, glu_act)


@_decode_layer_step.register_fake
def _(x, state, wqkvu, wout, w1, w2, w3, s, theta, pos, act, glu_act):
    return None


def _kernel_ok(x, state, weights) -> bool:
    from . import triton as tri
    return tri.supported(x, state, *weights) and x.is_contiguous() and state.is_contiguous()


def _cuda(x, state, wqkvu, wout, w1, w2, w3, s, theta, pos, act, glu_act, persistent=None):
    """The CUDA kernel of the op: the Triton launcher where it applies, else the reference form. The shapes are
    checked here too (a direct ``torch.ops.tnllm`` call skips the public wrapper's checks; the kernel trusts them)."""
    check_inputs(x, state, wqkvu, wout, w1, w2, w3, s, theta, pos, act, glu_act)
    if not _kernel_ok(x, state, (wqkvu, wout, w1, w2, w3)):
        return _reference(x, state, wqkvu, wout, w1, w2, w3, s, theta, pos, act, glu_act)
    from . import triton as tri
    tri.decode_layer_triton(x, state, wqkvu, wout, w1, w2, w3, s, theta, pos, act, glu_act, persistent=persistent)


_decode_layer_step.register_kernel("cuda")(_cuda)


def decode_layer_step(x: Tensor, state: Tensor, wqkvu: Tensor, wout: Tensor, w1: Tensor, w2: Tensor, w3: Tensor,
                      s: Tensor, theta: Tensor | None = None, pos: Tensor | None = None, act: str = "silu",
                      glu_act: str = "none") -> Tensor:
    """One decoder layer for one token per row, in place: ``x`` [B, d] (the residual stream in, the layer's output
    out) and ``state`` [B, H, Dk, e] fp32 advance by one token. The maths of ``decode_layer_naive`` (the fused
    decode step's layer: both weight-free SRMSNorms folded in as per-row scales).

    Args:
        x: [B, d] contiguous, fp16 / bf16 / fp32 (fp64: the reference form).
        state: [B, H, Dk, e] contiguous fp32 (fp64 with fp64 x); Dk = 2e with LRPE, else e.
        wqkvu: [4h, d] (``qkvu_proj.weight``, h = H * e); wout: [d, h]; w1, w2: [g, d]; w3: [d, g]; x's dtype.
        s: [H] decay rates (lam = exp(-s)).
        theta: [H, 1, e] LRPE frequencies, or None; pos: [B] integer positions (needed with LRPE).
        act: the activation of q and k; glu_act: the SGLU's ("silu", "relu" or "none").

    On CUDA, up to 4 rows of a layer that fits the kernel (``one_fits``: e.g. the 385M layer, not the 1B or 7B
    one), one persistent Triton launch (all five stages of the layer with grid barriers between them); the
    reference form elsewhere. Returns ``x``.
    """
    check_inputs(x, state, wqkvu, wout, w1, w2, w3, s, theta, pos, act, glu_act)
    if theta is None:
        pos = None
    torch.ops.tnllm.decode_layer_step(x, state, wqkvu, wout, w1, w2, w3, s.detach(), theta, pos, act, glu_act)
    return x


def _stack_reference(x, state, wqkvu, wout, w1, w2, w3, s, theta, pos, act, glu_act):
    theta = list(theta) or None
    xn, S = decode_stack_naive(x, state, wqkvu, wout, w1, w2, w3, s, theta, pos, act, glu_act)
    x.copy_(xn)
    state.copy_(S)


@torch.library.custom_op("tnllm::decode_stack_step", mutates_args=("x", "state"))
def _decode_stack_step(x: Tensor, state: Tensor, wqkvu: List[Tensor], wout: List[Tensor], w1: List[Tensor],
                       w2: List[Tensor], w3: List[Tensor], s: List[Tensor], theta: List[Tensor],
                       pos: Optional[Tensor], act: str, glu_act: str) -> None:
    # theta: one tensor per layer, or empty (no LRPE: a schema has no optional list)
    _stack_reference(x, state, wqkvu, wout, w1, w2, w3, s, theta, pos, act, glu_act)


@_decode_stack_step.register_fake
def _(x, state, wqkvu, wout, w1, w2, w3, s, theta, pos, act, glu_act):
    return None


def _stack_cuda(x, state, wqkvu, wout, w1, w2, w3, s, theta, pos, act, glu_act, persistent=None):
    """The CUDA kernel of the stack op: one Triton launch for all the layers where it applies, else the reference
    (the shapes checked here too, as in ``_cuda``)."""
    check_stack_inputs(x, state, wqkvu, wout, w1, w2, w3, s, list(theta) or None, pos, act, glu_act)
    if not _kernel_ok(x, state, (wqkvu, wout, w1, w2, w3)):
        return _stack_reference(x, state, wqkvu, wout, w1, w2, w3, s, theta, pos, act, glu_act)
    from . import triton as tri
    tri.decode_stack_triton(x, state, wqkvu, wout, w1, w2, w3, s, list(theta) or None, pos, act, glu_act,
                            persistent=persistent)


_decode_stack_step.register_kernel("cuda")(_stack_cuda)


def decode_stack_step(x: Tensor, state: Tensor, wqkvu, wout, w1, w2, w3, s, theta=None, pos: Tensor | None = None,
                      act: str = "silu", glu_act: str = "none") -> Tensor:
    """L consecutive decoder layers for one token per row, in place, in one launch: the layers of
    ``decode_layer_step`` one after another, with the residual ``x`` [B, d] passed from each to the next and
    ``state`` [L, B, H, Dk, e] fp32 (the L layers' states stacked; contiguous) advanced by one token.

    ``wqkvu``, ``wout``, ``w1``, ``w2``, ``w3`` and ``s`` are lists of L per-layer tensors shaped as
    ``decode_layer_step`` takes them; ``theta`` is None (no layer has LRPE) or a list of L [H, 1, e] frequencies
    (every layer has LRPE), with ``pos`` [B] then. All layers share one shape. On CUDA, up to 4 rows of layers that fit
    the kernel (``one_fits``), one persistent Triton launch: each layer's five stages, grid barriers between them
    and between the layers, and the next layer's first weight tiles loaded during the current layer's last stage;
    the reference form (``decode_stack_naive``) elsewhere. Returns ``x``.
    """
    check_stack_inputs(x, state, wqkvu, wout, w1, w2, w3, s, theta, pos, act, glu_act)
    if theta is None:
        pos = None
    torch.ops.tnllm.decode_stack_step(x, state, list(wqkvu), list(wout), list(w1), list(w2), list(w3),
                                      [t.detach() for t in s], [] if theta is None else list(theta), pos, act,
                                      glu_act)
    return x


def use_triton_on_cpu(enable: bool = True) -> None:
    """Register the Triton launchers (five staged launches per layer) as the CPU kernels of both ops (``enable``),
    or the references again: for tests under ``TRITON_INTERPRET=1``."""
    global TRITON_ON_CPU
    TRITON_ON_CPU = bool(enable)
    staged = functools.partial(_cuda, persistent=False)
    stack_staged = functools.partial(_stack_cuda, persistent=False)
    torch.library.register_kernel("tnllm::decode_layer_step", "cpu", staged if enable else _reference)
    torch.library.register_kernel("tnllm::decode_stack_step", "cpu", stack_staged if enable else _stack_reference)


__all__ = ["decode_layer_step", "decode_stack_step", "use_triton_on_cpu", "one_fits", "shared_gpu", "MAX_ROWS", "EPS"]
