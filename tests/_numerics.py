"""Numerics helpers shared by the tests: relative-RMS comparison with per-dtype tolerances."""
import torch

# relative RMS error allowed against an fp64 oracle
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rel_rms(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    assert a.shape == ref.shape, (a.shape, ref.shape)
    assert torch.isfinite(a).all(), "non-finite values"
    num = (a - ref).pow(2).mean().sqrt()
    den = ref.pow(2).mean().sqrt().clamp_min(1e-30)
    return float(num / den) if float(den) > 1e-30 else float(num)


def assert_close(a, ref, dtype, what="", scale=1.0):
    err = rel_rms(a, ref)
    tol = TOL[dtype] * scale
    assert err <= tol, f"{what}: relative RMS error {err:.3e} > {tol:.1e} ({dtype})"


class poisoned:
    """Inside the block, torch.empty returns NaN-filled tensors (floats), so outputs a kernel fails to
    write show up as NaN (the launchers allocate their outputs with torch.empty)."""

    def __enter__(self):
        self._empty = torch.empty

        def empty(*a, **kw):
            t = self._empty(*a, **kw)
            if t.is_floating_point():
                t.fill_(float("nan"))
            return t
        torch.empty = empty
        return self

    def __exit__(self, *exc):
        torch.empty = self._empty
