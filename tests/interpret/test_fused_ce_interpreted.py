"""The fused linear + cross entropy's Triton row kernel (tnllm.ops.fused_linear_ce.triton) on CPU under
TRITON_INTERPRET=1: the loss terms and the in-place softmax gradient against F.cross_entropy and autograd
on the same logits (fp32 and fp16, vocabularies that are not a multiple of the block, ignored rows, an
out-of-range class giving NaN), and the whole op through that kernel against the reference form."""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/ops/test_triton.py (a child process)"
pytest.importorskip("triton")

from tnllm.ops import fused_linear_cross_entropy, fused_linear_cross_entropy_naive  # noqa: E402
from tnllm.ops.fused_linear_ce import op as ce_op  # noqa: E402
from tnllm.ops.fused_linear_ce import triton as tri  # noqa: E402
from tnllm.testing import TOL, rel_err  # noqa: E402


@given(c=st.integers(1, 5), V=st.sampled_from([1, 3, 16, 37, 300]), dtype=st.sampled_from([torch.float32, torch.float16]),
       block=st.sampled_from([None, 8, 16]), grad=st.booleans(), scale=st.sampled_from([1.0, 30.0]),
       seed=st.integers(0, 2**31 - 1))
def test_rows_match_cross_entropy(c, V, dtype, block, grad, scale, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(c, V, generator=g) * scale).to(dtype)
    target = torch.randint(0, V, (c,), generator=g)
    target[::3] = -100                                               # the first row (and every third) ignored
    ref_in = logits.float().requires_grad_()
    ref = F.cross_entropy(ref_in, target, ignore_index=-100, reduction="none")
    ref.sum().backward()
    buf = logits.clone()
    rows = tri.ce_rows_triton(buf, target, -100, grad=grad, block=block)
    assert rows.dtype == torch.float32 and rows.shape == (c,)
    assert rel_err(rows, ref.detach()) <= TOL[torch.float32] * 10, f"loss c{c} V{V} {dtype} block={block}"
    if grad:
        assert buf.dtype == dtype
        assert rel_err(buf, ref_in.grad) <= TOL[dtype], f"grad c{c} V{V} {dtype} block={block}"
        assert (buf[::3] == 0).all()
    else:
        assert torch.equal(buf, logits)                              # untouched without grad


def test_out_of_range_class_is_nan_and_the_layout_is_checked():
    logits = torch.randn(3, 10)
    rows = tri.ce_rows_triton(logits, torch.tensor([2, 10, -100]), -100)
    assert torch.isfinite(rows[0]) and torch.isnan(rows[1]) and rows[2] == 0
    assert torch.isnan(logits[1]).all() and (logits[2] == 0).all()
    with pytest.raises(ValueError, match="unit stride along V"):
        tri.ce_rows_triton(torch.randn(10, 3).T, torch.zeros(3, dtype=torch.long), -100)
    with pytest.raises(ValueError, match="`logits` must be float16, bfloat16 or float32"):
        tri.ce_rows_triton(torch.randn(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.long), -100)
    with pytest.raises(ValueError, match="`target` must be int64 of shape"):
        tri.ce_rows_triton(torch.randn(2, 3), torch.zeros(3, dtype=torch.long), -100)


@pytest.fixture
def triton_on_cpu():
    ce_op.use_triton_on_cpu(True)
    yield
    ce_op.use_triton_on_cpu(False)


@pytest.mark.parametrize("chunk", [None, 1, 7, 64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_op_through_the_kernel_matches_reference(triton_on_cpu, chunk, reduction):
    g = torch.Generator().manual_seed(1)
    n, d, V = 45, 24, 97
    x = torch.randn(n, d, generator=g).requires_grad_()
    w = (torch.randn(V, d, generator=g) / d ** 0.5).requires_grad_()
    t = torch.randint(0, V, (n,), generator=g)
    t[::5] = -100
    assert ce_op._use_triton(x)
    loss = fused_linear_cross_entropy(x, w, t, chunk_tokens=chunk, reduction=reduction)
    loss.backward()
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = fused_linear_cross_entropy_naive(xr, wr, t, reduction=reduction)
    ref.backward()
    assert rel_err(loss.detach(), ref.detach()) <= 1e-5
    assert rel_err(x.grad, xr.grad) <= 1e-5 and rel_err(w.grad, wr.grad) <= 1e-5


def test_auto_chunk_on_the_triton_path():
    assert ce_op.triton_chunk_tokens(16384, 64000, 2) == 2048       # 2048 x 64000 x 2 B = 250 MiB <= 256 MiB
    assert ce_op.triton_chunk_tokens(16384, 64000, 4) == 1024
    assert ce_op.triton_chunk_tokens(100, 97, 4) == 100               # small vocabularies: the whole batch
    assert ce_op.triton_chunk_tokens(10, 10 ** 9, 2) == 1
