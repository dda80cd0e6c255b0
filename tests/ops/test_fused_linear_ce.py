"""tnllm.ops.fused_linear_cross_entropy against its naive form (F.cross_entropy of the whole logits):
loss and the gradients of x and weight, over shapes, chunk sizes (dividing N or not, larger than N),
vocabularies that are not powers of two, ignored rows and dtypes; the all-ignored case as
F.cross_entropy defines it; opcheck, torch.compile(fullgraph=True), autocast; no [N, V] tensor is ever
allocated; every bad argument is named."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from tnllm.ops import fused_linear_cross_entropy, fused_linear_cross_entropy_naive
from tnllm.ops.fused_linear_ce import op as fused_op
from tnllm.ops.fused_linear_ce.op import auto_chunk_tokens

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _inputs(n, d, v, dtype, seed, ignore_frac=0.0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) / d ** 0.5).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    if ignore_frac:
        t[torch.rand(n, generator=g) < ignore_frac] = ignore_index
    return x, w, t


def _loss_and_grads(fn, x, w, t, **kw):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(x, w, t, **kw)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def _close(a, b, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * max(1e-3, float(b.abs().max())))


@given(n=st.integers(1, 40), d=st.integers(1, 24), v=st.integers(1, 70), chunk=st.one_of(st.none(), st.integers(1, 50)),
       dtype=st.sampled_from([torch.float64, torch.float32]), ignore_frac=st.sampled_from([0.0, 0.3]),
       reduction=st.sampled_from(["mean", "sum"]), seed=st.integers(0, 2 ** 16))
def test_equals_naive(n, d, v, chunk, dtype, ignore_frac, reduction, seed):
    x, w, t = _inputs(n, d, v, dtype, seed, ignore_frac)
    t[0] = 0                                            # at least one row counts (all ignored: its own test)
    got = _loss_and_grads(fused_linear_cross_entropy, x, w, t, chunk_tokens=chunk, reduction=reduction)
    ref = _loss_and_grads(fused_linear_cross_entropy_naive, x, w, t, reduction=reduction)
    assert got[0].dtype == ref[0].dtype and got[1].dtype == dtype and got[2].dtype == dtype
    for a, b in zip(got, ref):
        _close(a, b, dtype)


@given(n=st.integers(1, 33), v=st.integers(2, 50), chunk=st.integers(1, 40), ignore_index=st.sampled_from([-100, -1, 3]),
       seed=st.integers(0, 2 ** 16))
def test_bf16_against_the_fp64_oracle(n, v, chunk, ignore_index, seed):
    """bf16 inputs: fp32 logits and fp32 dW accumulation; within bf16 rounding of the fp64 oracle fed the
    same (bf16-rounded) values."""
    x, w, t = _inputs(n, 16, v, torch.bfloat16, seed, 0.25, ignore_index)
    t[0] = 0 if ignore_index != 0 else 1
    got = _loss_and_grads(fused_linear_cross_entropy, x, w, t, chunk_tokens=chunk, ignore_index=ignore_index)
    ref = _loss_and_grads(fused_linear_cross_entropy_naive, x.double(), w.double(), t, ignore_index=ignore_index)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    for a, b in zip(got, ref):
        _close(a, b, torch.bfloat16)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_rows_ignored_matches_cross_entropy(reduction):
    """All targets ignored: mean is 0/0 = NaN and sum is 0, with zero gradients, exactly as F.cross_entropy."""
    x, w, _ = _inputs(9, 8, 11, torch.float32, 0)
    t = torch.full((9,), -100)
    got = _loss_and_grads(fused_linear_cross_entropy, x, w, t, chunk_tokens=4, reduction=reduction)
    ref = _loss_and_grads(fused_linear_cross_entropy_naive, x, w, t, reduction=reduction)
    torch.testing.assert_close(got[0], ref[0], equal_nan=True)
    assert bool(got[0].isnan()) == (reduction == "mean")
    assert torch.equal(got[1], torch.zeros_like(x)) and torch.equal(got[2], torch.zeros_like(w))
    assert torch.equal(ref[1], got[1]) and torch.equal(ref[2], got[2])


def test_incoming_gradient_scales_and_no_grad_path():
    x, w, t = _inputs(12, 8, 30, torch.float64, 1)
    a = _loss_and_grads(lambda *args, **kw: 3.5 * fused_linear_cross_entropy(*args, **kw), x, w, t, chunk_tokens=5)
    b = _loss_and_grads(lambda *args, **kw: 3.5 * fused_linear_cross_entropy_naive(*args), x, w, t)
    for p, q in zip(a, b):
        _close(p, q, torch.float64)
    with torch.no_grad():                               # no gradients computed, the same loss
        _close(fused_linear_cross_entropy(x, w, t, chunk_tokens=5), fused_linear_cross_entropy_naive(x, w, t),
               torch.float64)
    loss = fused_linear_cross_entropy(x, w, t)          # nothing requires grad
    assert not loss.requires_grad


def test_auto_chunk():
    assert auto_chunk_tokens(1, 100, 8) == 1
    assert auto_chunk_tokens(64, 10, 32) == 64          # V <= d: one chunk
    c = auto_chunk_tokens(10_000, 32_000, 512)          # about N d / V = 160 -> 256
    assert c == 256


def test_opcheck_compile_and_autocast():
    x, w, t = _inputs(10, 8, 13, torch.float32, 2, 0.2)
    t[0] = 1
    for need in (True, False):
        torch.library.opcheck(torch.ops.tnllm.fused_linear_cross_entropy.default, (x, w, t, -100, 3, True, need),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static",
                                          "test_aot_dispatch_dynamic"))
    torch._dynamo.reset()

    def f(x, w, t):
        return 2 * fused_linear_cross_entropy(x * 1.5, w, t, chunk_tokens=4)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = _loss_and_grads(cf, x, w, t)
    ref = _loss_and_grads(lambda x, w, t: 2 * fused_linear_cross_entropy_naive(x * 1.5, w, t), x, w, t)
    for a, b in zip(got, ref):
        _close(a, b, torch.float32)
    # autocast: x and weight run in bf16 (as an nn.Linear would), weight's gradient is fp32 for fp32 weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _loss_and_grads(fused_linear_cross_entropy, x, w, t, chunk_tokens=4)
        logits_like_linear = F.linear(x, w)
    assert logits_like_linear.dtype == torch.bfloat16 and got[2].dtype == torch.float32
    ref = _loss_and_grads(lambda x, w, t: F.cross_entropy(F.linear(x.bfloat16(), w.bfloat16()).float(), t), x, w, t)
    for a, b in zip(got, ref):
        _close(a, b, torch.bfloat16)


class _LargestAllocation(TorchDispatchMode):
    """Records the element count of every tensor an aten op returns (each allocation lands in some op's
    output). A mode does not see inside a custom op's kernel (it runs with the mode off), so the tnllm op is
    run here through its CPU kernel's own body with the mode on: every aten op inside it is recorded."""

    def __init__(self):
        super().__init__()
        self.largest, self.mms = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.tnllm.fused_linear_cross_entropy.default:
            with self:
                out = fused_op._fused_impl(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        self.mms += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.matmul, torch.ops.aten.addmm_)
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


def test_no_n_by_v_tensor_is_allocated():
    n, d, v, chunk = 256, 8, 300, 32
    x, w, t = _inputs(n, d, v, torch.float32, 3)
    x.requires_grad_(), w.requires_grad_()
    with _LargestAllocation() as fused:
        loss = fused_linear_cross_entropy(x, w, t, chunk_tokens=chunk)
        loss.backward()
    with _LargestAllocation() as naive:
        fused_linear_cross_entropy_naive(x, w, t).backward()
    _close(loss.detach(), fused_linear_cross_entropy_naive(x, w, t).detach(), torch.float32)
    assert fused.mms >= 3 * n // chunk                  # the chunks' matmuls were recorded (logits, dx, dW)
    assert naive.largest >= n * v                       # the recorder sees the logits of the naive form
    assert fused.largest <= max(chunk * v, n * d, v * d) < n * v


@pytest.mark.parametrize("args, match", [
    ((torch.randn(4), torch.randn(5, 4), torch.zeros(4, dtype=torch.long)), "`x` must be 2-D"),
    ((torch.randn(4, 3), torch.randn(5, 4), torch.zeros(4, dtype=torch.long)), "must share d"),
    ((torch.randn(4, 4), torch.randn(5, 4, 1), torch.zeros(4, dtype=torch.long)), "`weight` must be 2-D"),
    ((torch.randn(4, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)), "one entry per row"),
    ((torch.randn(4, 4), torch.randn(5, 4), torch.zeros(4, 1, dtype=torch.long)), "`target` must be 1-D"),
    ((torch.randn(4, 4), torch.randn(5, 4), torch.zeros(4, dtype=torch.int32)), "`target` must be int64"),
    ((torch.randn(4, 4), torch.randn(5, 4).double(), torch.zeros(4, dtype=torch.long)), "same dtype"),
    ((torch.zeros(4, 4, dtype=torch.long), torch.randn(5, 4), torch.zeros(4, dtype=torch.long)), "`x` must be float"),
    ((torch.randn(4, 4), torch.randn(0, 4), torch.zeros(4, dtype=torch.long)), "at least one row"),
])
def test_bad_inputs_named(args, match):
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(*args)


@pytest.mark.parametrize("kw, match", [({"chunk_tokens": 0}, "chunk_tokens"), ({"chunk_tokens": 2.0}, "chunk_tokens"),
                                       ({"reduction": "none"}, "reduction"), ({"ignore_index": 1.5}, "ignore_index")])
def test_bad_options_named(kw, match):
    x, w, t = _inputs(4, 4, 5, torch.float32, 0)
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(x, w, t, **kw)


def test_fp16_large_vocabulary_mean_does_not_underflow():
    """fp16 at V = 64k with ~900 rows counted: softmax / count is ~2e-8, below fp16's smallest subnormal, so
    folding the mean into the softmax gradient before the fp16 matmul zeroes most of it. The mean is applied
    after the matmul (dx) or in fp32 (dW); and a loss scale (as GradScaler applies) scales the result exactly."""
    x, w, t = _inputs(1024, 32, 64000, torch.float16, seed=5, ignore_frac=0.14)
    ref = _loss_and_grads(fused_linear_cross_entropy_naive, x.double(), w.double(), t)
    got = _loss_and_grads(fused_linear_cross_entropy, x, w, t, chunk_tokens=256)
    for name, a, b in zip(("loss", "dx", "dW"), got, ref):
        err = float((a.double() - b).norm() / b.norm())
        assert err < 2e-3, f"{name}: relative error {err:.2e}"
    xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
    (fused_linear_cross_entropy(xs, ws, t, chunk_tokens=256) * 1024.0).backward()
    err = float((xs.grad.double() / 1024.0 - ref[1]).norm() / ref[1].norm())
    assert err < 2e-3, f"dx under a loss scale of 1024: relative error {err:.2e}"
