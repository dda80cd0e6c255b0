"""Fused linear + cross entropy: the mean (or summed) next-token loss of ``x @ weight.T`` without the
[N, V] logits ever existing.

Forms side by side: ``naive`` (the reference: ``F.cross_entropy(x @ weight.T)``, the whole logits tensor)
and ``op`` (the ``tnllm::fused_linear_cross_entropy`` custom op: rows in chunks, the softmax gradient
of each chunk's logits by one Triton kernel on CUDA (``triton``), the gradients of x and weight computed in
the forward; ``fused_linear_cross_entropy`` is the public
entry point).
"""
from .naive import fused_linear_cross_entropy_naive
from .op import fused_linear_cross_entropy

__all__ = ["fused_linear_cross_entropy", "fused_linear_cross_entropy_naive"]
