"""The SGLU gate's Triton kernel (tnllm.ops.sglu) on CPU under TRITON_INTERPRET=1 against the fp32
reference from the same inputs: fp32 and fp16, with and without the folded norm, gate widths that are
not a power of two, strided rows, NaN-poisoned outputs so an unwritten element shows up."""
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/ops/test_triton.py (a child process)"
pytest.importorskip("triton")

from tnllm.ops.sglu import sglu_gate_naive  # noqa: E402
from tnllm.ops.sglu import triton as tri  # noqa: E402
from tnllm.testing import TOL, rel_err  # noqa: E402
from tnllm.testing import poisoned_allocations as poisoned  # noqa: E402


@given(B=st.integers(1, 4), G=st.sampled_from([1, 5, 16, 96, 300]), d=st.sampled_from([None, 1, 64, 5000]),
       dtype=st.sampled_from([torch.float32, torch.float16]), act=st.sampled_from(["none", "silu", "relu"]),
       block=st.sampled_from([None, 16]), pad=st.sampled_from([0, 6]), seed=st.integers(0, 2**31 - 1))
def test_kernel_matches_reference(B, G, d, dtype, act, block, pad, seed):
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(B, 2 * G + pad, generator=g) * 2
    l12 = wide[:, :2 * G].to(dtype)                          # row stride 2G + pad when padded
    x = None if d is None else (torch.randn(B, d, generator=g) * 5).to(dtype)
    ref = sglu_gate_naive(l12.float(), None if x is None else x.float(), act)
    with poisoned():
        out = tri.sglu_gate_triton(l12, x, act, block=block)
    assert out.dtype == dtype and out.shape == (B, G) and out.is_contiguous()
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"B{B} G{G} d{d} {dtype} {act} block={block}: {err:.2e}"


def test_wide_blocks_from_32_rows():
    # 33 rows: programs of 1024 gate columns; the gate width 700 leaves the block partly masked
    g = torch.Generator().manual_seed(3)
    l12, x = torch.randn(33, 1400, generator=g), torch.randn(33, 48, generator=g) * 4
    with poisoned():
        out = tri.sglu_gate_triton(l12, x, "silu")
    assert rel_err(out, sglu_gate_naive(l12, x, "silu")) <= TOL[torch.float32]
