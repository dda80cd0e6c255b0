"""TransNormerLLM v1 as released: GLA token mixer with LRPE-d and a fixed decay, SGLU, SRMSNorm.

Legend: B batch, T length, d model width, H heads, e head dim, L layers, S per-layer state [B, H, Dk, Dv].
Module attribute names equal the released checkpoint keys (``model.layers.{i}.token_mixer.qkvu_proj``...),
so released weights load without renaming (see ``tnllm.hub``).

The layer math exists once (``NormLinearAttention._mix``); ``forward``/``prefill`` pass it the
Lightning Attention custom op and ``step`` passes the one-token recurrent update.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tnllm.ops import lightning_attn, lightning_attn_step, srms_norm
from tnllm.ops.lightning_attn._common import _is_fake
from tnllm.ops.norm_triton import srms_norm_gate

from .config import TransNormerConfig, alibi_slopes

_ACT = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "none": lambda x: x}


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
    """Per-layer states [B, H, Dk, Dv] (fp32), plus ``offset``: the number of positions consumed.

    A list, so ``state[i]`` is layer i's tensor; the offset places the LRPE angles of the next token.
    """

    def __init__(self, tensors: Sequence[Tensor] = (), offset: int = 0):
        super().__init__(tensors)
        self.offset = int(offset)

    def __repr__(self) -> str:
        return f"RecurrentState(layers={len(self)}, offset={self.offset}, shape={tuple(self[0].shape) if self else None})"


class Lrpe(nn.Module):
    """LRPE-d: x -> [x cos(theta t), x sin(theta t)], doubling the head dim (positions in fp32)."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        n = num_heads * head_dim
        self.theta = nn.Parameter((10000 ** (-2 / n * torch.arange(n, dtype=torch.float32))).reshape(num_heads, 1, head_dim))

    def local_theta(self) -> Tensor:
        """theta of the heads this process computes (tensor parallel overrides it: tnllm.train.parallelize)."""
        return self.theta

    def forward(self, x: Tensor, offset) -> Tensor:
        """x [B, H, T, e]; ``offset``: the first position, an int or 0-d tensor, or an int tensor [B] of
        per-row positions (the exported step and static decode buffers pass tensors)."""
        theta = self.local_theta()
        T = x.shape[-2]
        dt = torch.promote_types(x.dtype, torch.float32)                # fp32 positions (fp64 for fp64)
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

    # SRMSNorm of the attention output over the full width; tensor parallel (tnllm.train.parallelize)
    # sets a per-instance cross-rank version, because there each rank holds only its heads' slice.
    o_norm = staticmethod(srms_norm)

    def __init__(self, cfg: TransNormerConfig, layer_idx: int):
        super().__init__()
        d, h = cfg.decoder_embed_dim, cfg.hidden_dim
        self.num_heads, self.head_dim = cfg.decoder_attention_heads, cfg.head_dim
        self.qkvu_proj = nn.Linear(d, 4 * h, bias=cfg.bias)
        self.out_proj = nn.Linear(h, d, bias=cfg.bias)
        self.act = _ACT[cfg.linear_act_fun]
        self.lrpe = Lrpe(self.num_heads, self.head_dim) if cfg.lrpe(layer_idx) else None
        self.block_size = cfg.block_size
        if cfg.norm_type == "rmsnorm":          # a weighted norm replaces the class-level SRMSNorm
            self.norm = RMSNorm(h)
            self.o_norm = self.norm.forward
        # fixed decay: no gradient, not in the state dict
        self.register_buffer("s", decay_rates(cfg, layer_idx), persistent=False)

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

    def _mix(self, x: Tensor, S: Tensor | None, offset, attend: Callable, mask: Tensor | None = None):
        """The layer math, once. ``attend(q, k, v, s, S) -> (o, S)``; ``mask`` [B, T] zeroes padded tokens' k, v."""
        q, k, v, u = self._heads(x, offset)
        if mask is not None:
            m = mask[:, None, :, None].to(v.dtype)
            k, v = k * m, v * m
        o, S = attend(q, k, v, self.s, S)
        # fused Triton norm * u on CUDA (reads o in [B, H, T, e]); a decode step (T = 1) keeps the plain
        # expression, which inductor fuses with its neighbours instead of launching one more kernel
        if o.is_cuda and o.shape[2] > 1 and self.o_norm is srms_norm:
            return self.out_proj(srms_norm_gate(o, u)), S
        B, T, _ = x.shape
        o = o.transpose(1, 2).reshape(B, T, o.shape[1] * o.shape[3])    # explicit width: T = 0 or B = 0 is valid
        return self.out_proj(self.o_norm(o) * u), S

    def _parallel(self, q, k, v, s, S):
        return lightning_attn(q, k, v, s, initial_state=S, output_final_state=True, block_size=self.block_size,
                              check_decay=False)   # s is the fixed buffer; the check would sync on CUDA

    def forward(self, x: Tensor, S: Tensor | None = None, offset=0, mask: Tensor | None = None):
        return self._mix(x, S, offset, self._parallel, mask)

    def step(self, x: Tensor, S: Tensor, offset):
        return self._mix(x, S, offset, lightning_attn_step)


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

    def forward(self, x: Tensor, S: Tensor | None = None, offset=0, mask: Tensor | None = None, step: bool = False):
        tm, h = self.token_mixer, self.token_norm(x)
        a, S = tm.step(h, S, offset) if step else tm(h, S, offset, mask)
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
    """TransNormerLLM for causal LM.

    * ``model(ids)`` -> logits [B, T, V] (parallel blocked form, no state).
    * ``model.prefill(ids, state=None)`` -> (logits [B, T, V], RecurrentState).
    * ``model.step(ids [B], state)`` -> (logits [B, V], RecurrentState): the recurrent form.
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

    def _check_state(self, state, B: int) -> RecurrentState:
        L = self.config.decoder_layers
        if not isinstance(state, (list, tuple)) or len(state) != L:
            raise ValueError(f"`state` must be a sequence of {L} per-layer tensors [B, H, Dk, Dv], got "
                             f"{type(state).__name__} of length {len(state) if hasattr(state, '__len__') else '?'}")
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
            return state
        # a plain sequence has no position; the LRPE layers need it. All-zero states are the start
        # of a sequence (position 0); anything else would silently rotate q against the wrong frame.
        if (any(self.config.linear_use_lrpe_list) and not torch.compiler.is_compiling()
                and not any(_is_fake(S) for S in state) and any(bool(S.any()) for S in state)):
            raise ValueError("`state` is a plain sequence of non-zero states, so its position is unknown (the LRPE "
                             "layers need it): pass the RecurrentState that prefill/step returned, or wrap the "
                             "tensors as RecurrentState(tensors, offset=<positions consumed>)")
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
    def _embed(self, ids: Tensor) -> Tensor:
        return self.model.embed_tokens(ids) * self.model.embed_scale

    def _head(self, x: Tensor) -> Tensor:
        return self.lm_head(self.model.final_norm(x))

    def _run(self, x, states, offset, mask=None, step=False):
        new = []
        for i, layer in enumerate(self.model.layers):
            x, S = layer(x, None if states is None else states[i], offset, mask, step)
            new.append(S)
        return x, new

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits [B, T, V] of the parallel form. ``attention_mask`` [B, T] (1 keep, 0 pad) zeroes the
        contribution of padded tokens (left padding keeps later tokens exact: decay and LRPE are relative)."""
        self._check_ids(input_ids, "input_ids", 2)
        self._check_mask(attention_mask, input_ids)
        x, _ = self._run(self._embed(input_ids), None, 0, attention_mask)
        return self._head(x)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Final-norm input [B, T, d] (for chunked losses that never materialize [B, T, V])."""
        self._check_ids(input_ids, "input_ids", 2)
        self._check_mask(attention_mask, input_ids)
        return self._run(self._embed(input_ids), None, 0, attention_mask)[0]

    def prefill(self, input_ids: Tensor, state: Sequence[Tensor] | None = None,
                attention_mask: Tensor | None = None) -> tuple[Tensor, RecurrentState]:
        """Blocked prefill: (logits [B, T, V], RecurrentState); continue from ``state`` if given.

        ``attention_mask`` (left padding) is exact from the zero state, where decay and LRPE are relative. A padded
        chunk continuing a non-zero ``state`` is refused: its pads would decay that state and shift the row's LRPE
        frame (``OnnxRecurrentDecoder.prefill``, with per-row positions, handles that case by stepping)."""
        self._check_ids(input_ids, "input_ids", 2)
        self._check_mask(attention_mask, input_ids)
        B, T = input_ids.shape
        state = None if state is None else self._check_state(state, B)
        if (state is not None and attention_mask is not None and not torch.compiler.is_compiling()
                and not bool(attention_mask.bool().all()) and any(bool(S.any()) for S in state)):
            raise ValueError("`attention_mask` pads a chunk that continues a non-zero `state`: padding is exact only "
                             "at the start of a sequence; prefill the padded prompts first, then continue unpadded")
        offset = 0 if state is None else state.offset
        x, new = self._run(self._embed(input_ids), state, offset, attention_mask)
        return self._head(x), RecurrentState(new, offset + T)

    def step(self, token_ids: Tensor, state: Sequence[Tensor] | None = None) -> tuple[Tensor, RecurrentState]:
        """One recurrent step: token_ids [B] -> (logits [B, V], new state); constant time and memory."""
        self._check_ids(token_ids, "token_ids", 1)
        B = token_ids.shape[0]
        state = self.zero_state(B, token_ids.device) if state is None else self._check_state(state, B)
        x, new = self._run(self._embed(token_ids)[:, None, :], state, state.offset, step=True)
        return self._head(x)[:, 0], RecurrentState(new, state.offset + 1)

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
        """Load a released Hugging Face-layout folder (config.json + safetensors/bin, sharded too)."""
        from .hub import load_pretrained
        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path) -> None:
        """Write the released layout back (config.json + model.safetensors)."""
        from .hub import save_pretrained
        save_pretrained(self, path)


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
    if not torch.compiler.is_compiling() and ids.numel() and not _is_fake(ids):
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"`{name}` has token ids outside [0, vocab_size={vocab_size}): min {lo}, max {hi}")
