"""The fused Triton decode kernel (tnllm.ops.gla_decode) on CPU under TRITON_INTERPRET=1, against the
reference form: y and the new state, fp32 and fp16 (the interpreter's bf16 tl.dot is broken; this
kernel has no dot, but bf16 runs on the GPU suite), in place and into a separate buffer, with
NaN-poisoned allocations so any element the kernel fails to write shows up."""
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/ops/test_triton.py (a child process)"
pytest.importorskip("triton")

from tnllm.testing import TOL, rel_err  # noqa: E402
from tnllm.testing import poisoned_allocations as poisoned  # noqa: E402
from tnllm.ops.gla_decode import gla_decode_naive, gla_decode_step  # noqa: E402
from tnllm.ops.gla_decode import op as gla_op  # noqa: E402
from tnllm.ops.gla_decode import triton as tri  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

assert isinstance(tri._get_kernels()[1], InterpretedFunction)

# relative error (tnllm.testing.TOL of the input dtype) against the fp32 reference from the
# same inputs: the kernel rounds the activation, LRPE and o to fp16 where the model does, the fp32
# reference does not
SCALE = {torch.float32: 1.0, torch.float16: 1.0}


def assert_close(a, ref, dtype, what="", scale=1.0):
    err, tol = rel_err(a, ref), TOL[dtype] * scale
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})"


def make(B, H, e, lrpe, dtype, seed, rates, positions, state_scale=1.0, stride_pad=0):
    g = torch.Generator().manual_seed(seed)
    h = H * e
    wide = torch.randn(B, 4 * h + stride_pad, generator=g)
    qkvu = wide[:, :4 * h].to(dtype) if stride_pad else wide.to(dtype)   # a row stride != 4h when padded
    Dk = 2 * e if lrpe else e
    S = torch.randn(B, H, Dk, e, generator=g) * state_scale
    s = torch.tensor([rates[i % len(rates)] for i in range(H)], dtype=torch.float32)
    theta = (10000 ** (-2 / h * torch.arange(h, dtype=torch.float32))).reshape(H, 1, e) if lrpe else None
    pos = torch.tensor([positions[i % len(positions)] for i in range(B)], dtype=torch.int64)
    return qkvu, S, s, theta, pos


def check(qkvu, S, s, theta, pos, act, dtype, inplace, bv=None, x=None):
    xf = None if x is None else x.float()
    y_ref, S_ref = gla_decode_naive(qkvu.float(), S, s, theta, pos, act, norm_input=xf)
    S0 = S.clone()
    with poisoned():
        if inplace:
            buf = S.clone()
            y = tri.gla_decode_triton(qkvu, buf, s, theta, pos, act, bv=bv, norm_input=x)
            S_new = buf
        else:
            S_new = torch.empty_like(S)                     # NaN-filled inside poisoned()
            y = tri.gla_decode_triton(qkvu, S, s, theta, pos, act, state_out=S_new, bv=bv, norm_input=x)
    assert torch.equal(S, S0), "the input state was modified"
    assert y.dtype == dtype and y.shape == y_ref.shape and y.is_contiguous()
    B, H, Dk, e = S.shape
    tag = (f"B{B} H{H} e{e} Dk{Dk} {dtype} {act} inplace={inplace} bv={bv} s={s.tolist()} pos={pos.tolist()} "
           f"norm_input={None if x is None else tuple(x.shape)}")
    assert_close(y, y_ref, dtype, f"y {tag}", scale=SCALE[dtype])
    assert_close(S_new, S_ref, dtype, f"S {tag}")          # k, v enter the state rounded to the input dtype
    assert not tri._COUNTERS[("cpu", None)].any(), "ticket counters not reset"


RATES = st.lists(st.sampled_from([0.0, 1e-6, 0.01, 0.5, 2.0, 30.0]), min_size=1, max_size=4)
POSITIONS = st.lists(st.one_of(st.sampled_from([0, 1, 100000]), st.integers(0, 200000)), min_size=1, max_size=5)


@given(B=st.integers(1, 5), H=st.integers(1, 4), e=st.sampled_from([16, 32, 64]), lrpe=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), act=st.sampled_from(["silu", "relu", "none"]),
       inplace=st.booleans(), bv=st.sampled_from([None, 16, 32]), rates=RATES, positions=POSITIONS,
       state_scale=st.sampled_from([0.0, 1.0, 100.0]), seed=st.integers(0, 2**31 - 1),
       norm_d=st.sampled_from([None, 1, 24, 64, 5000]))
def test_kernel_matches_reference(B, H, e, lrpe, dtype, act, inplace, bv, rates, positions, state_scale, seed,
                                  norm_d):
    qkvu, S, s, theta, pos = make(B, H, e, lrpe, dtype, seed, rates, positions, state_scale)
    # norm_input: the un-normalised layer input (d = 5000 > the kernel's 4096-wide blocks: two chunks)
    x = None if norm_d is None else (torch.randn(B, norm_d, generator=torch.Generator().manual_seed(seed)) * 7).to(dtype)
    check(qkvu, S, s, theta, pos, act, dtype, inplace, bv=bv, x=x)


@pytest.mark.parametrize("lrpe", [False, True], ids=["nolrpe", "lrpe"])
def test_norm_input_folds_the_layer_norm(lrpe):
    # qkvu projected from x itself + norm_input=x == qkvu projected from srms_norm(x), within fp32 rounding
    from tnllm.ops import srms_norm
    B, H, e, d = 3, 2, 16, 40
    g = torch.Generator().manual_seed(9)
    x = torch.randn(B, d, generator=g) * 5
    W = torch.randn(4 * H * e, d, generator=g) * 0.2
    _, S, s, theta, pos = make(B, H, e, lrpe, torch.float32, 9, [0.1, 2.0], [3, 100000])
    y_ref, S_ref = gla_decode_naive(srms_norm(x) @ W.T, S, s, theta, pos, "silu")
    buf = S.clone()
    y = tri.gla_decode_triton(x @ W.T, buf, s, theta, pos, "silu", bv=16, norm_input=x)
    assert_close(y, y_ref, torch.float32, "y")
    assert_close(buf, S_ref, torch.float32, "S")


@pytest.mark.parametrize("e,bv", [(24, 16), (24, None), (48, 32)], ids=lambda x: str(x))
@pytest.mark.parametrize("lrpe", [False, True], ids=["nolrpe", "lrpe"])
def test_head_dim_not_a_power_of_two(e, bv, lrpe):
    qkvu, S, s, theta, pos = make(3, 3, e, lrpe, torch.float32, 1, [0.0, 0.3, 5.0], [0, 7, 100000])
    check(qkvu, S, s, theta, pos, "silu", torch.float32, inplace=True, bv=bv)


def test_strided_rows_and_many_row_blocks():
    # qkvu as a column slice (row stride 4h + 8), several value blocks per head and several rows
    qkvu, S, s, theta, pos = make(4, 2, 64, True, torch.float32, 3, [0.1, 1.0], [5, 100000], stride_pad=8)
    assert qkvu.stride(0) != qkvu.shape[1]
    check(qkvu, S, s, theta, pos, "silu", torch.float32, inplace=False, bv=16)


def test_repeated_steps_equal_the_reference_recurrence():
    # 12 steps in place (the counters and the workspace are reused every call) == 12 reference steps
    B, H, e = 2, 2, 16
    qkvu, S, s, theta, pos = make(B, H, e, True, torch.float32, 4, [0.0, 0.7], [0, 99990])
    S_ref, buf = S.clone(), S.clone()
    g = torch.Generator().manual_seed(5)
    for t in range(12):
        x = torch.randn(B, 4 * H * e, generator=g)
        y_ref, S_ref = gla_decode_naive(x, S_ref, s, theta, pos + t, "silu")
        y = tri.gla_decode_triton(x, buf, s, theta, pos + t, "silu", bv=16)
        assert_close(y, y_ref, torch.float32, f"y step {t}")
    assert_close(buf, S_ref, torch.float32, "S after 12 steps")


def test_registered_kernels_and_compile(monkeypatch):
    # the ops' CUDA kernels (the launcher behind tnllm::gla_decode_step*) registered for CPU here, so
    # torch.compile(fullgraph=True) runs the interpreted Triton kernel at run time
    qkvu, S, s, theta, pos = make(2, 2, 16, True, torch.float32, 6, [0.0, 0.5], [3, 100000])
    y_ref, S_ref = gla_decode_naive(qkvu, S, s, theta, pos, "silu")
    lib_calls = []
    inplace_k, functional_k = gla_op._cuda_inplace, gla_op._cuda_functional

    def spy_inplace(*a):
        lib_calls.append("inplace")
        return inplace_k(*a)

    def spy_functional(*a):
        lib_calls.append("functional")
        return functional_k(*a)
    torch.library.register_kernel("tnllm::gla_decode_step", "cpu", spy_inplace)
    torch.library.register_kernel("tnllm::gla_decode_step_functional", "cpu", spy_functional)

    def f(x, S, inplace, xn=None):
        y, S2 = gla_decode_step(x, S, s, theta, pos, "silu", inplace=inplace, norm_input=xn)
        return y, S2

    cf = torch.compile(f, fullgraph=True)
    buf = S.clone()
    y, S2 = cf(qkvu, buf, True)
    assert_close(y, y_ref, torch.float32, "compiled in place y")
    assert_close(buf, S_ref, torch.float32, "compiled in place state")
    y, S3 = cf(qkvu, S, False)
    assert_close(y, y_ref, torch.float32, "compiled functional y")
    assert_close(S3, S_ref, torch.float32, "compiled functional state")
    xn = torch.randn(2, 24) * 3
    y_ref_n, _ = gla_decode_naive(qkvu, S, s, theta, pos, "silu", norm_input=xn)
    y, _ = cf(qkvu, S, False, xn)
    assert_close(y, y_ref_n, torch.float32, "compiled functional y with norm_input")
    assert lib_calls == ["inplace", "functional", "functional"], lib_calls
