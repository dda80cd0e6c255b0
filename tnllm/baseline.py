"""A Llama-style Transformer baseline with the TransNormerLLM interface (``forward``/``hidden_states``/
``prefill``/``step``), so the same trainer, data, tokenizer and ``generate()`` drive both.

Legend: B batch, T length, d width, H heads, e head dim, L layers, g SwiGLU width.
Blocks: ``x = x + attn(rms(x)); x = x + mlp(rms(x))``; RMSNorm with a learned weight, RoPE on q and k,
SDPA causal attention, SwiGLU ``w2(silu(w1 x) * w3 x)``, a final RMSNorm and a head tied to the embedding.
The shape comes from a ``TransNormerConfig`` (d, L, H, g, V); ``matched_config`` widens g so the parameter
count equals the TransNormerLLM of the same config (TNL's token mixer has 5 d^2 weights, this one 4 d^2).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import TransNormerConfig
from .model import check_packed, check_token_ids, packed_positions


def transformer_num_params(cfg: TransNormerConfig) -> int:
    """Parameter count of ``TransformerLM(cfg)`` (tied head), from the shapes alone."""
    d, g, h, L = cfg.decoder_embed_dim, cfg.glu_dim, cfg.hidden_dim, cfg.decoder_layers
    per_layer = 4 * h * d + 3 * d * g + 2 * d + ((3 * h + d + 2 * g + d) if cfg.bias else 0)
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
    return cfg.vocab_size * d + L * per_layer + d + head


def matched_config(cfg: TransNormerConfig) -> TransNormerConfig:
    """The config whose Transformer has the TNL's parameter count: the SwiGLU width g grows by about d / 3 (TNL's
    token mixer has one d^2 more per layer), to the multiple of 8 nearest an exact match (norm weights and LRPE's
    theta counted), or to the nearest integer width when a multiple of 8 misses by more than 0.5%.
    Marks ``extra["arch"] = "transformer"``."""
    target = cfg.num_params()
    d, L = cfg.decoder_embed_dim, cfg.decoder_layers
    per_g = L * (3 * d + (2 if cfg.bias else 0))           # parameters per unit of g
    exact = cfg.glu_dim + (target - transformer_num_params(cfg)) / per_g
    g = max(8, int(round(exact / 8)) * 8)
    if abs(transformer_num_params(replace(cfg, glu_dim=g)) - target) > 0.005 * target:
        g = max(1, int(round(exact)))
    extra = dict(cfg.extra, arch="transformer", rope_theta=cfg.extra.get("rope_theta", 10000.0))
    return replace(cfg, glu_dim=g, extra=extra)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_tables(e: int, positions: Tensor, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin [..., e/2] in fp32 for the rotate-half form of RoPE (positions [T] -> [T, e/2], [B, T] -> [B, T, e/2])."""
    inv = theta ** (-torch.arange(0, e, 2, device=positions.device, dtype=torch.float32) / e)
    ang = positions.float()[..., None] * inv
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, e]; rotate pairs (x1, x2) = halves of the head dim."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class KVCache(list):
    """Per-layer (k, v) [B, H, T, e] plus ``key_mask`` [B, T] (bool, False for padding) and ``offset``."""

    def __init__(self, layers=(), key_mask: Tensor | None = None, offset: int = 0):
        super().__init__(layers)
        self.key_mask, self.offset = key_mask, int(offset)


class Attention(nn.Module):
    def __init__(self, cfg: TransNormerConfig):
        super().__init__()
        d, h = cfg.decoder_embed_dim, cfg.hidden_dim
        self.H, self.e = cfg.decoder_attention_heads, cfg.head_dim
        if self.e % 2:
            raise ValueError(f"RoPE needs an even head dim, got hidden_dim/heads = {self.e}")
        self.q_proj = nn.Linear(d, h, bias=cfg.bias)
        self.k_proj = nn.Linear(d, h, bias=cfg.bias)
        self.v_proj = nn.Linear(d, h, bias=cfg.bias)
        self.o_proj = nn.Linear(h, d, bias=cfg.bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, past: tuple[Tensor, Tensor] | None,
                bias: Tensor | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.H, self.e).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        if bias is None:       # no padding, no cache: the fused causal path
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: TransNormerConfig):
        super().__init__()
        d, g = cfg.decoder_embed_dim, cfg.glu_dim
        self.w1 = nn.Linear(d, g, bias=cfg.bias)
        self.w3 = nn.Linear(d, g, bias=cfg.bias)
        self.w2 = nn.Linear(g, d, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: TransNormerConfig):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.decoder_embed_dim), Attention(cfg)
        self.mlp_norm, self.mlp = RMSNorm(cfg.decoder_embed_dim), MLP(cfg)

    def forward(self, x, cos, sin, past, bias):
        a, kv = self.attn(self.attn_norm(x), cos, sin, past, bias)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), kv


class _Stack(nn.Module):
    def __init__(self, cfg: TransNormerConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.decoder_embed_dim, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.decoder_layers))
        self.norm = RMSNorm(cfg.decoder_embed_dim)


class TransformerLM(nn.Module):
    """Llama-style causal LM. Same calls as ``TransNormerLLM``; ``prefill``/``step`` carry a ``KVCache``."""

    arch = "transformer"

    def __init__(self, cfg: TransNormerConfig):
        super().__init__()
        if not isinstance(cfg, TransNormerConfig):
            raise TypeError(f"TransformerLM expects a TransNormerConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.rope_theta = float(cfg.extra.get("rope_theta", 10000.0))
        self.model = _Stack(cfg)
        self.lm_head = nn.Linear(cfg.decoder_embed_dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    def init_weights(self) -> None:
        """normal(0, init_std) for Linear and Embedding weights, zero biases, norm weights 1, padding row 0."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, self.config.init_std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        with torch.no_grad():
            self.model.embed_tokens.weight[self.config.pad_token_id].zero_()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_ids(self, ids, name: str, ndim: int) -> None:
        check_token_ids(ids, name, ndim, self.config.vocab_size)

    def _decode_packed(self, ids: Tensor, cu_seqlens: Tensor, attention_mask: Tensor | None) -> Tensor:
        """ids [B, T] read as B*T packed documents (``TransNormerLLM.forward`` explains ``cu_seqlens``) -> the
        final-norm input [B, T, d]: RoPE positions restart at each document, attention stays inside it (every
        row start is a boundary, so a row's mask [T, T] is block-diagonal and causal)."""
        if attention_mask is not None:
            raise ValueError("pass `attention_mask` or `cu_seqlens`, not both (packed documents need no padding)")
        B, T = ids.shape
        cu = check_packed(cu_seqlens, ids).to(torch.int64)
        idx = torch.arange(B * T, device=ids.device)
        doc = torch.searchsorted(cu[1:].contiguous(), idx, right=True).reshape(B, T)
        cos, sin = rope_tables(self.config.head_dim, packed_positions(cu, B * T).reshape(B, T), self.rope_theta)
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        bias = ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]      # [B, 1, T, T]
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x, _ = layer(x, cos[:, None], sin[:, None], None, bias)
        return x

    def _decode(self, ids: Tensor, cache: KVCache | None, attention_mask: Tensor | None) -> tuple[Tensor, KVCache]:
        """ids [B, T] (continuing ``cache``) -> (final-norm input [B, T, d], the cache T longer)."""
        B, T = ids.shape
        t0 = 0 if cache is None else cache.offset
        e = self.config.head_dim
        cos, sin = rope_tables(e, torch.arange(t0, t0 + T, device=ids.device), self.rope_theta)
        key_mask = None
        if attention_mask is not None or (cache is not None and cache.key_mask is not None):
            new = (torch.ones(B, T, dtype=torch.bool, device=ids.device) if attention_mask is None
                   else attention_mask.to(torch.bool))
            old = None if cache is None else cache.key_mask
            key_mask = new if old is None else torch.cat([old, new], dim=1)
        bias = None
        if key_mask is not None or t0 > 0:
            Tk = t0 + T
            causal = torch.ones(T, Tk, dtype=torch.bool, device=ids.device).tril(diagonal=t0)
            allowed = causal[None]                                   # [1, T, Tk]
            if key_mask is not None:
                # a padded query would see no key at all (NaN softmax): let it see itself; no real token reads it
                diag = torch.eye(T, Tk - t0, dtype=torch.bool, device=ids.device)
                diag = torch.cat([torch.zeros(T, t0, dtype=torch.bool, device=ids.device), diag], dim=1)
                allowed = (allowed & key_mask[:, None, :]) | diag[None]
            bias = allowed[:, None]                                  # [B or 1, 1, T, Tk]
        x = self.model.embed_tokens(ids)
        kvs = []
        for i, layer in enumerate(self.model.layers):
            x, kv = layer(x, cos, sin, None if cache is None else cache[i], bias)
            kvs.append(kv)
        return x, KVCache(kvs, key_mask, t0 + T)

    def head(self, hidden: Tensor) -> Tensor:
        """Logits from final-norm inputs (``hidden_states``' output): ``lm_head(norm(hidden))``."""
        return self.lm_head(self.head_norm(hidden))

    def head_norm(self, hidden: Tensor) -> Tensor:
        """The final norm of ``hidden_states``' output: the head's input (``head = lm_head(head_norm(.))``)."""
        return self.model.norm(hidden)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                cu_seqlens: Tensor | None = None) -> Tensor:
        """Logits [B, T, V]; ``cu_seqlens``: packed documents, as in ``TransNormerLLM.forward``."""
        return self.head(self.hidden_states(input_ids, attention_mask, cu_seqlens))

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      cu_seqlens: Tensor | None = None) -> Tensor:
        """Final-norm input [B, T, d] (``head`` applies the norm and the tied head)."""
        self._check_ids(input_ids, "input_ids", 2)
        if cu_seqlens is not None:
            return self._decode_packed(input_ids, cu_seqlens, attention_mask)
        return self._decode(input_ids, None, attention_mask)[0]

    def prefill(self, input_ids: Tensor, state: KVCache | None = None,
                attention_mask: Tensor | None = None, *, last_only: bool = False) -> tuple[Tensor, KVCache]:
        """(logits [B, T, V], or [B, 1, V] with ``last_only``; the KV cache), continuing ``state`` if given."""
        self._check_ids(input_ids, "input_ids", 2)
        x, cache = self._decode(input_ids, state, attention_mask)
        return self.head(x[:, -1:] if last_only else x), cache

    def step(self, token_ids: Tensor, state: KVCache | None = None) -> tuple[Tensor, KVCache]:
        """One token per row: token_ids [B] -> (logits [B, V], cache one longer). The cache grows with T."""
        self._check_ids(token_ids, "token_ids", 1)
        x, cache = self._decode(token_ids[:, None], state, None)
        return self.head(x)[:, 0], cache

    def compile(self, *args, fullgraph: bool = True, dynamic: bool | None = True, **kwargs):
        return super().compile(*args, fullgraph=fullgraph, dynamic=dynamic, **kwargs)
