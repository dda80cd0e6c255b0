"""The public ``lightning_attn`` in plain eager mode runs an autograd.Function instead of going through the
dispatcher (``EAGER_FAST_PATH`` in ops/lightning_attn/op.py). It must be the op in all but speed: the same
outputs and gradients to the bit, the same None-gradient and double-backward behaviour, and it must step aside
whenever a mode, tracer or tensor subclass is watching, so that they see ``tnllm::lightning_attn_fwd``."""
import sys

import pytest
import torch
import tnllm.testing as tt
from hypothesis import given, settings
from hypothesis import strategies as st
from tnllm.ops import lightning_attn

OP = sys.modules["tnllm.ops.lightning_attn.op"]


def _run(case: tt.Case, fast: bool, use: str):
    """o, S and the gradients of (q, k, v, S0) of one call, by the fast path or the op."""
    q, k, v, s, S0, do, dS = tt.make_inputs(case)
    old = OP.EAGER_FAST_PATH
    OP.EAGER_FAST_PATH = fast
    try:
        o, S = lightning_attn(q, k, v, s, initial_state=S0, output_final_state=True)
    finally:
        OP.EAGER_FAST_PATH = old
    loss = {"o": (o.float() * do.float()).sum(), "S": (S * dS.float()).sum(),
            "both": (o.float() * do.float()).sum() + (S * dS.float()).sum()}[use]
    leaves = [x for x in (q, k, v, S0) if x is not None]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [o, S, *grads]


@settings(max_examples=25)
@given(case=tt.cases(max_B=2, max_H=3, max_T=80, dims=(1, 4, 8, 16),
                     dtypes=(torch.float32, torch.float64, torch.bfloat16)),
       use=st.sampled_from(["o", "S", "both"]))
def test_fast_path_is_the_op_bit_for_bit(case, use):
    got, want = _run(case, True, use), _run(case, False, use)
    for a, b in zip(got, want):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _count_fast(monkeypatch):
    calls, base = [], OP._LightningAttnEager

    class Counting(base):
        @staticmethod
        def forward(ctx, *args):
            calls.append(1)
            return base.forward(ctx, *args)
    monkeypatch.setattr(OP, "_LightningAttnEager", Counting)
    return calls


def test_plain_eager_takes_the_fast_path_and_modes_see_the_op(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode
    calls = _count_fast(monkeypatch)
    q, k, v, s, S0, do, dS = tt.make_inputs(tt.Case(2, 2, 33, 8, 4, torch.float32, state=True, seed=3))
    lightning_attn(q, k, v, s).backward(do)
    assert len(calls) == 1
    seen = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))
    with Watch():
        lightning_attn(q, k, v, s).backward(do)
    assert torch.ops.tnllm.lightning_attn_fwd.default in seen and torch.ops.tnllm.lightning_attn_bwd.default in seen
    from torch.overrides import TorchFunctionMode

    class Fn(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))
    with Fn():                                      # a torch-function mode
        lightning_attn(q, k, v, s)
    assert len(calls) == 1
    with torch.device("cpu"), Fn():                 # the default-device mode under another one
        lightning_attn(q, k, v, s)
    assert len(calls) == 1
    OP.EAGER_FAST_PATH = False
    try:
        lightning_attn(q, k, v, s)
    finally:
        OP.EAGER_FAST_PATH = True
    assert len(calls) == 1


def test_the_default_device_keeps_the_fast_path(monkeypatch):
    """``torch.set_default_device`` / ``with torch.device(...)`` (a torch-function mode that only fills in factory
    calls' devices) keeps the fast path, with the op's outputs and gradients to the bit."""
    calls = _count_fast(monkeypatch)
    case = tt.Case(2, 2, 33, 8, 4, torch.float32, state=True, seed=7)
    want = _run(case, False, "both")
    with torch.device("cpu"):
        got = _run(case, True, "both")
    assert len(calls) == 1
    torch.set_default_device("cpu")
    try:
        again = _run(case, True, "both")
    finally:
        torch.set_default_device(None)
    assert len(calls) == 2
    for a, b, c in zip(got, want, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(c, b, rtol=0, atol=0)


def test_fake_tensors_and_compile_trace_the_op(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode
    calls = _count_fast(monkeypatch)
    q, k, v, s, *_ = tt.make_inputs(tt.Case(1, 2, 20, 8, 8, torch.float32, state=False, seed=4))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        o = lightning_attn(mode.from_tensor(q.detach()), mode.from_tensor(k.detach()), mode.from_tensor(v.detach()),
                           s, check_decay=False)
        assert o.shape == (1, 2, 20, 8)
    from torch.fx.experimental.proxy_tensor import make_fx
    gm = make_fx(lambda q, k, v: lightning_attn(q, k, v, s, check_decay=False))(q, k, v)
    assert "tnllm.lightning_attn_fwd" in gm.code
    graphs = []
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: lightning_attn(q, k, v, s), backend=lambda g, _: graphs.append(g) or g,
                      fullgraph=True)
    f(q, k, v)
    assert any("lightning_attn_fwd" in g.code for g in graphs)
    assert calls == []


def test_double_backward_names_the_backward_op():
    q, k, v, s, *_ = tt.make_inputs(tt.Case(1, 2, 9, 3, 2, torch.float64, state=False, seed=5))
    (g,) = torch.autograd.grad(lightning_attn(q, k, v, s).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="lightning_attn_bwd"):
        torch.autograd.grad(g.sum(), q)


def test_full_activation_checkpointing_through_the_fast_path(monkeypatch):
    from torch.utils.checkpoint import checkpoint
    calls = _count_fast(monkeypatch)
    q, k, v, s, _, do, _ = tt.make_inputs(tt.Case(2, 2, 40, 8, 8, torch.float32, state=False, seed=6))
    want = torch.autograd.grad((lightning_attn(q, k, v, s) * do).sum(), (q, k, v))
    o = checkpoint(lambda q, k, v: lightning_attn(q, k, v, s), q, k, v, use_reentrant=False)
    got = torch.autograd.grad((o * do).sum(), (q, k, v))
    assert len(calls) == 3                          # plain call, checkpointed forward, its recompute
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_vmap_goes_through_the_op():
    """Under torch.func transforms the op is called (vmap batches it with its per-sample fallback, as before the
    fast path existed), and the result is the per-sample call's."""
    q, k, v, s, *_ = tt.make_inputs(tt.Case(1, 2, 9, 4, 4, torch.float64, state=False, seed=1))
    q, k, v = (x.detach() for x in (q, k, v))
    qs = torch.stack([q, 2 * q])
    got = torch.func.vmap(lambda q: lightning_attn(q, k, v, s))(qs)
    for i in range(2):
        torch.testing.assert_close(got[i], lightning_attn(qs[i], k, v, s), rtol=0, atol=0)


def test_autocast_and_jit_trace_agree_with_the_op(monkeypatch):
    """Under CPU autocast the fast path is the op to the bit (both run the same kernels under the same autocast
    state); torch.jit.trace records the op, not a Python autograd.Function."""
    res = []
    for fast in (True, False):
        monkeypatch.setattr(OP, "EAGER_FAST_PATH", fast)
        q, k, v, s, S0, do, dS = tt.make_inputs(tt.Case(2, 2, 40, 8, 8, torch.float32, state=True, seed=1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o, S = lightning_attn(q, k, v, s, initial_state=S0, output_final_state=True)
        res.append((o, S, *torch.autograd.grad((o.float() * do).sum() + (S * dS).sum(), (q, k, v, S0))))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    monkeypatch.setattr(OP, "EAGER_FAST_PATH", True)
    q, k, v, s, *_ = tt.make_inputs(tt.Case(1, 2, 16, 8, 8, torch.float32, state=False, seed=2))
    q, k, v = (x.detach() for x in (q, k, v))
    traced = torch.jit.trace(lambda q, k, v: lightning_attn(q, k, v, s, check_decay=False), (q, k, v))
    assert "tnllm::lightning_attn_fwd" in str(traced.graph)
    torch.testing.assert_close(traced(q, k, v), lightning_attn(q, k, v, s), rtol=0, atol=0)
