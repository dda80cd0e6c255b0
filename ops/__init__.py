"""tnllm.ops: Lightning Attention in its forms, and the norms."""
from .lightning_attn import (lightning_attn, lightning_attn_blocked, lightning_attn_naive, lightning_attn_recurrent,
                             lightning_attn_step, lightning_attn_varlen)
from .norm import srms_norm

__all__ = ["lightning_attn", "lightning_attn_naive", "lightning_attn_recurrent", "lightning_attn_blocked",
           "lightning_attn_step", "lightning_attn_varlen", "srms_norm"]
