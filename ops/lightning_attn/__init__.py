"""Lightning Attention: o_t = sum_{s<=t} lam^(t-s) (q_t . k_s) v_s, lam = exp(-s_h) per head.

Forms side by side (one signature: ``(q, k, v, s, initial_state=None, output_final_state=False)``):
``naive`` (quadratic oracle), ``recurrent`` (token loop), ``blocked`` (Lightning Attention-2 in
PyTorch) and ``op`` (the ``tnllm::lightning_attn_*`` custom ops: blocked on CPU, Triton on CUDA), and ``varlen``
(packed variable-length sequences: the ``tnllm::lightning_attn_varlen_*`` custom ops, ``cu_seqlens`` after ``s``).
"""
from .blocked import DEFAULT_BLOCK, lightning_attn_blocked
from .naive import lightning_attn_naive
from .op import lightning_attn
from .recurrent import lightning_attn_recurrent, lightning_attn_step
from .varlen import lightning_attn_varlen

__all__ = ["lightning_attn", "lightning_attn_naive", "lightning_attn_recurrent", "lightning_attn_blocked",
           "lightning_attn_step", "lightning_attn_varlen", "DEFAULT_BLOCK"]
