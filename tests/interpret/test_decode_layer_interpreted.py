"""The one-launch decoder layer (tnllm.ops.decode_layer) on CPU under TRITON_INTERPRET=1: its five stages as
five launches (the interpreter runs programs one after another, so the persistent launch's grid barriers
cannot run here; the GPU suite runs it and checks it equals the staged launches bit for bit), against the
fp32 reference from the same inputs: fp32 and fp16, LRPE on and off, every activation, widths that are not
multiples of the tiles, 1 to 4 rows, program counts that cut the rows unevenly, the weight tiles loaded ahead
of the barriers and at their stage, NaN-poisoned workspaces; a layer too wide for the kernel refused by name;
the op's dispatch (the decoder's "layer" path: test_decode_stack_interpreted.py)."""
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/ops/test_triton.py (a child process)"
pytest.importorskip("triton")

from tnllm.ops.decode_layer import decode_layer_naive, decode_layer_step  # noqa: E402
from tnllm.ops.decode_layer import op as layer_op  # noqa: E402
from tnllm.ops.decode_layer import triton as tri  # noqa: E402
from tnllm.testing import TOL, rel_err  # noqa: E402
from tnllm.testing import poisoned_allocations as poisoned  # noqa: E402


def make(B, d, H, e, g, lrpe, seed, state_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    h = H * e

    def w(n, k):
        return torch.randn(n, k, generator=gen) * k ** -0.5

    x = torch.randn(B, d, generator=gen) * 2
    S = torch.randn(B, H, 2 * e if lrpe else e, e, generator=gen) * state_scale
    ws = (w(4 * h, d), w(d, h), w(g, d), w(g, d), w(d, g))
    s = torch.rand(H, generator=gen) * 2
    theta = (10000 ** (-2 / h * torch.arange(h, dtype=torch.float32))).reshape(H, 1, e) if lrpe else None
    pos = torch.randint(0, 200000, (B,), generator=gen) if lrpe else None
    return x, S, ws, s, theta, pos


@given(B=st.integers(1, tri.MAX_ROWS), d=st.sampled_from([8, 33, 64]), H=st.integers(1, 3),
       e=st.sampled_from([4, 5, 16]), g=st.sampled_from([7, 40]), lrpe=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), act=st.sampled_from(["silu", "relu", "none"]),
       glu_act=st.sampled_from(["none", "silu", "relu"]),
       cfg=st.sampled_from([tri.LayerConfig(nprog=6), tri.LayerConfig(nprog=8), tri.LayerConfig(nprog=13),
                            tri.LayerConfig(nprog=7, prefetch=False), tri.LayerConfig(nprog=24, num_warps=2, spin=1)]),
       seed=st.integers(0, 2**31 - 1))
def test_staged_kernel_matches_reference(B, d, H, e, g, lrpe, dtype, act, glu_act, cfg, seed):
    x, S, ws, s, theta, pos = make(B, d, H, e, g, lrpe, seed)
    xk = x.to(dtype)
    wk = tuple(w.to(dtype) for w in ws)
    x_ref, S_ref = decode_layer_naive(xk.float(), S, *(w.float() for w in wk), s, theta, pos, act, glu_act)
    Sk = S.clone()
    with poisoned():
        tri.decode_layer_triton(xk, Sk, *wk, s, theta, pos, act, glu_act, persistent=False, cfg=cfg)
    for what, got, ref in (("x", xk, x_ref), ("state", Sk, S_ref)):
        err = rel_err(got, ref)
        assert err <= TOL[dtype], f"{what}: relative error {err:.3e} > {TOL[dtype]:.0e} ({dtype}, {cfg})"


def test_a_layer_too_wide_is_refused():
    """Two programs cannot hold a 4h = 192-row qkvu block in one tile of at most 32 rows: a clear error, and
    ``supported`` says no (the op then takes the reference form)."""
    x, S, ws, s, theta, pos = make(1, 64, 3, 16, 40, False, 0)
    assert not tri.supported(x, S, *ws, nprog=2) and tri.supported(x, S, *ws, nprog=8)
    with pytest.raises(ValueError, match="does not fit the kernel on 2 programs"):
        tri.decode_layer_triton(x, S, *ws, s, theta, pos, "silu", "none", persistent=False,
                                cfg=tri.LayerConfig(nprog=2))


def test_persistent_needs_cuda():
    x, S, ws, s, theta, pos = make(1, 8, 1, 4, 7, False, 0)
    with pytest.raises(ValueError, match="persistent=True"):
        tri.decode_layer_triton(x, S, *ws, s, theta, pos, "silu", "none", persistent=True)


def test_op_dispatch_by_rows(monkeypatch):
    """Up to MAX_ROWS rows the op launches the kernel; above it, the reference form: both equal the reference."""
    calls = []
    real = tri.decode_layer_triton
    monkeypatch.setattr(tri, "decode_layer_triton", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    layer_op.use_triton_on_cpu(True)
    try:
        for B in (1, tri.MAX_ROWS, tri.MAX_ROWS + 1):
            x, S, ws, s, theta, pos = make(B, 16, 2, 4, 12, True, B)
            x_ref, S_ref = decode_layer_naive(x, S, *ws, s, theta, pos, "silu", "none")
            out = decode_layer_step(x, S, *ws, s, theta, pos, "silu", "none")
            assert out is x
            assert rel_err(x, x_ref) <= TOL[torch.float32] and rel_err(S, S_ref) <= TOL[torch.float32]
    finally:
        layer_op.use_triton_on_cpu(False)
    assert calls == [1, tri.MAX_ROWS]
