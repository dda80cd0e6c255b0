"""GPU suite (``pytest -m gpu``; skipped without CUDA): the Triton path of the op on a real device.

Everything goes through tnllm.testing: outputs, final states and gradients of
``tnllm.ops.lightning_attn`` against the fp64 oracle from the same (rounded) inputs, within the one
tolerance table ``tt.TOL``; NaN-poisoned allocations so unwritten elements fail; the edge contract
(non-finite inputs stay causal, s = inf, bad s) on CUDA; the memoised decay check under CUDA graph
capture.
"""
import dataclasses
import math

import pytest
import torch

import tnllm.testing as tt
from tnllm.ops import lightning_attn

pytestmark = pytest.mark.gpu

DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def rel(a, b):
    return tt.rel_err(a, b)


def poisoned_op(q, k, v, s, initial_state=None, output_final_state=False):
    with tt.poisoned_allocations():
        return lightning_attn(q, k, v, s, initial_state=initial_state, output_final_state=output_final_state)


def check(B, H, T, Dk, Dv, dtype, state, rates=None, layout="contiguous", seed=0):
    rates = rates or tuple(float(x) for x in torch.linspace(0.01, 1.0, H))
    case = tt.Case(B, H, T, Dk, Dv, dtype, device="cuda", layout=layout, rates=rates, state=state, seed=seed)
    tt.check_case(poisoned_op, case)


CASES = [   # (B, H, T, Dk, Dv, dtype): every dtype at the model widths, odd widths, tails, Dk != Dv
    (2, 3, 1, 16, 16, "bf16"), (2, 3, 1, 16, 16, "fp32"), (2, 3, 100, 64, 64, "fp16"),
    (1, 4, 1000, 128, 128, "bf16"), (1, 4, 1000, 128, 128, "fp16"), (1, 4, 300, 128, 128, "fp32"),
    (1, 2, 777, 256, 128, "bf16"), (1, 2, 777, 256, 128, "fp32"), (2, 2, 300, 128, 256, "bf16"),
    (1, 2, 333, 48, 80, "fp16"), (1, 1, 2048, 32, 32, "bf16"), (2, 4, 700, 64, 64, "bf16"),
]


@pytest.mark.parametrize("B,H,T,Dk,Dv,dt", CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("state", [False, True], ids=["nostate", "state"])
def test_op_cuda_matches_naive(B, H, T, Dk, Dv, dt, state):
    check(B, H, T, Dk, Dv, DT[dt], state, seed=T + Dk)


def test_noncontiguous_slow_and_fast_decay():
    check(2, 4, 515, 128, 128, torch.bfloat16, True, layout="bthd", rates=(1e-5, 0.0, 3e-6, 1e-6))
    check(2, 4, 515, 128, 128, torch.bfloat16, True, rates=(20.0, 1e4, math.inf, 5.0))
    check(1, 2, 300, 64, 32, torch.float16, True, layout="padded", rates=(0.1, math.inf))


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
def test_t1_wide_k_narrow_v_cuda(dt):
    """Found by `tnllm check --device cuda --examples 500` on the H200 (triton 3.6): T = 1, Dk = 128, Dv = 16 in the
    "padded" layout (a view starting one element into rows of D + 3) gave o error 7.9e-2 and dv 0.9 in bf16 and
    illegal memory accesses in fp16. ``contiguous()`` returned that view itself (every dimension but the last has
    size 1), so the misaligned pointer reached the kernels; the launcher now clones it (tests/ops/test_sweep_inputs.py)."""
    check(1, 1, 1, 128, 16, DT[dt], False, layout="padded", rates=(0.0,), seed=11975)
    check(1, 1, 1, 128, 16, DT[dt], False, rates=(0.0,), seed=11975)


def test_property_cuda():
    """Hypothesis-drawn cases on CUDA (shapes, layouts, rates incl. 0 and inf, states), bf16."""
    # every new (Dk, Dv, dtype, state) is a Triton compile of four kernels (~1 s each): fp16 and fp32 are
    # covered by test_op_cuda_matches_naive and `tnllm check --device cuda`, so the drawn cases stay at bf16
    tt.assert_forms_agree(poisoned_op, device="cuda", dtypes=(torch.bfloat16,), max_examples=15, max_T=300,
                          dims=(16, 64))


def test_edge_semantics_cuda():
    tt.assert_edge_semantics(lightning_attn, device="cuda", dtypes=(torch.bfloat16, torch.float32), max_examples=10,
                             dims=(16, 64))


def test_model_nan_embedding_causal_cuda():
    from tnllm import TransNormerConfig, TransNormerLLM
    torch.manual_seed(0)
    m = TransNormerLLM(TransNormerConfig(vocab_size=97, decoder_embed_dim=64, decoder_layers=2,
                                         decoder_attention_heads=4, glu_dim=96,
                                         tie_word_embeddings=False)).cuda().eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12] * 20], device="cuda")
    clean = m(ids)
    with torch.no_grad():
        m.model.embed_tokens.weight[8] = float("nan")
    bad = m(ids)
    assert torch.isfinite(bad[:, :3]).all() and torch.equal(bad[:, :3], clean[:, :3])
    assert not torch.isfinite(bad[:, 3]).all()


def test_decay_check_no_sync_and_graph_capture():
    """The default check reads s once; under CUDA graph capture it does not sync (capture would fail)."""
    from tnllm.ops.lightning_attn import _common
    q = torch.randn(1, 2, 64, 16, device="cuda", dtype=torch.bfloat16)
    s = torch.tensor([0.1, 0.2], device="cuda")
    lightning_attn(q, q, q, s)
    calls = []
    real = _common._decay_values_ok
    _common._decay_values_ok = lambda t: calls.append(1) or real(t)
    try:
        torch.cuda.set_sync_debug_mode("error")       # any synchronising call raises
        for _ in range(3):
            lightning_attn(q, q, q, s)
        torch.cuda.set_sync_debug_mode(0)
        assert not calls
        fresh = torch.tensor([0.3, 0.4], device="cuda")
        st = torch.cuda.Stream()
        st.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(st):
            lightning_attn(q, q, q, fresh)            # warm-up outside capture (checks `fresh` once)
        torch.cuda.current_stream().wait_stream(st)
        g = torch.cuda.CUDAGraph()
        other = torch.tensor([0.5, 0.6], device="cuda")
        with torch.cuda.graph(g):
            out = lightning_attn(q, q, q, fresh)
            out2 = lightning_attn(q, q, q, other)     # never checked before: a device-side assertion
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, lightning_attn(q, q, q, fresh))
        torch.testing.assert_close(out2, lightning_attn(q, q, q, other))
    finally:
        torch.cuda.set_sync_debug_mode(0)
        _common._decay_values_ok = real
    with pytest.raises(ValueError, match="`s`"):
        lightning_attn(q, q, q, torch.tensor([0.1, float("nan")], device="cuda"))


def test_many_heads_grid():
    """B*H far past any grid-dimension limit of 65535 along y/z."""
    check(70000, 1, 20, 16, 16, torch.float16, True, rates=(0.5,))


def test_long_single_head():
    """One long head (B*H = 1) through the default op (one split unless AUTO_SPLIT is on)."""
    check(1, 1, 6000, 64, 64, torch.bfloat16, True, rates=(0.01,))


SPLIT_CASES = [(1, 1, 6000, 64, 64, "bf16"), (2, 4, 3000, 128, 128, "bf16"), (1, 2, 2000, 128, 128, "fp32"),
               (1, 2, 1500, 256, 128, "bf16"), (1, 3, 1000, 48, 80, "fp16")]


@pytest.mark.parametrize("B,H,T,Dk,Dv,dt", SPLIT_CASES, ids=lambda x: str(x))
def test_split_launches_equal_one_split_cuda(B, H, T, Dk, Dv, dt):
    """The sequence-split launches (a pre-pass writes each split's local state, each split folds the earlier
    ones into its start) against the one-split launch of the same inputs: outputs, final state and every
    gradient, for 2, 5 and 16 splits, allocations NaN-poisoned. AUTO_SPLIT may be turned on once this passes."""
    from tnllm.ops.lightning_attn import triton as tri
    dtype = DT[dt]
    case = tt.Case(B, H, T, Dk, Dv, dtype, device="cuda", rates=tuple(0.01 + 0.3 * h for h in range(H)),
                   state=True, seed=T + H)
    q, k, v, s, S0, do, dS = tt.make_inputs(case)
    q, k, v, S0 = q.detach(), k.detach(), v.detach(), S0.detach().float()
    do = do.to(dtype).contiguous()
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    with tt.poisoned_allocations():
        ref = (*tri.lightning_attn_fwd_triton(q, k, v, s, S0),
               *tri.lightning_attn_bwd_triton(do, dS, q, k, v, s, S0))
        for n in (2, 5, 16):
            cfg = dataclasses.replace(tri.default_config(min(Dk, 128), min(Dv, 128), dtype), n_split=n)
            got = (*tri.lightning_attn_fwd_triton(q, k, v, s, S0, cfg=cfg),
                   *tri.lightning_attn_bwd_triton(do, dS, q, k, v, s, S0, cfgs={x: cfg for x in ("dq", "dk", "dv")}))
            for name, a, b in zip(("o", "S", "dq", "dk", "dv", "dS0"), got, ref):
                assert torch.isfinite(a).all(), (n, name)
                assert rel(a, b) <= tol, (n, name, rel(a, b))


@pytest.mark.parametrize("prepass_bc,prefix", [(None, False), (None, True), (128, False), (128, True)],
                         ids=["tiles-fold", "tiles-prefix", "wide-fold", "wide-prefix"])
def test_prepass_settings_cuda(prepass_bc, prefix, monkeypatch):
    """Every setting of the split pre-pass (PREPASS_BC: its state tile width; PREFIX_SCAN: local states folded into
    prefixes by one more launch) against the oracle, at split shapes with an initial state, a Dk != Dv head, and
    the fused dk/dv sweep (D64)."""
    from tnllm.ops.lightning_attn import triton as tri
    monkeypatch.setattr(tri, "PREPASS_BC", prepass_bc)
    monkeypatch.setattr(tri, "PREFIX_SCAN", prefix)
    assert tri.auto_split(2 * 4 * 2, tri.cdiv(3000, 64), tri._num_sms(torch.device("cuda"))) > 2
    check(2, 4, 3000, 128, 128, torch.bfloat16, True)
    check(1, 2, 1500, 256, 128, torch.bfloat16, True)
    check(1, 3, 4000, 64, 64, torch.float16, True, rates=(0.01, 0.5, math.inf))


def test_auto_split_op_matches_oracle_cuda(monkeypatch):
    """The default op with AUTO_SPLIT on (small B*H: the sequence is split automatically) against the oracle."""
    from tnllm.ops.lightning_attn import triton as tri
    monkeypatch.setattr(tri, "AUTO_SPLIT", True)
    assert tri.auto_split(1, tri.triton.cdiv(6000, 64), tri._num_sms(torch.device("cuda"))) > 1
    check(1, 1, 6000, 64, 64, torch.bfloat16, True, rates=(0.01,))
    check(2, 4, 3000, 128, 128, torch.bfloat16, True)
    check(1, 2, 1500, 256, 128, torch.bfloat16, True)


def test_compile_fullgraph_cuda():
    q, k, v, s, S0, _, _ = tt.make_inputs(tt.Case(2, 4, 200, 64, 64, torch.bfloat16, device="cuda",
                                                  rates=(0.1, 0.2, 0.5, 1.0), seed=3))

    def f(q, k, v, S0):
        o, S = lightning_attn(q * 1.5, k, v, s, initial_state=S0, output_final_state=True)
        return o.float().sin().sum() + S.square().sum()
    cf = torch.compile(f, fullgraph=True)
    a = f(q, k, v, S0)
    ga = torch.autograd.grad(a, [q, k, v, S0])
    b = cf(q, k, v, S0)
    gb = torch.autograd.grad(b, [q, k, v, S0])
    assert rel(b, a) < 1e-3
    for x, y in zip(gb, ga):
        assert rel(x, y) < 1e-3


@pytest.mark.parametrize("D", [64, 128])
def test_token_major_gradients_and_compiled_projection_cuda(D):
    """The model's layout: q, k, v head slices of one [B, T, 4h] projection. The backward writes dq, dk, dv
    token-major, as the fake kernel says (real against fake strides on CUDA), and a compiled projection ->
    slices -> silu -> lightning_attn -> loss gives the eager gradients of the projection's input and weight."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from tnllm.ops.lightning_attn import _common
    B, H, T = 2, 4, 300
    h = H * D
    g = torch.Generator(device="cuda").manual_seed(D)
    x = torch.randn(B, T, 256, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(4 * h, 256, device="cuda", generator=g) / 16).bfloat16().requires_grad_()
    s = torch.tensor([0.05 * (i + 1) for i in range(H)], device="cuda")

    def f(x, w):
        q, k, v, u = (x @ w.T).chunk(4, dim=-1)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        o = lightning_attn(torch.nn.functional.silu(q), torch.nn.functional.silu(k), v, s, check_decay=False)
        return (o.transpose(1, 2).reshape(B, T, h).float() * u.float()).sin().sum()

    q, k, v, _ = (x @ w.T).detach().chunk(4, dim=-1)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
    do = torch.randn(B, H, T, D, device="cuda", generator=g, dtype=torch.bfloat16)
    args = (do, None, q, k, v, s, None, 64)
    real = torch.ops.tnllm.lightning_attn_bwd(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = torch.ops.tnllm.lightning_attn_bwd(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                    for a in args))
    for r, fk, t in zip(real[:3], fake[:3], (q, k, v)):
        assert _common.token_major(t) and _common.token_major(r) and r.stride() == fk.stride()
    ref = torch.ops.tnllm.lightning_attn_bwd(do, None, q.contiguous(), k.contiguous(), v.contiguous(), s, None, 64)
    for a, b in zip(real[:3], ref[:3]):
        assert torch.equal(a, b)
    ga = torch.autograd.grad(f(x, w), [x, w])
    gb = torch.autograd.grad(torch.compile(f, fullgraph=True)(x, w), [x, w])
    for a, b in zip(gb, ga):
        assert rel(a, b) < 2e-2, rel(a, b)


@pytest.mark.parametrize("dt", ["bf16", "fp32"])
def test_norm_gate_cuda(dt):
    from tnllm.ops.norm_triton import _reference, srms_norm_gate
    dtype = DT[dt]
    B, H, T, E = 2, 8, 300, 128
    o = torch.randn(B, H, T, E, device="cuda", dtype=dtype, requires_grad=True)
    u = torch.randn(B, T, 2 * H * E, device="cuda", dtype=dtype)[..., : H * E].detach().requires_grad_()
    dy = torch.randn(B, T, H * E, device="cuda", dtype=dtype)
    with tt.poisoned_allocations():
        y = srms_norm_gate(o, u)
        gy = torch.autograd.grad((y * dy).sum(), [o, u])
    od, ud = o.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    yr = _reference(od, ud)
    gr = torch.autograd.grad((yr * dy.double()).sum(), [od, ud])
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert rel(y, yr) < tol
    for a, b in zip(gy, gr):
        assert rel(a, b) < tol
    if dtype == torch.bfloat16:
        assert torch.equal(y, _reference(o.detach(), u.detach()))


def test_tiny_model_cuda_matches_cpu():
    from tnllm import TransNormerConfig, TransNormerLLM
    cfg = TransNormerConfig(vocab_size=97, decoder_embed_dim=64, decoder_layers=2, decoder_attention_heads=4, glu_dim=96)
    torch.manual_seed(0)
    m = TransNormerLLM(cfg)
    ids = torch.randint(1, 97, (2, 150))
    ref = m(ids)
    got = m.cuda()(ids.cuda()).cpu()
    assert rel(got, ref) < 1e-4


@pytest.mark.parametrize("B,H,T,D,dt,layout", [(2, 8, 2048, 128, "bf16", "bthd"), (1, 4, 300, 64, "fp32", "contiguous"),
                                               (2, 2, 1000, 64, "bf16", "padded")], ids=str)
def test_eager_fast_path_is_the_op_cuda(B, H, T, D, dt, layout):
    """The public call's eager fast path (an autograd.Function over the Triton launchers) gives the op's outputs,
    final state and gradients bit for bit, in the op's gradient layout (a split launch at B2 H8 D128)."""
    import sys
    op = sys.modules["tnllm.ops.lightning_attn.op"]
    case = tt.Case(B, H, T, D, D, DT[dt], device="cuda", layout=layout, state=True, seed=11,
                   rates=tuple(float(x) for x in torch.linspace(0.01, 1.0, H)))
    runs = []
    for fast in (True, False):
        q, k, v, s, S0, do, dS = tt.make_inputs(case)
        op.EAGER_FAST_PATH = fast
        try:
            o, S = lightning_attn(q, k, v, s, initial_state=S0, output_final_state=True)
        finally:
            op.EAGER_FAST_PATH = True
        grads = torch.autograd.grad((o.float() * do.float()).sum() + (S * dS.float()).sum(), (q, k, v, S0))
        runs.append((o, S, *grads))
    for a, b in zip(*runs):
        assert a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
