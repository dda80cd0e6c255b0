"""tnllm.ops: Lightning Attention in its forms, the norms, and the fused linear + cross entropy loss."""
from .lightning_attn import (lightning_attn, lightning_attn_blocked, lightning_attn_naive, lightning_attn_recurrent,
                             lightning_attn_step, lightning_attn_varlen)
from .fused_linear_ce import fused_linear_cross_entropy, fused_linear_cross_entropy_naive
from .norm import srms_norm

__all__ = ["lightning_attn", "lightning_attn_naive", "lightning_attn_recurrent", "lightning_attn_blocked",
           "lightning_attn_step", "lightning_attn_varlen", "srms_norm", "fused_linear_cross_entropy",
           "fused_linear_cross_entropy_naive"]
