"""Triton device functions shared by the row-wise kernels (the fused decode step, the SGLU gate). Imported
only where those kernels are built, so triton is imported lazily with them."""
import triton
import triton.language as tl


@triton.jit
def row_rms_rsqrt(X, eps, D: tl.constexpr, BD: tl.constexpr):
    """rsqrt(mean(x^2) + eps) of the D elements at X, summed in fp32, BD at a time: the per-row scale of a
    weightless SRMSNorm folded into a following kernel."""
    dd = tl.arange(0, BD)
    acc = tl.zeros([BD], dtype=tl.float32)
    for d0 in range(0, D, BD):
        xx = tl.load(X + d0 + dd, mask=d0 + dd < D, other=0.0).to(tl.float32)
        acc += xx * xx
    return tl.rsqrt(tl.sum(acc, 0) / D + eps)
