"""The decode step with the fewest kernels per layer (``CudaGraphDecoder(decode_path="fused")``).

The same maths as ``model.step``, rearranged so one layer is six device operations on CUDA (six kernel
launches where cuBLAS runs each GEMM as one kernel):

    qkvu = x Wqkvu^T                       # GEMM on the un-normalised residual x
    y    = gla_decode(qkvu, S, norm_input=x)   # Triton: token norm folded in, act, LRPE, S update, o, SRMSNorm, * u
    x    = residual_gemv(x, y, Wout)       # x + y Wout^T: Triton up to 4 rows (cuBLAS addmm above), residual inside
    l12  = x W12^T                         # l1 and l2 as one GEMM over a [2g, d] stacked weight
    g    = sglu_gate(l12, norm_input=x)    # Triton: channel norm folded in, act(a) * b
    x   += g W3^T                          # GEMM + residual (addmm_, beta = 1)

SRMSNorm has no weight, so srms_norm(x) W^T = r(x) (x W^T) with r the per-row scale: the two norms
become a scale inside the kernels that read the projection. The roundings differ from ``model.step``
at the model dtype's epsilon (the GEMM output is rounded before the scale; the residual add happens
inside the GEMM's fp32 epilogue), so greedy decoding agrees except near ties; in fp32 the logits
agree to ~1e-6.

The stacked [2g, d] weights are a decode-time copy of each layer's ``l1.weight`` and ``l2.weight``
(the model keeps its parameters, names and state_dict untouched), built once; ``refresh()`` re-copies
any layer whose source parameters changed (a new tensor, or an in-place update: the parameters'
version counters), which ``CudaGraphDecoder.step`` calls before each step. Memory: one more copy of
the l1 and l2 weights (``extra_bytes``). torchao int8 weights (``tnllm.compile.quantize_int8``) are
stacked exactly (their int8 rows and per-row scales side by side); their GEMMs go through torchao, and
the residual add is a separate add.

With ``layer_kernel=True`` (``CudaGraphDecoder(decode_path="layer")``) each layer is instead one launch of the
persistent kernel ``tnllm::decode_layer_step`` (``tnllm.ops.decode_layer``: the same maths, its five stages
separated by grid barriers inside the launch) wherever it applies (CUDA, plain weights, at most 4 rows, layers
that fit its one-tile stages: ``one_fits``); other calls take the six operations above. It reads l1 and l2 from
the model's own weights, so the stacked copy is only made at the first call that falls back to the six
operations (a decoder of one row never makes it: 264 MiB less at 385M in bf16).

With ``stack=True`` as well (``CudaGraphDecoder(decode_path="stack")``), each run of like layers (``state_groups``:
the same state shape, LRPE on all or none; the 385M preset: layer 0, then layers 1-23) is one launch of
``tnllm::decode_stack_step``, whose programs go from one layer to the next through a grid barrier instead of a new
launch and load the next layer's first weight tiles during the current layer's last stage. That needs each
group's states stacked in one tensor (``stacked_zero_state``: the decoder's buffers are views of them), passed as
``stacks``; without them, or where the layer kernel does not apply, the calls fall back as above.

Supported: the weight-free SRMSNorm (``norm_type`` "simplermsnorm"), no biases, no tensor parallelism.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from tnllm.ops.decode_layer import decode_layer_step, decode_stack_step
from tnllm.ops.decode_layer import op as layer_op
from tnllm.ops.gemv import residual_gemv
from tnllm.ops.gla_decode import gla_decode_step
from tnllm.ops.sglu import sglu_gate


def fused_unsupported(model) -> str | None:
    """Why ``model`` cannot decode through the fused step (None when it can)."""
    cfg = model.config
    if cfg.norm_type not in ("simplermsnorm", "srmsnorm"):
        return f"norm_type {cfg.norm_type!r} (the fused step folds the weight-free SRMSNorm into its kernels)"
    if cfg.bias:
        return "bias=True (the folded norm scales the projection before a bias would be added)"
    for i, layer in enumerate(model.model.layers):
        tm = layer.token_mixer
        if tm.norm_group is not None or (tm.lrpe is not None and tm.lrpe.theta_sharded):
            return f"layer {i} is split for tensor parallelism"
    return None


def layer_kernel_applies(model, rows: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether every layer of ``model`` can run as one ``decode_layer_step`` launch for ``rows`` rows of ``dtype``
    on ``device``: CUDA (or the CPU with the op's Triton launcher registered, under the interpreter), 1 to
    ``MAX_ROWS`` rows, layers that fit the kernel's one-tile stages (``one_fits``), plain contiguous weights of
    that dtype (not torchao's)."""
    on_device = device.type == "cuda" or (device.type == "cpu" and layer_op.TRITON_ON_CPU)
    if not on_device or not 1 <= rows <= layer_op.MAX_ROWS:
        return False
    from tnllm.ops._device import num_sms
    cfg = model.config
    if not layer_op.one_fits(rows, cfg.decoder_embed_dim, cfg.hidden_dim, cfg.glu_dim, num_sms(device)):
        return False
    for layer in model.model.layers:
        tm, glu = layer.token_mixer, layer.channel_mixer
        ws = (tm.qkvu_proj.weight, tm.out_proj.weight, glu.l1.weight, glu.l2.weight, glu.l3.weight)
        if not all(_plain(w) and w.is_contiguous() and w.dtype == dtype for w in ws):
            return False
    return True


def layer_pays(model, batch_size: int) -> bool:
    """Whether ``decode_path="auto"`` takes the one-launch layer (``"layer"``) over the six operations: where it
    was measured faster (H200, bf16, ``tnllm bench decode`` and ``bench/decode_layer.py``): CUDA, one row, and a
    model the kernel applies to (``layer_kernel_applies``: the 385M layer, 0.59 against 0.77 ms per token). At 2
    and 4 rows the six operations were faster (the l1 / l2 tiles held for every row), and the 1B and 7B layers do
    not fit (an earlier row-block version was slower there). Never under the CUDA MPS (``shared_gpu``), where the
    launch's grid barriers could wait for programs that an SM limit keeps from starting."""
    if fused_unsupported(model) is not None or batch_size != 1 or layer_op.shared_gpu():
        return False
    w = model.lm_head.weight
    if w.device.type != "cuda" or w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return layer_kernel_applies(model, batch_size, w.device, w.dtype)


def state_groups(model) -> list[tuple[int, int]]:
    """[(start, stop)] runs of consecutive layers that one ``decode_stack_step`` launch can take together: the same
    state shape and LRPE on all or none (the released models: layer 0 with LRPE, then all the others)."""
    kinds = [(layer.token_mixer.lrpe is not None, shape) for layer, shape in zip(model.model.layers,
                                                                                  model.state_shapes())]
    groups, start = [], 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[start]:
            groups.append((start, i))
            start = i
    return groups


def stacked_zero_state(model, batch_size: int, device=None) -> tuple[list[Tensor], list[tuple[int, int, Tensor]]]:
    """Zero fp32 states [B, H, Dk, Dv] for every layer, as views of one stacked tensor per ``state_groups`` run:
    (the per-layer views, [(start, stop, stack [stop - start, B, H, Dk, Dv])]), what ``FusedDecodeStep(stack=True)``
    takes as ``stacks``."""
    dev = model.lm_head.weight.device if device is None else torch.device(device)
    shapes = model.state_shapes()
    states, stacks = [], []
    for a, b in state_groups(model):
        S = torch.zeros(b - a, batch_size, *shapes[a], dtype=torch.float32, device=dev)
        states += list(S.unbind(0))
        stacks.append((a, b, S))
    return states, stacks


def _plain(w: Tensor) -> bool:
    return type(w) in (torch.Tensor, torch.nn.Parameter)


def stack_rows(w1: Tensor, w2: Tensor) -> Tensor:
    """[w1; w2] along the output rows: a plain cat, or for a torchao quantized weight the same subclass
    over its inner tensors (int8 rows, per-row scales) side by side, which is exact."""
    if _plain(w1) and _plain(w2):
        return torch.cat([w1.detach(), w2.detach()])
    if type(w1) is not type(w2) or not hasattr(w1, "__tensor_flatten__"):
        raise ValueError(f"cannot stack l1 and l2 weights of types {type(w1).__name__} and {type(w2).__name__}")
    names, meta = w1.__tensor_flatten__()
    inner = {}
    for n in names:
        a, b = getattr(w1, n), getattr(w2, n)
        if a.dim() == 0 or a.shape[0] != w1.shape[0] or b.shape[0] != w2.shape[0]:
            raise ValueError(f"cannot stack {type(w1).__name__} weights: inner tensor {n!r} is not per output row")
        inner[n] = torch.cat([a, b])
    return type(w1).__tensor_unflatten__(inner, meta, torch.Size([w1.shape[0] + w2.shape[0], *w1.shape[1:]]), None)


class FusedDecodeStep:
    """``step(ids [B], states, position [B]) -> logits [B, V]``: one decode step in place on ``states``
    (per-layer fp32 [B, H, Dk, Dv]); ``position`` is each row's position (the LRPE angle). Module docstring."""

    def __init__(self, model, layer_kernel: bool = False, stack: bool = False):
        path = "stack" if stack else "layer" if layer_kernel else "fused"
        if stack and not layer_kernel:
            raise ValueError("FusedDecodeStep: `stack=True` runs stacks of layer kernels and needs `layer_kernel=True`")
        why = fused_unsupported(model)
        if why is not None:
            raise ValueError(f"decode_path='{path}' cannot run this model: {why}")
        self.model = model
        self.layer_kernel = bool(layer_kernel)
        self.stack = bool(stack)
        # the stacked l1|l2 copies, only for the six-operation layers: with the layer kernel they are made at the
        # first call that falls back to them (more rows than the kernel takes, say), else never
        self._need_w12 = not self.layer_kernel
        self.glu_act = model.config.glu_act
        self._w12: list[Tensor | None] = [None] * len(model.model.layers)
        self._theta: list[Tensor | None] = [None] * len(model.model.layers)
        self._seen: list[tuple | None] = [None] * len(model.model.layers)
        self.refresh()

    @staticmethod
    def _key(layer) -> tuple:
        glu, tm = layer.channel_mixer, layer.token_mixer
        params = [glu.l1.weight, glu.l2.weight] + ([tm.lrpe.theta] if tm.lrpe is not None else [])
        return tuple((id(p), p._version) for p in params)

    @torch.no_grad()
    def refresh(self) -> tuple[int, bool]:
        """Re-copy the stacked l1|l2 weights (and the fp32 LRPE frequencies) of every layer whose source
        parameters changed since the last copy. Returns (layers re-copied, whether a copy got new storage):
        a copy keeps its storage when its shape, dtype and type agree, so a captured CUDA graph stays
        valid; new storage (a quantized or re-shaped weight) needs a new capture."""
        n, replaced = 0, False
        for i, layer in enumerate(self.model.model.layers):
            key = self._key(layer)
            if key == self._seen[i] and (self._w12[i] is not None or not self._need_w12):
                continue
            glu, tm = layer.channel_mixer, layer.token_mixer
            if self._need_w12:
                w12 = stack_rows(glu.l1.weight, glu.l2.weight)
                old = self._w12[i]
                if old is not None and _plain(old) and _plain(w12) and old.shape == w12.shape \
                        and old.dtype == w12.dtype:
                    old.copy_(w12)
                else:
                    replaced = replaced or old is not None
                    self._w12[i] = w12
            if tm.lrpe is not None:
                th = tm.lrpe.theta.detach().to(torch.float32)
                if self._theta[i] is not None and self._theta[i].shape == th.shape:
                    self._theta[i].copy_(th)
                else:
                    replaced = replaced or self._theta[i] is not None
                    self._theta[i] = th.clone()
            self._seen[i] = key
            n += 1
        return n, replaced

    @property
    def extra_bytes(self) -> int:
        """Bytes of the decode-time copies (the stacked l1|l2 weights and the fp32 LRPE frequencies)."""
        n = 0
        for w in self._w12 + self._theta:
            if w is None:
                continue
            if _plain(w):
                n += w.numel() * w.element_size()
            else:
                n += sum(getattr(w, k).numel() * getattr(w, k).element_size() for k in w.__tensor_flatten__()[0])
        return n

    @staticmethod
    def _add_projection(x: Tensor, y: Tensor, w: Tensor, gemv: bool = True) -> Tensor:
        """x + y w^T for a plain weight: ``residual_gemv`` (``gemv``; out_proj: H200 batch 1, 4.3 against
        cuBLAS addmm's 7.3 us in the step's profile) or cuBLAS ``addmm_`` in place (l3: the Triton kernel,
        with or without the gate inside, measured slower there); for a torchao weight its GEMM, then an add."""
        if _plain(w):
            return residual_gemv(x, y, w) if gemv else x.addmm_(y, w.t())
        return x + F.linear(y, w)

    @torch.no_grad()
    def __call__(self, ids: Tensor, states, position: Tensor, stage=None, stacks=None) -> Tensor:
        """``stage``: None, or a function of a stage name ("embed"; per layer "qkvu", "mixer", "out", "l12",
        "sglu", "l3"; "layer" or "stack" for the one-launch paths; "head") returning a context manager entered around
        that stage (a profiler range: bench/decode_profile.py); the same calls either way. ``stacks``: with
        ``stack=True``, [(start, stop, S)] where S [stop - start, B, H, Dk, Dv] holds layers start..stop-1's states
        and ``states[i]`` is ``S[i - start]`` (``stacked_zero_state``)."""
        m = self.model
        with _stage(stage, "embed"):
            x = m.model.embed_tokens(ids)
            if m.model.embed_scale != 1.0:
                x = x * m.model.embed_scale
        one_launch = self.layer_kernel and layer_kernel_applies(m, x.shape[0], x.device, x.dtype)
        if one_launch:
            x = x.contiguous()           # updated in place by every layer's launch
        # the stacks by their first layer: each runs when the loop reaches it, so the layers keep their order
        starts = {a: (b, S) for a, b, S in stacks} if one_launch and self.stack and stacks is not None else {}
        skip_to = 0
        for i, layer in enumerate(m.model.layers):
            if i < skip_to:
                continue
            if i in starts:
                skip_to, S = starts[i]
                with _stage(stage, "stack"):
                    self._run_stack(x, S, i, skip_to, position)
                continue
            tm, glu = layer.token_mixer, layer.channel_mixer
            theta = self._theta[i]
            if one_launch:
                with _stage(stage, "layer"):
                    decode_layer_step(x, states[i], tm.qkvu_proj.weight, tm.out_proj.weight, glu.l1.weight,
                                      glu.l2.weight, glu.l3.weight, tm.s, theta, position if theta is not None else None,
                                      tm.act_name, self.glu_act)
                continue
            if self._w12[i] is None:             # the layer kernel's decoder falling back: make the copies now
                self._need_w12 = True
                self.refresh()
            with _stage(stage, "qkvu"):
                qkvu = F.linear(x, tm.qkvu_proj.weight)
            with _stage(stage, "mixer"):
                y, _ = gla_decode_step(qkvu, states[i], tm.s, theta, position if theta is not None else None,
                                       tm.act_name, inplace=True, norm_input=x)
            with _stage(stage, "out"):
                x = self._add_projection(x, y, tm.out_proj.weight)
            with _stage(stage, "l12"):
                l12 = F.linear(x, self._w12[i])
            with _stage(stage, "sglu"):
                g = sglu_gate(l12, x, self.glu_act)
            with _stage(stage, "l3"):
                x = self._add_projection(x, g, glu.l3.weight, gemv=False)
        with _stage(stage, "head"):
            return m.head(x)

    def _run_stack(self, x: Tensor, S: Tensor, a: int, b: int, position: Tensor) -> None:
        """Layers a..b-1 as one ``decode_stack_step`` launch on their stacked states S."""
        layers = self.model.model.layers[a:b]
        tms = [layer.token_mixer for layer in layers]
        glus = [layer.channel_mixer for layer in layers]
        thetas = self._theta[a:b]
        lrpe = thetas[0] is not None
        decode_stack_step(x, S, [tm.qkvu_proj.weight for tm in tms], [tm.out_proj.weight for tm in tms],
                          [glu.l1.weight for glu in glus], [glu.l2.weight for glu in glus],
                          [glu.l3.weight for glu in glus], [tm.s for tm in tms], thetas if lrpe else None,
                          position if lrpe else None, tms[0].act_name, self.glu_act)


def _stage(stage, name: str):
    return contextlib.nullcontext() if stage is None else stage(name)
