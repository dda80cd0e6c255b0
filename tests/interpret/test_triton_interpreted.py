"""The Triton kernels on CPU under TRITON_INTERPRET=1 (fp32/fp16: the interpreter's bf16 tl.dot is broken).

Run in their own process by tests/ops/test_triton.py (this directory is not collected by the main
run: the interpreter is chosen when the kernels are decorated, so it would leak into every CUDA
test of the same process). By hand: ``TRITON_INTERPRET=1 python -m pytest tests/interpret``.

The launchers, wrapped as a form with lightning_attn's signature, go through tnllm.testing against
the fp64 oracle (outputs, final states, all gradients) at tile/chunk/split/tail edges, and through
the edge contract, with poisoned (NaN) allocations so that an element never written fails.
"""
import dataclasses
import functools
import math
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 (run through tests/ops/test_triton.py)", allow_module_level=True)
pytest.importorskip("triton")

import tnllm.testing as tt  # noqa: E402
from tnllm.ops import norm_triton as nt  # noqa: E402
from tnllm.ops.lightning_attn import op as la_op  # noqa: E402
from tnllm.ops.lightning_attn import triton as tri  # noqa: E402
from tnllm.ops.lightning_attn._common import check_inputs, empty_grad  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

assert isinstance(tri._la_sweep_kernel, InterpretedFunction), "the kernels were decorated without the interpreter"


class _TritonFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, s, S0, cfg):
        with tt.poisoned_allocations():
            o, S = tri.lightning_attn_fwd_triton(q, k, v, s, S0, cfg=cfg)
        ctx.save_for_backward(q, k, v, s, S0)
        ctx.cfg = cfg
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        q, k, v, s, S0 = ctx.saved_tensors
        cfgs = None if ctx.cfg is None else {n: ctx.cfg for n in ("dq", "dk", "dv", "dkdv")}
        with tt.poisoned_allocations():
            dq, dk, dv, dS0 = tri.lightning_attn_bwd_triton(do.contiguous(), dS, q, k, v, s, S0, cfgs=cfgs)
        for g, x in ((dq, q), (dk, k), (dv, v)):     # the fake kernel's layout rule (empty_grad)
            assert g.stride() == empty_grad(x).stride(), (g.stride(), x.stride())
        assert dS0.is_contiguous()
        return dq, dk, dv, None, (dS0 if S0 is not None else None), None


def triton_form(q, k, v, s, initial_state=None, output_final_state=False, cfg=None):
    """The Triton launchers as a form with lightning_attn's signature (autograd through the backward launcher)."""
    check_inputs(q, k, v, s, initial_state)
    S0 = initial_state.float() if initial_state is not None else None
    o, S = _TritonFn.apply(q, k, v, s, S0, cfg)
    return (o, S) if output_final_state else o


def check(B, H, T, Dk, Dv, dtype, seed, state, cfg=None, rates=None, layout="contiguous"):
    rates = rates or tuple(0.1 + 0.8 * h for h in range(H))
    case = tt.Case(B, H, T, Dk, Dv, dtype, layout=layout, rates=rates, state=state, seed=seed)
    tt.check_case(functools.partial(triton_form, cfg=cfg), case)


class _Spy:
    """Counts the launches of a kernel (``kernel[grid](...)``)."""
    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,H,T,Dk,Dv", [
    (1, 2, 1, 16, 16), (1, 2, 63, 16, 32), (2, 1, 65, 32, 16), (1, 2, 130, 24, 40), (1, 1, 257, 16, 16),
], ids=lambda x: str(x))
@pytest.mark.parametrize("state", [False, True], ids=["nostate", "state"])
def test_kernels_match_naive(B, H, T, Dk, Dv, dtype, state):
    check(B, H, T, Dk, Dv, dtype, seed=T * 7 + Dk, state=state)


@pytest.mark.parametrize("cfg", [
    tri.SweepConfig(BC=16, CHUNK=16, n_split=1),
    tri.SweepConfig(BC=16, CHUNK=16, n_split=3),     # splits with a state pre-pass, tail in the last split
    tri.SweepConfig(BC=16, CHUNK=32, n_split=2),
    tri.SweepConfig(BC=32, CHUNK=16, n_split=8),     # more splits asked than chunks of 16 allow evenly
], ids=lambda c: f"BC{c.BC}-C{c.CHUNK}-split{c.n_split}")
def test_tiles_chunks_splits(cfg):
    check(2, 2, 150, 20, 36, torch.float32, seed=cfg.n_split + cfg.CHUNK, state=True, cfg=cfg, rates=(0.0, math.inf))


@pytest.mark.parametrize("Dk,Dv", [(136, 24), (24, 136), (144, 144)], ids=str)
def test_wide_heads_split_into_launches(Dk, Dv):
    """Dk or Dv over 128 (the LRPE layer has Dk = 2e): column slices and summed partial sweeps."""
    check(1, 2, 70, Dk, Dv, torch.float32, seed=Dk + Dv, state=True)


@pytest.mark.parametrize("T,Dk,Dv,n_split", [(96, 256, 128, 1), (70, 136, 24, 2), (64, 24, 144, 1), (96, 256, 256, 3)],
                         ids=["even-256x128", "tail-136x24-split2", "24x144", "256x256-split3"])
def test_wide_heads_one_launch(T, Dk, Dv, n_split, monkeypatch):
    """WIDE_ONE_LAUNCH: 16-bit sweeps with Dk or Dv over 128 in one launch each (DA over 128 on WIDE_DA_CONFIG's
    [DA, 32] tile over 32-row chunks, on the transposed state; DC over 128 in more column tiles), against the oracle
    at an even length and a tail, with splits, an initial state and infinite decay, and equal to the launches cut at
    128 on the same inputs to fp16 rounding; fp32 keeps the cut."""
    monkeypatch.setattr(tri, "WIDE_ONE_LAUNCH", True)
    assert tri.default_config(256, 128, torch.float16) == tri.WIDE_DA_CONFIG
    spy = _Spy(tri._la_sweep_kernel)
    monkeypatch.setattr(tri, "_la_sweep_kernel", spy)
    S0 = torch.randn(1, 2, Dk, Dv)
    s = torch.tensor([0.05, math.inf])
    q, k, v = (torch.randn(1, 2, T, D, dtype=torch.float16) for D in (Dk, Dk, Dv))
    q, k = q / Dk ** 0.5, k / Dk ** 0.5
    cfg = None if n_split == 1 else tri.SweepConfig(BC=32, CHUNK=32, n_split=n_split)
    tri.lightning_attn_fwd_triton(q, k, v, s, S0, cfg=cfg)
    assert spy.launches == 2, f"the forward took {spy.launches} launches (unmasked + redo expected: 2)"
    check(1, 2, T, Dk, Dv, torch.float16, seed=T + Dk + Dv, state=True, cfg=cfg, rates=(0.05, math.inf))
    got = triton_form(q, k, v, s, S0, output_final_state=True)
    monkeypatch.setattr(tri, "WIDE_ONE_LAUNCH", False)
    want = triton_form(q, k, v, s, S0, output_final_state=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)
    spy.launches = 0
    monkeypatch.setattr(tri, "WIDE_ONE_LAUNCH", True)
    tri.lightning_attn_fwd_triton(q.float(), k.float(), v.float(), s, S0)
    assert spy.launches == ((Dk + 127) // 128) * ((Dv + 127) // 128), "fp32 is cut into launches of <= 128"


@pytest.mark.parametrize("T,n_split", [(96, 0), (70, 2)], ids=["even", "tail-split2"])
def test_wide_da_candidate_tile(T, n_split, monkeypatch):
    """WIDE_DA_CONFIG as a [256, 64] tile over 32-row chunks in 8 warps (bench/attention.py tnllm_wideda64x32w8: half
    the programs of the default [256, 32] tile, so q and k are read by two programs per head instead of four; compiled
    for sm_90 it spills nothing with triton 3.6): against the oracle with an initial state and infinite decay, at an
    even length and at a tail with two splits, and equal to the default tile on the same inputs to fp16 rounding."""
    monkeypatch.setattr(tri, "WIDE_ONE_LAUNCH", True)
    S0 = torch.randn(1, 2, 256, 128)
    s = torch.tensor([0.05, math.inf])
    q, k, v = (torch.randn(1, 2, T, D, dtype=torch.float16) for D in (256, 256, 128))
    q, k = q / 16, k / 16
    want = triton_form(q, k, v, s, S0, output_final_state=True)
    cand = dataclasses.replace(tri.SweepConfig.from_spec("64x32w8"), n_split=n_split)
    monkeypatch.setattr(tri, "WIDE_DA_CONFIG", cand)
    assert tri.default_config(256, 128, torch.float16) == cand
    spy = _KwSpy(tri._la_sweep_kernel)
    monkeypatch.setattr(tri, "_la_sweep_kernel", spy)
    got = triton_form(q, k, v, s, S0, output_final_state=True)
    assert {(kw["BA"], kw["BC"], kw["CHUNK"], kw["num_warps"]) for kw in spy.calls} == {(256, 64, 32, 8)}
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)
    check(1, 2, T, 256, 128, torch.float16, seed=T + 1, state=True, rates=(0.05, math.inf))


def test_noncontiguous_inputs_and_fast_decay():
    check(2, 2, 70, 16, 16, torch.float32, seed=3, state=True, layout="bthd", rates=(8.0, 1e4))
    check(1, 2, 40, 16, 8, torch.float16, seed=4, state=True, layout="padded", rates=(0.5, 2.0))


def test_slow_decay_long_split():
    # lam ~ 1 - 1e-6: every position sees the whole prefix; with 5 splits of 2 chunks
    check(1, 2, 600, 16, 16, torch.float32, seed=5, state=True, rates=(1e-6, 0.0),
          cfg=tri.SweepConfig(BC=16, CHUNK=64, n_split=5))


def test_auto_split_through_the_launchers(monkeypatch):
    """AUTO_SPLIT on, 8 SMs: 2 programs (B*H = 2, one DC tile) over 10 chunks of 64 -> 2 splits, chosen by the
    launcher itself (no SweepConfig): outputs, states and gradients against the oracle."""
    spy = _Spy(tri._la_local_state_kernel)          # counts the split pre-pass launches
    monkeypatch.setattr(tri, "_la_local_state_kernel", spy)
    monkeypatch.setattr(tri, "AUTO_SPLIT", True)
    monkeypatch.setattr(tri, "_num_sms", lambda device: 8)
    assert tri.auto_split(2, 10, 8) == 2
    check(1, 2, 600, 16, 16, torch.float32, seed=9, state=True)
    assert spy.launches >= 3, "the launcher did not split (a pre-pass for fwd, dq, and one shared by dv and dk)"


@pytest.mark.parametrize("Dk,Dv,cfg", [
    (16, 16, None),                                            # automatic split (8 SMs), equal widths
    (16, 24, None),                                            # Dk != Dv: the dk sweep reads [Dk, Dv] states transposed
    (20, 36, tri.SweepConfig(BC=16, CHUNK=16, n_split=3)),     # several DC tiles (3 for dv, 2 for dk), a tail
], ids=["auto-16x16", "auto-16x24", "split3-20x36"])
def test_dk_sweep_reuses_the_dv_pre_pass(Dk, Dv, cfg, monkeypatch):
    """The unfused backward (fp32) runs the dv sweep first and its split pre-pass (local states of q^T do) serves
    the dk sweep transposed: three pre-pass launches per forward + backward (forward, dq, dv) instead of four,
    with outputs, states and gradients against the oracle. Where the two plans differ, each sweep runs its own
    pre-pass (two in a backward whose dq sweep does not split), with the same gradients as unsplit sweeps."""
    spy = _Spy(tri._la_local_state_kernel)
    monkeypatch.setattr(tri, "_la_local_state_kernel", spy)
    monkeypatch.setattr(tri, "_num_sms", lambda device: 8)
    check(1, 2, 600, Dk, Dv, torch.float32, seed=Dk + Dv, state=True, cfg=cfg)
    assert spy.launches == 3, spy.launches
    # mirrored widths but a different split plan (the dk sweep forced to 2 splits, dv to 3): no sharing
    spy.launches = 0
    q, k, v = (torch.randn(1, 2, 300, D, dtype=torch.float32) for D in (Dk, Dk, Dv))
    do = torch.randn(1, 2, 300, Dv)
    s = torch.tensor([0.2, 0.9])
    cfgs = {"dq": tri.SweepConfig(BC=16, CHUNK=16, n_split=1), "dk": tri.SweepConfig(BC=16, CHUNK=16, n_split=2),
            "dv": tri.SweepConfig(BC=16, CHUNK=16, n_split=3)}
    got = tri.lightning_attn_bwd_triton(do, None, q, k, v, s, None, cfgs=cfgs)
    assert spy.launches == 2, spy.launches
    ref = tri.lightning_attn_bwd_triton(do, None, q, k, v, s, None,
                                        cfgs={n: tri.SweepConfig(BC=16, CHUNK=16, n_split=1) for n in cfgs})
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prepass_bc", [None, 16, 64], ids=lambda b: f"prepass{b}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_prepass_width(prepass_bc, dtype, monkeypatch):
    """PREPASS_BC: the split pre-pass in state tiles of its own width (one [DA, DC] tile where DC fits, several
    where it does not; None: the sweep's tiles), the sweeps in tiles of 16 columns; fp32 keeps the sweep's tiles.
    Outputs, states and all gradients against the oracle, with a tail, several DC tiles, the dk sweep reading the dv pre-pass transposed
    and the fused dk/dv sweep's pre-pass (fp16)."""
    widths = []
    real = tri._la_local_state_kernel

    class Spy(_Spy):
        def __getitem__(self, grid):
            widths.append(grid[0] if isinstance(grid, tuple) else grid)
            return super().__getitem__(grid)
    monkeypatch.setattr(tri, "_la_local_state_kernel", Spy(real))
    monkeypatch.setattr(tri, "PREPASS_BC", prepass_bc)
    cfg = tri.SweepConfig(BC=16, CHUNK=16, n_split=3)
    check(2, 2, 150, 20, 36, dtype, seed=prepass_bc or 0, state=True, cfg=cfg)
    assert widths, "no pre-pass ran"
    # the forward's pre-pass: B * H * (n_split - 1) programs times its column tiles (DC = 36)
    tiles = -(-36 // (16 if dtype == torch.float32 or prepass_bc is None else min(prepass_bc, 64)))
    assert widths[0] == 2 * 2 * 2 * tiles, (widths, tiles)


@pytest.mark.parametrize("Dk,Dv,dtype,n_split", [
    (20, 36, torch.float32, 3),     # two sweeps, the dk sweep reading the dv pre-pass's prefixes transposed
    (20, 36, torch.float16, 4),     # the fused dk/dv sweep (fp16 at widths <= 64) from prefixes
    (16, 16, torch.float32, 2),     # one earlier split: the prefix launch is skipped, PREFIX still read
], ids=["fp32-split3", "fp16-split4", "fp32-split2"])
def test_prefix_scan(Dk, Dv, dtype, n_split, monkeypatch):
    """PREFIX_SCAN: the pre-pass's local states folded into prefixes by _la_prefix_kernel, each sweep program
    reading one tile. Outputs, states (S0 decayed over the earlier splits in one power) and all gradients against
    the oracle, with fast and infinite decays, and equal to the sweeps without it."""
    spy = _Spy(tri._la_prefix_kernel)
    monkeypatch.setattr(tri, "_la_prefix_kernel", spy)
    monkeypatch.setattr(tri, "PREFIX_SCAN", True)
    cfg = tri.SweepConfig(BC=16, CHUNK=16, n_split=n_split)
    check(2, 2, 150, Dk, Dv, dtype, seed=n_split, state=True, cfg=cfg, rates=(0.05, math.inf))
    assert spy.launches == (0 if n_split == 2 else 3), spy.launches   # forward, dq, dv (dk) or dk/dv
    q, k, v = (torch.randn(1, 2, 200, D, dtype=torch.float32) for D in (Dk, Dk, Dv))
    s, S0 = torch.tensor([0.02, 0.7]), torch.randn(1, 2, Dk, Dv)
    got = tri.lightning_attn_fwd_triton(q, k, v, s, S0, cfg=cfg)
    monkeypatch.setattr(tri, "PREFIX_SCAN", False)
    want = tri.lightning_attn_fwd_triton(q, k, v, s, S0, cfg=cfg)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kdec_on_c,unmasked_where", [(True, False), (False, True), (True, True), (False, False)],
                         ids=["default", "as-before", "kdec-c-where", "kdec-b-nowhere"])
def test_sweep_loop_settings(kdec_on_c, unmasked_where, monkeypatch):
    """KDEC_ON_C (the state update's decay on the C tile where it is no wider than Bm's: here Dk 32 / BC 16, and
    BC 32 over Dk 16, where it stays on Bm) and UNMASKED_WHERE (the unmasked loop's scores masked by a where, not
    by the decay matrix alone): every combination against the oracle, in fp16 (the unmasked loop, then the redo)
    and in fp32 forced to the same optimistic mode, with splits, a tail, an initial state and infinite decay; and
    a NaN / inf in q, k, v or do stays causal in all four sweeps."""
    monkeypatch.setattr(tri, "KDEC_ON_C", kdec_on_c)
    monkeypatch.setattr(tri, "UNMASKED_WHERE", unmasked_where)
    for dtype in (torch.float16, torch.float32):
        for Dk, Dv, BC in ((32, 20, 16), (16, 40, 32)):
            cfg = tri.SweepConfig(BC=BC, CHUNK=16, n_split=3, nonfinite=2)
            check(2, 2, 150, Dk, Dv, dtype, seed=Dk + BC, state=True, cfg=cfg, rates=(0.3, math.inf))
    cfg = tri.SweepConfig(BC=16, CHUNK=16, n_split=2, nonfinite=2)
    tt.assert_edge_semantics(functools.partial(triton_form, cfg=cfg), dtypes=(torch.float16,), max_examples=4,
                             max_T=50, dims=(16, 32), bad_rates=False, names=("q", "k", "v", "do"))


def _fwd_bwd_96(dtype, cfg):
    """A run() giving (o, S, dq, dk, dv) of the Triton form on fixed inputs (B1 H2 T96, Dk 32, Dv 48, an initial
    state), to compare the kernels under two settings."""
    q, k, v = (torch.randn(1, 2, 96, D, dtype=dtype) for D in (32, 32, 48))
    s, S0, do = torch.tensor([0.05, 0.9]), torch.randn(1, 2, 32, 48), torch.randn(1, 2, 96, 48, dtype=dtype)

    def run():
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        o, S = triton_form(*x, s, S0, output_final_state=True, cfg=cfg)
        o.backward(do)
        return (o.detach(), S.detach(), *(t.grad for t in x))
    return run


@pytest.mark.parametrize("setting", ["AUTO_SPLIT", "PREFIX_SCAN", "KDEC_ON_C", "UNMASKED_WHERE", "EVEN_TILES",
                                     "STATE_T", "DIAG_DECAY", "WIDE_ONE_LAUNCH"])
def test_boolean_settings_are_checked(setting, monkeypatch):
    """Each boolean setting of the Triton path, set to something else, gives a ValueError naming it at the next
    launch that reads it (here a split forward + backward in fp16: every setting is read), not a silently truthy
    kernel flag."""
    monkeypatch.setattr(tri, setting, "yes")
    with pytest.raises(ValueError, match=f"{setting} must be True(,| or) False"):
        check(1, 1, 64, 32, 16, torch.float16, seed=1, state=False, cfg=tri.SweepConfig(BC=16, CHUNK=16, n_split=0))


class _KwSpy:
    """Records the keyword arguments (constexprs, launch options) of each launch of a kernel."""
    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        run = self.kernel[grid]

        def call(*args, **kw):
            self.calls.append(kw)
            return run(*args, **kw)
        return call


def test_state_t_auto_by_tile_rows(monkeypatch):
    """STATE_T "auto" (the default) runs the transposed-state loop for state tiles of 128 rows or more at lengths
    that are a multiple of the chunk rows (measured faster at D128, slower at D64), not below and not at other
    lengths; True / False force it; DA over 128 (WIDE_ONE_LAUNCH) always takes it. Forward sweeps of fp16 inputs,
    read from the launches' constexprs."""
    spy = _KwSpy(tri._la_sweep_kernel)
    monkeypatch.setattr(tri, "_la_sweep_kernel", spy)
    assert tri.STATE_T == "auto"

    def st(D, Dk=None, T=64):
        spy.calls.clear()
        q, k, v = (torch.randn(1, 1, T, n, dtype=torch.float16) for n in (Dk or D, Dk or D, D))
        tri.lightning_attn_fwd_triton(q, k, v, torch.tensor([0.5]), None)
        return {c["ST"] for c in spy.calls}
    assert st(128) == {True} and st(64) == {False}
    assert st(128, T=60) == {False} and st(100) == {False}       # a tail; 100 of a 128-row tile: masked loads
    assert st(64, Dk=256) == {True} and st(64, Dk=256, T=60) == {True}
    monkeypatch.setattr(tri, "STATE_T", True)
    assert st(64) == {True}
    monkeypatch.setattr(tri, "STATE_T", False)
    assert st(128) == {False}


@pytest.mark.parametrize("setting", ["STATE_T", "DIAG_DECAY"])
def test_transposed_state_loop(setting, monkeypatch):
    """STATE_T (the sweep's loop on the transposed state, its register operands on the left of each product) and
    DIAG_DECAY (the split pre-pass's decayed Bm^T and the fused dk/dv sweep's decayed q^T as products with
    diag(kdec)): against the oracle in fp16 with splits, a tail and an even length, an initial state and infinite
    decay, at state tiles narrower and wider than C's; equal to the default kernels on the same inputs; and a NaN /
    inf in q, k, v or do stays causal (through the unmasked loop's flag and the masked redo, both in the same
    form). The exact isolation properties with the setting on: the interpreter suite under
    ``pytest --triton-setting STATE_T=True``."""
    monkeypatch.setattr(tri, setting, True)
    for T, Dk, Dv, BC in ((150, 32, 20, 16), (160, 16, 40, 32), (96, 32, 32, 32)):
        cfg = tri.SweepConfig(BC=BC, CHUNK=16, n_split=3, nonfinite=2)
        check(2, 2, T, Dk, Dv, torch.float16, seed=T + Dk, state=True, cfg=cfg, rates=(0.3, math.inf))
    run = _fwd_bwd_96(torch.float16, tri.SweepConfig(BC=16, CHUNK=16, n_split=2))
    got = run()
    monkeypatch.setattr(tri, setting, False)
    want = run()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
    cfg = tri.SweepConfig(BC=16, CHUNK=16, n_split=2)
    monkeypatch.setattr(tri, setting, True)
    tt.assert_edge_semantics(functools.partial(triton_form, cfg=cfg), dtypes=(torch.float16,), max_examples=4,
                             max_T=50, dims=(16, 32), bad_rates=False, names=("q", "k", "v", "do"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_even_tiles(dtype, monkeypatch):
    """EVEN_TILES: a length divisible by the chunk rows, with state tiles exactly the widths, runs the sweeps (and in
    fp16 the fused dk/dv sweep) without masks, their in-chunk decays hoisted; other lengths and widths keep the
    masked loops. Against the oracle (outputs, states, all gradients, splits, an initial state, infinite decay),
    and equal to the masked loop on the same inputs."""
    assert tri.EVEN_TILES is True                                     # the default
    evens = []

    class Spy(_Spy):
        def __getitem__(self, grid):
            run = super().__getitem__(grid)

            def call(*args, **kw):
                evens.append((self.name, kw["EVEN"]))
                return run(*args, **kw)
            return call
    for name in ("_la_sweep_kernel", "_la_dkdv_kernel"):
        spy = Spy(getattr(tri, name))
        spy.name = name
        monkeypatch.setattr(tri, name, spy)
    cfg = tri.SweepConfig(BC=16, CHUNK=16, n_split=3)
    with pytest.raises(ValueError, match="EVEN_TILES"):
        monkeypatch.setattr(tri, "EVEN_TILES", "auto")
        check(1, 1, 64, 128, 16, dtype, seed=5, state=False, cfg=cfg)
    evens.clear()
    monkeypatch.setattr(tri, "EVEN_TILES", True)                      # the default: wherever it applies
    check(2, 2, 160, 32, 16, dtype, seed=7, state=True, cfg=cfg, rates=(0.3, math.inf))
    kernels = {n for n, _ in evens}
    assert kernels == ({"_la_sweep_kernel", "_la_dkdv_kernel"} if dtype == torch.float16 else {"_la_sweep_kernel"})
    assert all(e for _, e in evens), evens
    evens.clear()
    check(1, 2, 150, 32, 16, dtype, seed=8, state=True, cfg=cfg)          # a tail chunk: masked
    check(1, 2, 160, 20, 16, dtype, seed=9, state=False, cfg=cfg)         # Dk 20 in a 32-wide tile: masked
    assert evens and not any(e for _, e in evens), evens
    run = _fwd_bwd_96(dtype, cfg)
    got = run()
    monkeypatch.setattr(tri, "EVEN_TILES", False)
    want = run()
    tol = 1e-3 if dtype == torch.float16 else 1e-5
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("Dk,Dv", [(16, 24), (64, 64), (144, 24)], ids=str)   # fused dk/dv at 64; cut at 144
def test_backward_writes_token_major_gradients(Dk, Dv):
    """Token-major q, k, v ([B, T, H, D] memory, as the model's head slices): the launchers write dq, dk, dv
    token-major (``empty_grad``), with the same values as for contiguous copies of the inputs."""
    from tnllm.ops.lightning_attn._common import token_major
    case = tt.Case(2, 3, 70, Dk, Dv, torch.float16, layout="bthd", rates=(0.1, 0.5, 0.9), state=True, seed=3)
    q, k, v, s, S0, do, dS = tt.make_inputs(case)
    q, k, v, S0 = (x.detach() for x in (q, k, v, S0))
    assert token_major(q) and token_major(v)
    got = tri.lightning_attn_bwd_triton(do, dS.float(), q, k, v, s, S0.float())
    ref = tri.lightning_attn_bwd_triton(do, dS.float(), q.contiguous(), k.contiguous(), v.contiguous(), s, S0.float())
    for g, r, x in zip(got[:3], ref[:3], (q, k, v)):
        assert token_major(g) and g.stride() == x.new_empty(2, 70, 3, x.shape[-1]).transpose(1, 2).stride()
        assert not token_major(r) and r.is_contiguous()
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    torch.testing.assert_close(got[3], ref[3], rtol=0, atol=0)


def test_backward_fallback_keeps_the_gradient_layout():
    """Inputs the kernels do not take (fp64 here) go to the blocked form, whose gradients are then laid out as the
    sweeps' (``empty_grad``): token-major for token-major q, k, v, as the fake kernel says."""
    from tnllm.ops.lightning_attn._common import token_major
    case = tt.Case(1, 2, 40, 8, 4, torch.float64, layout="bthd", rates=(0.2, 0.7), state=False, seed=5)
    q, k, v, s, _, do, _ = tt.make_inputs(case)
    q, k, v = (x.detach() for x in (q, k, v))
    assert not tri.supported(q, v)
    got = tri.lightning_attn_bwd_triton(do, None, q, k, v, s, None)
    for g, x in zip(got[:3], (q, k, v)):
        assert token_major(g) and g.stride() == empty_grad(x).stride()


def test_default_chunk_rows_through_the_launchers(monkeypatch):
    """CHUNK_ROWS sets the chunk of the launchers' default configuration (read at each launch): 32 rows over a
    tail of 70 = 2 * 32 + 6, fp16 and fp32, against the oracle."""
    monkeypatch.setattr(tri, "CHUNK_ROWS", 32)
    assert tri.default_config(128, 64, torch.bfloat16).CHUNK == 32
    for dtype in (torch.float16, torch.float32):
        check(1, 2, 70, 16, 24, dtype, seed=11, state=True)


def test_wide_config_through_the_launchers(monkeypatch):
    """WIDE_CONFIG replaces the default configuration of the 16-bit sweeps wider than 64 columns (read at each
    launch): one [DA, 128] state tile in 8 warps, chunks of 32, over a tail of 70 and a Dv of 96 (masked state
    columns), with an automatic split; fp32 keeps its narrow tiles. Against the oracle."""
    wide = tri.SweepConfig(BC=128, CHUNK=32, num_warps=8, num_stages=2)
    monkeypatch.setattr(tri, "WIDE_CONFIG", wide)
    assert tri.default_config(128, 128, torch.bfloat16) == wide and tri.default_config(128, 96, torch.float16) == wide
    assert tri.default_config(128, 64, torch.float16).BC == 64 and tri.default_config(128, 128, torch.float32).BC == 32
    for dtype in (torch.float16, torch.float32):
        check(1, 2, 70, 24, 96, dtype, seed=12, state=True)
    monkeypatch.setattr(tri, "WIDE_CONFIG", dataclasses.replace(wide, n_split=2))
    check(1, 2, 70, 24, 96, torch.float16, seed=13, state=True)
    monkeypatch.setattr(tri, "WIDE_CONFIG", wide)
    chosen = []
    default_config = tri.default_config
    monkeypatch.setattr(tri, "default_config", lambda *a: chosen.append(default_config(*a)) or chosen[-1])
    tt.assert_forms_agree(triton_form, dtypes=(torch.float16,), max_examples=4, max_T=80, dims=(72, 96, 128))
    assert wide in chosen, "no sweep of the property run took the wide configuration"


@pytest.fixture
def dkdv_spy(monkeypatch):
    """The fused dk/dv sweep forced on at every width (the default takes it only for Dk, Dv <= 64), counted."""
    spy = _Spy(tri._la_dkdv_kernel)
    monkeypatch.setattr(tri, "_la_dkdv_kernel", spy)
    monkeypatch.setattr(tri, "FUSED_DKDV", True)
    return spy


@pytest.mark.parametrize("Dk,Dv,fused", [(64, 64, True), (16, 48, True), (64, 128, False), (128, 128, False)], ids=str)
def test_fused_dkdv_default_by_width(Dk, Dv, fused, monkeypatch):
    """By default fp16 / bf16 take the fused sweep for Dk, Dv <= 64 and the two sweeps above; fp32 never fuses."""
    spy = _Spy(tri._la_dkdv_kernel)
    monkeypatch.setattr(tri, "_la_dkdv_kernel", spy)
    for dtype, want in ((torch.float16, fused), (torch.float32, False)):
        q, k, v, s, S0, do, dS = tt.make_inputs(tt.Case(1, 1, 20, Dk, Dv, dtype, rates=(0.3,), state=True, seed=1))
        spy.launches = 0
        tri.lightning_attn_bwd_triton(do, dS.float(), q.detach(), k.detach(), v.detach(), s, S0.detach().float())
        assert (spy.launches > 0) == want, (dtype, Dk, Dv)


@pytest.mark.parametrize("shape,cfg", [
    ((1, 2, 63, 16, 32), None),
    ((2, 1, 65, 32, 16), None),
    ((1, 1, 257, 16, 16), None),
    ((2, 2, 150, 20, 36), tri.SweepConfig(BC=16, CHUNK=16, n_split=3)),   # splits: G's local-state pre-pass
    ((1, 2, 150, 16, 24), tri.SweepConfig(BC=16, CHUNK=32, n_split=8)),   # more splits than fit evenly
    ((1, 2, 70, 136, 24), None),             # Dk over 128: state row blocks, partial dv summed
    ((1, 2, 70, 24, 136), None),             # Dv over 128: column blocks, partial dk summed
    ((1, 2, 40, 144, 144), None),
], ids=str)
@pytest.mark.parametrize("state", [False, True], ids=["nostate", "state"])
def test_fused_dkdv_sweep(shape, cfg, state, dkdv_spy):
    """fp16 / bf16 take dk and dv from one reverse sweep (_la_dkdv_kernel): outputs, final state and every
    gradient against the fp64 oracle, at chunk tails, splits and wide heads."""
    B, H, T, Dk, Dv = shape
    check(B, H, T, Dk, Dv, torch.float16, seed=T + Dk + Dv, state=state, cfg=cfg)
    assert dkdv_spy.launches >= 2, "the backward did not run the fused dk/dv sweep"


def test_fused_dkdv_equals_the_two_sweeps(monkeypatch):
    """The fused sweep against the two separate dk / dv sweeps on the same fp16 inputs (also through splits)."""
    case = tt.Case(2, 2, 200, 32, 48, torch.float16, rates=(0.05, 1.5), state=True, seed=21)
    q, k, v, s, S0, do, dS = tt.make_inputs(case)
    q, k, v, S0 = q.detach(), k.detach(), v.detach(), S0.detach().float()
    for cfg in (None, tri.SweepConfig(BC=16, CHUNK=32, n_split=3)):
        cfgs = None if cfg is None else {n: cfg for n in ("dq", "dk", "dv", "dkdv")}
        monkeypatch.setattr(tri, "FUSED_DKDV", True)
        got = tri.lightning_attn_bwd_triton(do, dS.float(), q, k, v, s, S0, cfgs=cfgs)
        monkeypatch.setattr(tri, "FUSED_DKDV", False)
        ref = tri.lightning_attn_bwd_triton(do, dS.float(), q, k, v, s, S0, cfgs=cfgs)
        for name, a, b in zip(("dq", "dk", "dv", "dS0"), got, ref):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert tt.rel_err(a, b.double()) <= 2e-3, name


@pytest.mark.parametrize("nf", [1, 2], ids=["masked", "flagged"])
def test_fused_dkdv_edge_semantics(nf, dkdv_spy):
    """The fused sweep keeps NaN/inf causal (q's in dk, do's in dv: the two masked intra products) in fp16, in
    both masking modes."""
    tt.assert_edge_semantics(functools.partial(triton_form, cfg=tri.SweepConfig(BC=16, CHUNK=16, n_split=3, nonfinite=nf)),
                             dtypes=(torch.float16,), max_examples=8, max_T=70, dims=(8, 16), bad_rates=False,
                             names=("q", "k", "v", "do"))
    assert dkdv_spy.launches > 0


def test_kernels_property():
    for cfg in (None, tri.SweepConfig(BC=16, CHUNK=16, n_split=3)):
        tt.assert_forms_agree(functools.partial(triton_form, cfg=cfg), dtypes=(torch.float32, torch.float16),
                              max_examples=5, max_T=100, dims=(8, 16, 24, 40))


@pytest.mark.parametrize("nf", [1, 2], ids=["masked", "flagged"])
def test_kernels_edge_semantics(nf):
    """NaN/inf at t (in q, k, v or the output gradient) stays causal in all four sweeps (forward and the three
    backward ones), s = inf is lambda = 0, for each of the sweep's non-finite-safe masking modes."""
    tt.assert_edge_semantics(functools.partial(triton_form, cfg=tri.SweepConfig(BC=16, CHUNK=16, n_split=3, nonfinite=nf)),
                             dtypes=(torch.float32,), max_examples=8, max_T=70, dims=(8, 16), names=("q", "k", "v", "do"))


def test_unsafe_mode_is_unsafe():
    """The benchmark-only mode NF = 0 lets an inf in v reach earlier outputs (0 * inf): the safe modes are needed."""
    q, k, v = (torch.randn(1, 1, 16, 16) for _ in range(3))
    v[0, 0, 9, 3] = math.inf
    s = torch.tensor([0.5])
    o = triton_form(q, k, v, s, cfg=tri.SweepConfig(BC=16, CHUNK=16, nonfinite=0))
    assert not torch.isfinite(o[0, 0, :9]).all()
    o = triton_form(q, k, v, s, cfg=tri.SweepConfig(BC=16, CHUNK=16))
    assert torch.isfinite(o[0, 0, :9]).all()
    tt.assert_nonfinite_causal(triton_form, dtypes=(torch.float16,), max_examples=3, max_T=70, dims=(16,))


def test_no_state_still_returns_the_initial_state_gradient():
    """dS0 without a state is the gradient a zero initial state would get: lam^T dS + sum lam^(t+1) q^T do."""
    case = tt.Case(1, 2, 90, 16, 8, torch.float32, rates=(0.2, 0.7), state=False, seed=11)
    q, k, v, s, _, do, dS = tt.make_inputs(case)
    with tt.poisoned_allocations():
        dS0 = tri.lightning_attn_bwd_triton(do.float(), dS.float(), q.detach(), k.detach(), v.detach(), s, None)[3]
    Z = torch.zeros(1, 2, 16, 8, dtype=torch.float64, requires_grad=True)
    ref = tt.oracle(q, k, v, s, Z, do, dS)["dS0"]
    assert tt.rel_err(dS0, ref) <= tt.TOL[torch.float32]


def test_zero_length_and_fallbacks():
    q, k, v, s, S0, do, dS = tt.make_inputs(tt.Case(1, 2, 0, 16, 16, torch.float32, rates=(0.1, 0.2), seed=0))
    o, S = tri.lightning_attn_fwd_triton(q, k, v, s, S0)
    assert o.shape == (1, 2, 0, 16) and torch.equal(S, S0)
    dq, dk, dv, dS0 = tri.lightning_attn_bwd_triton(do.float(), dS.float(), q, k, v, s, S0)
    assert dq.shape == q.shape and torch.equal(dS0, dS.float())
    # fp64 is not a kernel dtype: the launchers fall back to the blocked form, same answers
    case = tt.Case(1, 2, 33, 8, 8, torch.float64, rates=(0.1, 0.2), seed=1)
    q, k, v, s, S0, do, dS = tt.make_inputs(case)
    o, S = tri.lightning_attn_fwd_triton(q, k, v, s, S0)
    assert tt.rel_err(o, tt.oracle(q, k, v, s, S0, do, dS)["o"]) <= tt.TOL[torch.float64]
    assert not tri.supported(q, v) and tri.supported(q.float(), v.float())


def test_cuda_registration_glue():
    """The functions registered for CUDA on the op, run here through the interpreter on CPU tensors."""
    case = tt.Case(1, 2, 40, 16, 16, torch.float32, rates=(0.3, 0.9), seed=2)
    q, k, v, s, S0, do, dS = tt.make_inputs(case)
    ref = tt.oracle(q, k, v, s, S0, do, dS)
    o, S = la_op._fwd_cuda(q.detach(), k.detach(), v.detach(), s, S0.detach(), 64)
    dq, dk, dv, dS0 = la_op._bwd_cuda(do.float(), dS.float(), q.detach(), k.detach(), v.detach(), s, S0.detach(), 64)
    for name, a in zip(("o", "S", "dq", "dk", "dv", "dS0"), (o, S, dq, dk, dv, dS0)):
        assert tt.rel_err(a, ref[name]) <= tt.TOL[torch.float32], name


# ---- fused SRMSNorm * u ------------------------------------------------------------------------

def _norm_inputs(B, H, T, E, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(B, T, H, E, generator=g).transpose(1, 2).to(dtype)          # [B, H, T, e] seen through [B, T, H, e] strides
    u = torch.randn(B, T, 2 * H * E, generator=g)[..., : H * E].to(dtype)       # a chunk of a wider projection
    dy = torch.randn(B, T, H * E, generator=g).to(dtype)
    return o, u, dy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,H,T,E", [(2, 3, 5, 24), (1, 4, 7, 32), (1, 1, 3, 16)], ids=str)
def test_norm_gate_kernels(B, H, T, E, dtype):
    o, u, dy = _norm_inputs(B, H, T, E, dtype, seed=B + H + T + E)
    ref = nt._reference(o, u)
    od, ud = o.double().requires_grad_(), u.double().requires_grad_()
    (nt._reference(od, ud) * dy.double()).sum().backward()
    with tt.poisoned_allocations():
        y = nt.srms_norm_gate_fwd_triton(o, u)
        dx, du = nt.srms_norm_gate_bwd_triton(dy, o, u)
    if dtype == torch.float16:   # same roundings as the unfused expression
        assert torch.equal(y, ref)
    assert tt.rel_err(y, ref) <= tt.TOL[dtype], 'y'
    assert tt.rel_err(dx, od.grad) <= tt.TOL[dtype], 'do'
    assert tt.rel_err(du, ud.grad) <= tt.TOL[dtype], 'du'
    assert dx.shape == o.shape and dx.is_contiguous() and du.is_contiguous()


def test_norm_gate_op_cpu():
    """On CPU the public function is exactly the unfused model expression; the op's CPU kernels agree."""
    from tnllm.ops import srms_norm
    o, u, dy = _norm_inputs(2, 2, 6, 16, torch.float32, seed=0)
    B, H, T, E = o.shape
    assert torch.equal(nt.srms_norm_gate(o, u), srms_norm(o.transpose(1, 2).reshape(B, T, -1)) * u)
    oo, uu = o.clone().requires_grad_(), u.clone().requires_grad_()
    y = torch.ops.tnllm.srms_norm_gate(oo, uu)
    (y * dy).sum().backward()
    od, ud = o.double().requires_grad_(), u.double().requires_grad_()
    (nt._reference(od, ud) * dy.double()).sum().backward()
    assert tt.rel_err(oo.grad, od.grad) <= tt.TOL[torch.float32], 'do'
    assert tt.rel_err(uu.grad, ud.grad) <= tt.TOL[torch.float32], 'du'
    torch.library.opcheck(torch.ops.tnllm.srms_norm_gate.default, (oo, uu))
    with pytest.raises(ValueError, match="u"):
        nt.srms_norm_gate(o, u[..., :-1])
    assert torch.equal(nt.srms_norm_gate(o, u.double()), srms_norm(o.transpose(1, 2).reshape(B, T, -1)) * u.double())
