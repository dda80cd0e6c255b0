"""TransNormerLLM v1 as released: GLA token mixer with LRPE-d and a fixed decay, SGLU, SRMSNorm.

Legend: B batch, T length, d model width, H heads, e head dim, L layers, S per-layer state [B, H, Dk, Dv].
Module attribute names equal the released checkpoint keys (``model.layers.{i}.token_mixer.qkvu_proj``...),
so released weights load without renaming (see ``tnllm.hub``).

The layer math exists once (``NormLinearAttention._mix``); ``forward``/``prefill`` pass it the
Lightning Attention custom op and ``step`` passes the one-token recurrent update. On CUDA the step's
token mixer after ``qkvu_proj`` runs as one fused kernel (``tnllm::gla_decode_step``, the same maths
and roundings); ``NormLinearAttention.decode_kernel`` or ``step(..., decode_kernel=)`` picks the path.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tnllm.ops import lightning_attn, lightning_attn_step, lightning_attn_varlen, srms_norm
from tnllm.ops.gla_decode import gla_decode_step
from tnllm.ops.lightning_attn._common import _is_fake
from tnllm.ops.lightning_attn.varlen import check_boundary_values, check_cu_seqlens
from tnllm.ops.norm import EPS
from tnllm.ops.norm_triton import srms_norm_gate

from .config import TransNormerConfig, alibi_slopes

_ACT = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "none": lambda x: x}


def _exporting() -> bool:
    is_exp = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exp is not None and is_exp())


def check_decode_kernel(value, name: str = "decode_kernel") -> None:
    """``value`` must be None (auto), True (force the fused decode kernel) or False (the aten step)."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"`{name}` must be None (auto: the fused kernel on CUDA where it applies), True (always "
                         f"the fused kernel) or False (the plain aten step), got {value!r}")


def _can_read(t: Tensor) -> bool:
    """True where a check may read ``t``'s values: eager, a real tensor, no CUDA graph being captured."""
    if torch.compiler.is_compiling() or _is_fake(t):
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


class _AllReduceSum(torch.autograd.Function):
    """Sum over a process group; the gradient of a sum that every rank consumes is the sum of the gradients.

    Written on the functional collectives so it traces under torch.compile, and as an autograd.Function
    because not every torch release (2.11) registers autograd for ``_c10d_functional.all_reduce``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        from torch.distributed import _functional_collectives as funcol
        ctx.group = group
        return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), "sum", group))

    @staticmethod
    def backward(ctx, g: Tensor):
        from torch.distributed import _functional_collectives as funcol
        return funcol.wait_tensor(funcol.all_reduce(g.contiguous(), "sum", ctx.group)), None


def tp_srms_norm(x: Tensor, group, width: int, eps: float = EPS) -> Tensor:
    """SRMSNorm over a last dim that is split across the process ``group``: x [..., width/tp] local -> same shape.

    ``y = x * rsqrt(sum_all_ranks(x^2) / width + eps)`` in fp32, cast back to x's dtype. On one process
    (``group`` of size 1) this equals ``tnllm.ops.srms_norm``.
    """
    xf = x.float() if x.dtype != torch.float64 else x
    ss = _AllReduceSum.apply(xf.pow(2).sum(-1, keepdim=True), group)
    return (xf * torch.rsqrt(ss / width + eps)).to(x.dtype)


def decay_rates(cfg: TransNormerConfig, layer_idx: int) -> Tensor:
    """s [H] fp32 for layer ``layer_idx``; lam = exp(-s). By ``cfg.decay_type``: "layer" (released): ALiBi slope
    times (1 - l/(L-1) + 1e-5); "uniform": the ALiBi slope on every layer; "none": 0 (lam = 1).

    With a single layer the released formula divides by zero; we take l/(L-1) = 0 there.
    """
    slopes = torch.tensor(alibi_slopes(cfg.decoder_attention_heads), dtype=torch.float32)
    if cfg.decay_type == "none":
        return torch.zeros_like(slopes)
    if cfg.decay_type == "uniform":
        return slopes
    L = cfg.decoder_layers
    frac = layer_idx / (L - 1) if L > 1 else 0.0
    return slopes * (1 - frac + 1e-5)


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight (``norm_type="rmsnorm"``): y = x * rsqrt(mean(x^2, -1) + eps) * weight,
    the normalisation in fp32 (fp64 for fp64), cast back, then the weight (init 1); the output has x's dtype."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return srms_norm(x, self.eps) * self.weight.to(x.dtype)


def _norm(cfg: TransNormerConfig, width: int) -> Callable[[Tensor], Tensor]:
    """The norm ``cfg.norm_type`` names: RMSNorm (a module with a weight) or the parameter-free SRMSNorm."""
    return RMSNorm(width) if cfg.norm_type == "rmsnorm" else srms_norm


class RecurrentState(list):
    """The decoding state: per-layer tensors [B, H, Dk, Dv] (fp32; fp64 for an fp64 model) and each row's
    position (the number of tokens that row has consumed: it places the LRPE angles of its next token).

    A list, so ``state[i]`` is layer i's tensor. ``position`` is an int64 tensor [B]; rows may sit at
    different positions (continuous batching puts a new sequence into one row with ``reset_rows`` or
    ``load_rows`` while the others keep going). ``offset`` is the one position all rows share (ValueError
    when they differ). Built with an int (all rows there) the state keeps that int, so the model never reads
    the position back from the device to find it.

    ``RecurrentState(tensors, position=0)``: ``position`` is an int or an integer tensor [B].
    """

    def __init__(self, tensors: Sequence[Tensor] = (), position: int | Tensor = 0):
        super().__init__(tensors)
        self._pending = None                # (base positions [B], n): position = base + n, made when read
        if isinstance(position, Tensor):
            if position.is_floating_point() or position.is_complex() or position.dtype == torch.bool \
                    or position.dim() != 1 or (len(self) and position.shape[0] != self[0].shape[0]):
                raise ValueError(f"RecurrentState: `position` must be an int or an integer tensor [B] (B = "
                                 f"{self[0].shape[0] if len(self) else '?'}), got {position.dtype} "
                                 f"{tuple(position.shape)}")
            self._position, self._offset = position.to(torch.int64), None
        elif isinstance(position, (int, np.integer)) and not isinstance(position, bool) and position >= 0:
            self._position, self._offset = None, int(position)
        else:
            raise ValueError(f"RecurrentState: `position` must be an int >= 0 or an integer tensor [B], got "
                             f"{position!r}")

    @property
    def batch_size(self) -> int:
        return self[0].shape[0] if len(self) else 0

    @property
    def position(self) -> Tensor:
        """Each row's position, int64 [B], on the states' device."""
        if self._pending is not None:
            base, n = self._pending
            self._position, self._pending = base + n, None
        if self._position is None:
            dev = self[0].device if len(self) else None
            self._position = torch.full((self.batch_size,), self._offset, dtype=torch.int64, device=dev)
        return self._position

    @property
    def shared_offset(self) -> int | None:
        """The position all rows share when it is known without reading the device, else None."""
        return self._offset

    @property
    def offset(self) -> int:
        """The position all rows share; ValueError when rows sit at different positions."""
        if self._offset is not None:
            return self._offset
        pos = self.position.cpu()
        if pos.numel() and bool((pos != pos[0]).any()):
            raise ValueError(f"the rows sit at different positions {pos.tolist()}: there is no single offset "
                             "(read `state.position`)")
        return int(pos[0]) if pos.numel() else 0

    def advanced(self, tensors: Sequence[Tensor], n: int) -> "RecurrentState":
        """The state after ``n`` more tokens per row: ``tensors`` at position + n."""
        if self._offset is not None:
            return RecurrentState(tensors, self._offset + n)
        new = RecurrentState(tensors, self.position)
        new._pending = (self.position, n)           # computed only when read (a static-buffer decoder
        return new                                  # advances its own position tensor instead)

    def _rows(self, rows) -> Tensor:
        B = self.batch_size
        dev = self[0].device if len(self) else None
        idx = torch.as_tensor(rows, device=dev)
        if idx.dtype == torch.bool:
            if tuple(idx.shape) != (B,):
                raise ValueError(f"`rows` as a mask must have shape [B] = [{B}], got {tuple(idx.shape)}")
            return idx.nonzero()[:, 0]
        if idx.is_floating_point() or idx.dim() > 1:
            raise ValueError(f"`rows` must be row indices (an int, a list or an int tensor) or a bool mask [B], "
                             f"got {idx.dtype} {tuple(idx.shape)}")
        idx = idx.reshape(-1).to(torch.int64)
        if idx.numel() and _can_read(idx) and (int(idx.min()) < -B or int(idx.max()) >= B):
            raise ValueError(f"`rows` {idx.tolist()} out of range for a batch of {B}")
        return idx % max(B, 1)

    @torch.no_grad()
    def reset_rows(self, rows) -> "RecurrentState":
        """In place: the given rows (indices, or a bool mask [B]) back to the start of a sequence (zero
        states, position 0); the other rows are untouched. Returns ``self``."""
        idx = self._rows(rows)
        for S in self:
            S.index_fill_(0, idx, 0)
        if self._offset != 0:
            self.position.index_fill_(0, idx, 0)
            self._offset = None
        return self

    @torch.no_grad()
    def load_rows(self, rows, src: "RecurrentState") -> "RecurrentState":
        """In place: copy ``src``'s rows (its batch = the number of ``rows``) and positions into the given rows,
        e.g. a new sequence prefilled alone into one row of a running batch. Returns ``self``."""
        idx = self._rows(rows)
        if not isinstance(src, RecurrentState) or len(src) != len(self) or src.batch_size != idx.numel():
            raise ValueError(f"`src` must be a RecurrentState of {len(self)} layers and {idx.numel()} rows, got "
                             f"{type(src).__name__} of {len(src) if hasattr(src, '__len__') else '?'} layers and "
                             f"{getattr(src, 'batch_size', '?')} rows")
        for S, X in zip(self, src):
            if X.shape[1:] != S.shape[1:]:
                raise ValueError(f"`src` layer shape {tuple(X.shape[1:])} differs from {tuple(S.shape[1:])}")
            S.index_copy_(0, idx, X.to(S.device, S.dtype))
        if src.shared_offset is None or src.shared_offset != self._offset:
            self.position.index_copy_(0, idx, src.position.to(self.position.device))
            self._offset = None
        return self

    def clone(self) -> "RecurrentState":
        return RecurrentState([S.clone() for S in self],
                              self._offset if self._offset is not None else self.position.clone())

    def __repr__(self) -> str:
        pos = self._offset if self._offset is not None else self.position.tolist()
        return (f"RecurrentState(layers={len(self)}, position={pos}, "
                f"shape={tuple(self[0].shape) if self else None})")


class Lrpe(nn.Module):
    """LRPE-d: x -> [x cos(theta t), x sin(theta t)], doubling the head dim (positions in fp32)."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        n = num_heads * head_dim
        self.theta = nn.Parameter((10000 ** (-2 / n * torch.arange(n, dtype=torch.float32))).reshape(num_heads, 1, head_dim))
        # tensor parallel (tnllm.train.parallelize.HeadShard) makes theta a DTensor sharded by heads and sets
        # this: the forward then uses the local shard (the heads this process computes)
        self.theta_sharded = False

    def local_theta(self) -> Tensor:
        """theta [H_local, 1, e] of the heads this process computes (all heads without tensor parallel)."""
        return self.theta.to_local() if self.theta_sharded else self.theta

    def forward(self, x: Tensor, offset) -> Tensor:
        """x [B, H, T, e]; ``offset``: the first position, an int or 0-d tensor, or an int tensor [B] of
        per-row positions (the exported step and static decode buffers pass tensors), or an int tensor
        [B, T] of every token's own position (packed sequences, each restarting its positions)."""
        theta = self.local_theta()
        T = x.shape[-2]
        dt = torch.promote_types(x.dtype, torch.float32)                # fp32 positions (fp64 for fp64)
        if isinstance(offset, Tensor) and offset.dim() == 2:
            ang = theta.to(dt) * offset.to(dt)[:, None, :, None]              # [B, H, T, e]
            xf = x.to(dt)
            return torch.cat([xf * torch.cos(ang), xf * torch.sin(ang)], dim=-1).to(x.dtype)
        pos = torch.arange(T, device=x.device, dtype=dt)
        if isinstance(offset, Tensor) and offset.dim() == 1:
            pos = pos + offset.to(dt)[:, None]                                # [B, T]
            ang = theta.to(dt) * pos[:, None, :, None]                        # [B, H, T, e]
        else:
            ang = theta.to(dt) * (pos + offset)[:, None]                      # [H, T, e]
        xf = x.to(dt)
        return torch.cat([xf * torch.cos(ang), xf * torch.sin(ang)], dim=-1).to(x.dtype)


class NormLinearAttention(nn.Module):
    """Gated linear attention token mixer: qkvu -> act(q), act(k) -> LRPE -> decayed linear attention
    -> SRMSNorm over the width -> * u -> out_proj."""

    def __init__(self, cfg: TransNormerConfig, layer_idx: int):
        super().__init__()
        d, h = cfg.decoder_embed_dim, cfg.hidden_dim
        self.num_heads, self.head_dim = cfg.decoder_attention_heads, cfg.head_dim
        self.qkvu_proj = nn.Linear(d, 4 * h, bias=cfg.bias)
        self.out_proj = nn.Linear(h, d, bias=cfg.bias)
        self.act = _ACT[cfg.linear_act_fun]
        self.act_name = cfg.linear_act_fun
        self.lrpe = Lrpe(self.num_heads, self.head_dim) if cfg.lrpe(layer_idx) else None
        self.block_size = cfg.block_size
        # tensor parallel (tnllm.train.parallelize.apply_tp) sets the process group over which the heads are
        # split: the SRMSNorm of the attention output then sums the squares across it (full width h)
        self.norm_group = None
        self.norm_width = cfg.hidden_dim
        # norm_type "rmsnorm" (an ablation): a weighted RMSNorm of the attention output instead of SRMSNorm
        self.norm = RMSNorm(h) if cfg.norm_type == "rmsnorm" else None
        # fixed decay: no gradient, not in the state dict
        self.register_buffer("s", decay_rates(cfg, layer_idx), persistent=False)
        # the recurrent step's path: None (auto) runs the fused kernel tnllm::gla_decode_step on CUDA where
        # it applies (fp16/bf16/fp32 activations, fp32 state, SRMSNorm, no tensor parallel; never while
        # torch.export traces), True forces it (on CPU the op runs its reference form), False keeps the
        # aten step (what ONNX and torch.export trace)
        self.decode_kernel: bool | None = None

    def _apply(self, fn, recurse=True):
        # keep the decay rate in fp32 (or fp64) whatever the module dtype: a bf16 rate would
        # shift lam^t visibly over long contexts
        old = self.s
        super()._apply(fn, recurse)
        if self.s.dtype not in (torch.float32, torch.float64) and old.device.type != "meta":
            self.s = old.to(device=self.s.device, dtype=torch.float32)
        return self

    @property
    def key_dim(self) -> int:
        return self.head_dim * (2 if self.lrpe is not None else 1)

    def _heads(self, x: Tensor, offset) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        q, k, v, u = self.qkvu_proj(x).chunk(4, dim=-1)
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = self.act(q), self.act(k)
        if self.lrpe is not None:
            q, k = self.lrpe(q, offset), self.lrpe(k, offset)
        return q, k, v, u

    def o_norm(self, o: Tensor) -> Tensor:
        """SRMSNorm of the attention output [B, T, h_local] over the full width (across ``norm_group``); the weighted
        RMSNorm instead for ``norm_type="rmsnorm"``."""
        if self.norm is not None:
            return self.norm(o)
        if self.norm_group is None:
            return srms_norm(o)
        return tp_srms_norm(o, self.norm_group, self.norm_width)

    def _mix(self, x: Tensor, S: Tensor | None, offset, attend: Callable, mask: Tensor | None = None):
        """The layer math, once. ``attend(q, k, v, s, S) -> (o, S)``; ``mask`` [B, T] zeroes padded tokens' k, v."""
        q, k, v, u = self._heads(x, offset)
        if mask is not None:
            m = mask[:, None, :, None].to(v.dtype)
            k, v = k * m, v * m
        o, S = attend(q, k, v, self.s, S)
        # fused Triton norm * u on CUDA (reads o in [B, H, T, e]); a decode step (T = 1) keeps the plain
        # expression, which inductor fuses with its neighbours instead of launching one more kernel
        if o.is_cuda and o.shape[2] > 1 and self.norm_group is None and self.norm is None:
            return self.out_proj(srms_norm_gate(o, u)), S
        B, T, _ = x.shape
        o = o.transpose(1, 2).reshape(B, T, o.shape[1] * o.shape[3])    # explicit width: T = 0 or B = 0 is valid
        return self.out_proj(self.o_norm(o) * u), S

    def _parallel(self, q, k, v, s, S):
        return lightning_attn(q, k, v, s, initial_state=S, output_final_state=True, block_size=self.block_size,
                              check_decay=False)   # s is the fixed buffer; the check would sync on CUDA

    def _packed(self, q, k, v, s, S, cu_seqlens):
        # the boundaries were checked once by the model for all layers
        return lightning_attn_varlen(q, k, v, s, cu_seqlens, initial_state=S, output_final_state=True,
                                     block_size=self.block_size, check_decay=False, check_boundaries=False)

    def forward(self, x: Tensor, S: Tensor | None = None, offset=0, mask: Tensor | None = None,
                cu_seqlens: Tensor | None = None):
        """``cu_seqlens``: x [1, T, d] holds packed sequences (S then [N, H, Dk, Dv], one per sequence)."""
        if cu_seqlens is None:
            return self._mix(x, S, offset, self._parallel, mask)
        return self._mix(x, S, offset, lambda q, k, v, s, S: self._packed(q, k, v, s, S, cu_seqlens))

    def kernel_unsupported(self) -> str | None:
        """Why the fused decode kernel cannot run this layer's step (None when it can)."""
        if self.norm_group is not None:
            return "the heads are split for tensor parallelism (the kernel's SRMSNorm spans the local width only)"
        if self.norm is not None:
            return "norm_type 'rmsnorm' (the kernel applies the weight-free SRMSNorm)"
        return None

    def uses_kernel(self, x: Tensor, S: Tensor, kernel: bool | None = None) -> bool:
        """Whether ``step`` runs the fused kernel for these inputs: ``kernel`` (None: ``self.decode_kernel``).
        Auto picks it on CUDA for fp16/bf16/fp32 activations and a contiguous fp32 state, outside torch.export,
        when no gradient is wanted (the kernel has no backward); forcing it where the layer cannot use it is a
        ValueError."""
        k = self.decode_kernel if kernel is None else kernel
        check_decode_kernel(k)
        if k is False:
            return False
        why = self.kernel_unsupported()
        if k is None:
            return (why is None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
                    and S.dtype == torch.float32 and S.is_contiguous() and not x.requires_grad and not _exporting())
        if why is not None:
            raise ValueError(f"decode_kernel=True, but this layer cannot use the fused decode kernel: {why}")
        return True

    def step(self, x: Tensor, S: Tensor, offset, inplace: bool = False, kernel: bool | None = None):
        """One token per row: x [B, 1, d], S [B, H, Dk, Dv] -> (out [B, 1, d], new S). ``inplace`` writes
        the new state into ``S`` and returns it; ``kernel`` picks the path (see ``uses_kernel``)."""
        if not self.uses_kernel(x, S, kernel):
            a, S_new = self._mix(x, S, offset, lightning_attn_step)
            if inplace:
                S.copy_(S_new)
                return a, S
            return a, S_new
        B = x.shape[0]
        theta = pos = None
        if self.lrpe is not None:
            theta = self.lrpe.theta
            if isinstance(offset, Tensor) and offset.dim() == 1:
                pos = offset
            elif isinstance(offset, Tensor):
                pos = offset.reshape(1).expand(B)
            else:
                pos = torch.full((B,), int(offset), dtype=torch.int64, device=x.device)
        y, S_new = gla_decode_step(self.qkvu_proj(x[:, 0]), S, self.s, theta, pos, self.act_name, inplace=inplace)
        return self.out_proj(y)[:, None], S_new


class GLU(nn.Module):
    """SGLU channel mixer: l3(act(l1 x) * l2 x), act 'none' in every release."""

    def __init__(self, cfg: TransNormerConfig):
        super().__init__()
        d, g = cfg.decoder_embed_dim, cfg.glu_dim
        self.l1 = nn.Linear(d, g, bias=cfg.bias)
        self.l2 = nn.Linear(d, g, bias=cfg.bias)
        self.l3 = nn.Linear(g, d, bias=cfg.bias)
        self.act = _ACT[cfg.glu_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.l3(self.act(self.l1(x)) * self.l2(x))


class TransNormerDecoderLayer(nn.Module):
    def __init__(self, cfg: TransNormerConfig, layer_idx: int):
        super().__init__()
        self.token_mixer = NormLinearAttention(cfg, layer_idx)
        self.channel_mixer = GLU(cfg)
        self.token_norm, self.channel_norm = _norm(cfg, cfg.decoder_embed_dim), _norm(cfg, cfg.decoder_embed_dim)

    def forward(self, x: Tensor, S: Tensor | None = None, offset=0, mask: Tensor | None = None, step: bool = False,
                inplace: bool = False, kernel: bool | None = None, cu_seqlens: Tensor | None = None):
        tm, h = self.token_mixer, self.token_norm(x)
        a, S = tm.step(h, S, offset, inplace, kernel) if step else tm(h, S, offset, mask, cu_seqlens)
        x = x + a
        return x + self.channel_mixer(self.channel_norm(x)), S


class TransnormerModel(nn.Module):
    """The decoder stack (the ``model.`` prefix of the released keys)."""

    def __init__(self, cfg: TransNormerConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.decoder_embed_dim, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(TransNormerDecoderLayer(cfg, i) for i in range(cfg.decoder_layers))
        self.embed_scale = 1.0 if cfg.no_scale_embedding else math.sqrt(cfg.decoder_embed_dim)
        self.final_norm = _norm(cfg, cfg.decoder_embed_dim)


class TransNormerLLM(nn.Module):
    """TransNormerLLM for causal LM (docs/architecture.md walks one token through it).

    * ``model(ids)`` -> logits [B, T, V] (parallel blocked form, no state); ``hidden_states`` + ``head``.
    * ``model.prefill(ids, state=None, attention_mask=None)`` -> (logits [B, T, V], RecurrentState).
    * ``model.step(ids [B], state)`` -> (logits [B, V], RecurrentState): the recurrent form.
    * ``zero_state(B)``, ``state_shapes()``, ``validate_state(state, B)``.

    The state's positions (``RecurrentState.position``, [B]) let rows sit at different places, so a new
    sequence can go into one row of a running batch (``RecurrentState.reset_rows`` / ``load_rows``).
    """

    def __init__(self, cfg: TransNormerConfig):
        super().__init__()
        if not isinstance(cfg, TransNormerConfig):
            raise TypeError(f"TransNormerLLM expects a TransNormerConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.model = TransnormerModel(cfg)
        self.lm_head = nn.Linear(cfg.decoder_embed_dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    # -- init ---------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """normal(0, init_std) for every Linear and the Embedding, zero biases, padding row zeroed, RMSNorm
        weights 1; LRPE theta back to its closed-form init. Safe to call after building on the meta device."""
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            if isinstance(m, Lrpe):
                n = m.theta.numel()
                with torch.no_grad():
                    m.theta.copy_((10000 ** (-2 / n * torch.arange(n, dtype=torch.float32))).reshape(m.theta.shape))
        with torch.no_grad():
            self.model.embed_tokens.weight[self.config.pad_token_id].zero_()
        for i, layer in enumerate(self.model.layers):
            tm = layer.token_mixer
            tm.s = decay_rates(self.config, i).to(tm.qkvu_proj.weight.device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- checks -------------------------------------------------------------------------------
    def _check_ids(self, ids, name: str, ndim: int) -> None:
        check_token_ids(ids, name, ndim, self.config.vocab_size)

    def validate_state(self, state, B: int) -> RecurrentState:
        """``state`` checked against this model and batch ``B`` (per-layer shapes, dtype, device) as a
        ``RecurrentState``; a plain sequence of tensors is accepted only at the start (all zero, position 0)."""
        L = self.config.decoder_layers
        if not isinstance(state, (list, tuple)) or len(state) != L:
            raise ValueError(f"`state` must be a RecurrentState or a sequence of {L} per-layer tensors [B, H, Dk, Dv], "
                             f"got {type(state).__name__} of length {len(state) if hasattr(state, '__len__') else '?'}")
        for i, (S, hkv) in enumerate(zip(state, self.state_shapes())):
            want = (B, *hkv)
            if not isinstance(S, Tensor) or tuple(S.shape) != want:
                got = tuple(S.shape) if isinstance(S, Tensor) else type(S).__name__
                raise ValueError(f"`state[{i}]` must have shape [B, H, Dk, Dv] = {want}, got {got}")
            if S.dtype not in (torch.float32, torch.float64):
                raise TypeError(f"`state[{i}]` must be fp32 (or fp64), got {S.dtype}")
            if S.device != self.lm_head.weight.device:
                raise ValueError(f"`state[{i}]` is on {S.device}, the model on {self.lm_head.weight.device}")
        if isinstance(state, RecurrentState):
            if state.shared_offset is None and state.position.device != self.lm_head.weight.device:
                raise ValueError(f"`state.position` is on {state.position.device}, the model on "
                                 f"{self.lm_head.weight.device}")
            return state
        # a plain sequence has no position; the LRPE layers need it. All-zero states are the start
        # of a sequence (position 0); anything else would silently rotate q against the wrong frame.
        if (any(self.config.linear_use_lrpe_list) and all(_can_read(S) for S in state)
                and any(bool(S.any()) for S in state)):
            raise ValueError("`state` is a plain sequence of non-zero states, so its position is unknown (the LRPE "
                             "layers need it): pass the RecurrentState that prefill/step returned, or wrap the "
                             "tensors as RecurrentState(tensors, position=<tokens consumed, an int or [B]>)")
        return RecurrentState(state, 0)

    def _check_mask(self, mask, ids: Tensor) -> None:
        if mask is None:
            return
        if not isinstance(mask, Tensor):
            raise TypeError(f"`attention_mask` must be a torch.Tensor [B, T] (1 keep, 0 pad) or None, got "
                            f"{type(mask).__name__}")
        if tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"`attention_mask` must have input_ids' shape [B, T] = {tuple(ids.shape)}, got "
                             f"{tuple(mask.shape)}")

    # -- forward paths ------------------------------------------------------------------------
    # One private runner; the public paths below pick the attention form (parallel blocked for
    # forward/hidden_states/prefill, the one-token recurrence for step) and carry the position.
    def _embed(self, ids: Tensor) -> Tensor:
        return self.model.embed_tokens(ids) * self.model.embed_scale

    def head(self, hidden: Tensor) -> Tensor:
        """Logits from final-norm inputs (``hidden_states``' output): ``lm_head(final_norm(hidden))``."""
        return self.lm_head(self.head_norm(hidden))

    def head_norm(self, hidden: Tensor) -> Tensor:
        """The final norm of ``hidden_states``' output: the head's input (``head = lm_head(head_norm(.))``)."""
        return self.model.final_norm(hidden)

    def _run(self, x, states, offset, mask=None, step=False, inplace=False, kernel=None, cu_seqlens=None):
        new = []
        for i, layer in enumerate(self.model.layers):
            if cu_seqlens is None:
                x, S = layer(x, None if states is None else states[i], offset, mask, step, inplace, kernel)
            else:
                x, S = layer(x, None if states is None else states[i], offset, cu_seqlens=cu_seqlens)
            new.append(S)
        return x, new

    def _run_packed(self, ids: Tensor, cu_seqlens: Tensor, states=None, start=None):
        """ids [B, T] read as B*T packed tokens: (final-norm input [B, T, d], per-sequence states [N, ...]).
        ``start`` [N]: each sequence's first position (None: 0)."""
        B, T = ids.shape
        x = self._embed(ids).reshape(1, B * T, -1)
        pos = packed_positions(cu_seqlens, B * T, start)[None]                # [1, B*T]
        x, new = self._run(x, states, pos, cu_seqlens=cu_seqlens)
        return x.reshape(B, T, -1), new

    @staticmethod
    def _position(state: RecurrentState):
        """The LRPE offset of the state's next token: the shared int when known, else the [B] positions."""
        return state.shared_offset if state.shared_offset is not None else state.position

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                cu_seqlens: Tensor | None = None) -> Tensor:
        """Logits [B, T, V] of the parallel form. ``attention_mask`` [B, T] (1 keep, 0 pad) zeroes the
        contribution of padded tokens (left padding keeps later tokens exact: decay and LRPE are relative).

        ``cu_seqlens`` (integer [N + 1] on the ids' device): packed documents. ``input_ids`` is read row-major
        as one stream of B*T tokens cut into documents [c_i, c_{i+1}) (``check_packed``: every row start b*T is
        a boundary, so no document spans two rows); each document starts from the zero state at position 0
        and no token attends across a boundary: the logits equal the forward of each document alone."""
        self._check_ids(input_ids, "input_ids", 2)
        self._check_mask(attention_mask, input_ids)
        if cu_seqlens is not None:
            return self.head(self._packed_hidden(input_ids, attention_mask, cu_seqlens))
        x, _ = self._run(self._embed(input_ids), None, 0, attention_mask)
        return self.head(x)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      cu_seqlens: Tensor | None = None) -> Tensor:
        """Final-norm input [B, T, d] (for chunked losses that never materialize [B, T, V]; ``head`` maps
        it to logits); ``cu_seqlens`` as in ``forward``."""
        self._check_ids(input_ids, "input_ids", 2)
        self._check_mask(attention_mask, input_ids)
        if cu_seqlens is not None:
            return self._packed_hidden(input_ids, attention_mask, cu_seqlens)
        return self._run(self._embed(input_ids), None, 0, attention_mask)[0]

    def _packed_hidden(self, ids: Tensor, mask, cu_seqlens) -> Tensor:
        if mask is not None:
            raise ValueError("pass `attention_mask` or `cu_seqlens`, not both (packed documents need no padding)")
        return self._run_packed(ids, check_packed(cu_seqlens, ids))[0]

    def prefill(self, input_ids: Tensor, state: Sequence[Tensor] | None = None,
                attention_mask: Tensor | None = None, *, last_only: bool = False,
                cu_seqlens: Tensor | None = None) -> tuple[Tensor, RecurrentState]:
        """Blocked prefill: (logits [B, T, V], RecurrentState at position + T); continue from ``state`` if given
        (its rows may sit at different positions). ``last_only`` returns only the last position's logits
        [B, 1, V] (what decoding needs; skips the head on the other T - 1 positions).

        ``attention_mask`` (left padding) is exact from the zero state, where decay and LRPE are relative. A padded
        chunk continuing a non-zero ``state`` is refused: its pads would decay that state and shift the row's LRPE
        frame (prefill the new sequence alone and put it into its row with ``RecurrentState.load_rows``).

        ``cu_seqlens`` (integer [N + 1] on the ids' device): N prompts of unequal length packed end to end in
        ``input_ids`` [1, T], no padding (``forward`` explains the packing). The state then has one row per
        prompt, at that prompt's own position (as ``prefill`` of the prompt alone returns it); ``state``, if
        given, has N rows and continues each prompt from its row. ``last_only`` gives each prompt's
        last-position logits [N, 1, V] (NaN for an empty prompt), else the logits are [1, T, V]."""
        self._check_ids(input_ids, "input_ids", 2)
        self._check_mask(attention_mask, input_ids)
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError("pass `attention_mask` or `cu_seqlens`, not both (packed prompts need no padding)")
            return self._prefill_packed(input_ids, cu_seqlens, state, last_only)
        B, T = input_ids.shape
        state = None if state is None else self.validate_state(state, B)
        if (state is not None and attention_mask is not None and _can_read(attention_mask)
                and not bool(attention_mask.bool().all()) and any(bool(S.any()) for S in state)):
            raise ValueError("`attention_mask` pads a chunk that continues a non-zero `state`: padding is exact only "
                             "at the start of a sequence; prefill the padded prompts first, then continue unpadded")
        offset = 0 if state is None else self._position(state)
        x, new = self._run(self._embed(input_ids), state, offset, attention_mask)
        logits = self.head(x[:, -1:] if last_only else x)
        return logits, (RecurrentState(new, T) if state is None else state.advanced(new, T))

    def _prefill_packed(self, input_ids: Tensor, cu_seqlens: Tensor, state, last_only: bool):
        cu = check_packed(cu_seqlens, input_ids)
        N = cu.shape[0] - 1
        state = None if state is None else self.validate_state(state, N)
        start = None if state is None or state.shared_offset == 0 else state.position
        x, new = self._run_packed(input_ids, cu, state, start)
        lengths = (cu[1:] - cu[:-1]).to(torch.int64)
        if not last_only:
            logits = self.head(x)
        elif x.numel() == 0:
            logits = torch.full((N, 1, self.config.vocab_size), float("nan"), device=x.device,
                                dtype=self.lm_head.weight.dtype)
        else:
            last = x.reshape(-1, x.shape[-1])[(cu[1:] - 1).clamp(min=0).to(torch.int64)]     # [N, d]
            logits = self.head(last)[:, None]
            logits = torch.where(lengths[:, None, None] > 0, logits, torch.full((), float("nan"), dtype=logits.dtype,
                                                                               device=logits.device))
        position = lengths if state is None else state.position + lengths
        return logits, RecurrentState(new, position)

    def step(self, token_ids: Tensor, state: Sequence[Tensor] | None = None, *, inplace: bool = False,
             decode_kernel: bool | None = None) -> tuple[Tensor, RecurrentState]:
        """One recurrent step: token_ids [B] -> (logits [B, V], state at position + 1); constant time and memory.
        ``state=None`` starts from the zero state at position 0.

        ``inplace``: write each layer's new state into ``state``'s tensors (the returned state holds them; a
        decoder that owns its buffers moves the state once). ``decode_kernel``: None (each layer's
        ``decode_kernel``, auto by default: the fused kernel on CUDA), True or False for every layer."""
        self._check_ids(token_ids, "token_ids", 1)
        check_decode_kernel(decode_kernel)
        B = token_ids.shape[0]
        state = self.zero_state(B, token_ids.device) if state is None else self.validate_state(state, B)
        x, new = self._run(self._embed(token_ids)[:, None, :], state, self._position(state), step=True,
                           inplace=bool(inplace), kernel=decode_kernel)
        return self.head(x)[:, 0], state.advanced(new, 1)

    def zero_state(self, batch_size: int, device=None, dtype=None) -> RecurrentState:
        """All-zero per-layer states (the start of every sequence): fp32, fp64 for an fp64 model."""
        device = device if device is not None else self.lm_head.weight.device
        if dtype is None:
            dtype = torch.float64 if self.lm_head.weight.dtype == torch.float64 else torch.float32
        return RecurrentState([torch.zeros(batch_size, *hkv, device=device, dtype=dtype)
                               for hkv in self.state_shapes()], 0)

    def state_shapes(self) -> list[tuple[int, int, int]]:
        """Per-layer state shapes without the batch dim: (H, Dk, Dv); Dk = 2e on LRPE layers."""
        return [(l.token_mixer.num_heads, l.token_mixer.key_dim, l.token_mixer.head_dim) for l in self.model.layers]

    # -- compile / io ---------------------------------------------------------------------------
    def compile(self, *args, fullgraph: bool = True, dynamic: bool | None = True, **kwargs):
        """torch.compile the forward with ``fullgraph=True`` (no graph break) and dynamic shapes
        (no recompile per sequence length). Keeps the module type and its state_dict keys."""
        return super().compile(*args, fullgraph=fullgraph, dynamic=dynamic, **kwargs)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None) -> "TransNormerLLM":
        """Load a released Hugging Face-layout folder (config.json + safetensors/bin, sharded too), or a tnllm
        checkpoint folder. ``dtype`` None: float32; a dtype (or its name) casts; ``"auto"`` keeps the file's.
        Every key, shape and dtype is checked (``tnllm.hub``) before the model receives a tensor; returns it
        in eval mode."""
        from .hub import read_pretrained

        def skeleton(cfg):
            with torch.device("meta"):          # no memory, no init cost; dropped on any error
                return cls(cfg)

        device = torch.device(device) if device is not None else torch.device("cpu")
        cfg, sd, model = read_pretrained(path, skeleton, dtype=dtype, device=device)
        model.load_state_dict(sd, strict=True, assign=True)
        if cfg.tie_word_embeddings:             # assign=True replaced both Parameters: tie them again
            model.lm_head.weight = model.model.embed_tokens.weight
        for i, layer in enumerate(model.model.layers):   # the decay is a fixed, non-persistent buffer
            layer.token_mixer.s = decay_rates(cfg, i).to(device)
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        assert not left, f"left on the meta device after loading: {left}"
        return model.eval()

    def save_pretrained(self, path) -> None:
        """Write the released layout back (config.json + model.safetensors)."""
        from .hub import save_pretrained
        save_pretrained(self, path)


def check_packed(cu_seqlens, ids: Tensor) -> Tensor:
    """``cu_seqlens`` for packed ``ids`` [B, T] (read row-major as B*T tokens), checked: a 1-D integer tensor
    [N + 1] on the ids' device, 0 first, non-decreasing, B*T last, and every row start b*T among the
    boundaries (no document spans two rows). ValueError in eager mode on the CPU; on CUDA and under
    torch.compile a device-side assertion (no host sync). Returns it as int32 or int64."""
    B, T = ids.shape
    cu = check_cu_seqlens(cu_seqlens, ids.device, "input_ids")
    check_boundary_values(cu, B * T)
    if B > 1 and cu.device.type != "meta":
        # cu is sorted (checked above), so row start r is a boundary iff cu[searchsorted(cu, r)] == r (a
        # searchsorted, not isin, whose sorting path reads a size back to the host on CUDA)
        starts = torch.arange(0, B * T, T, device=cu.device, dtype=cu.dtype)
        at = torch.searchsorted(cu, starts).clamp(max=cu.shape[0] - 1)
        found = cu[at] == starts
        if cu.device.type == "cpu" and _can_read(cu):
            if not bool(found.all()):
                raise ValueError(f"`cu_seqlens` must hold every row start b*T of input_ids [B, T] = {(B, T)} (a document "
                                 f"may not span two rows), missing {starts[~found].tolist()}")
        else:
            torch._assert_async(found.all(), "`cu_seqlens` must hold every row start b*T of input_ids")
    return cu


def packed_positions(cu_seqlens: Tensor, total: int, start: Tensor | None = None) -> Tensor:
    """int64 [total]: each packed token's position inside its sequence [c_i, c_{i+1}), plus ``start[i]`` (an
    int tensor [N], the sequence's first position) when given; computed on the device (no host read)."""
    cu = cu_seqlens.to(torch.int64)
    idx = torch.arange(total, device=cu.device, dtype=torch.int64)
    seq = torch.searchsorted(cu[1:].contiguous(), idx, right=True)        # the sequence each token belongs to
    pos = idx - cu[seq]
    return pos if start is None else pos + start.to(torch.int64)[seq]


def check_token_ids(ids, name: str, ndim: int, vocab_size: int) -> None:
    """Token ids must be an integer tensor of ``ndim`` dims ([B, T] or [B]) in [0, vocab_size).

    The range check reads the ids (eager only); out-of-range ids would otherwise hit a device-side
    assert in the embedding on CUDA."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"`{name}` must be an integer tensor of token ids, got {ids.dtype}")
    if ids.dim() != ndim:
        want = "[B, T]" if ndim == 2 else "[B]"
        raise ValueError(f"`{name}` must have shape {want}, got {tuple(ids.shape)}")
    if ids.numel() and _can_read(ids):
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"`{name}` has token ids outside [0, vocab_size={vocab_size}): min {lo}, max {hi}")
