"""A stack of decoder layers in one launch (tnllm.ops.decode_layer.decode_stack_step) on CPU under
TRITON_INTERPRET=1, against the fp32 reference of the same layers one after another:

* the persistent loop itself (the per-layer pointer table, the barrier count across layers, the next layer's
  tiles loaded ahead and masked off after the last, the counters reset) with one program, the only grid whose
  barriers the interpreter (programs one after another) can pass;
* the staged launches (five per layer) over program counts that cut the rows unevenly;
* 1 to 4 layers, LRPE on and off, fp32 and fp16, 1 to 4 rows, widths that are not multiples of the tiles,
  unaligned per-layer addresses (no vector hint), NaN-poisoned workspaces;
* the op's dispatch and the decoder's "stack" path, against the aten step.
"""
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/ops/test_triton.py (a child process)"
pytest.importorskip("triton")

from tnllm import TransNormerConfig, TransNormerLLM  # noqa: E402
from tnllm.compile import CudaGraphDecoder  # noqa: E402
from tnllm.ops.decode_layer import decode_stack_naive, decode_stack_step  # noqa: E402
from tnllm.ops.decode_layer import op as layer_op  # noqa: E402
from tnllm.ops.decode_layer import triton as tri  # noqa: E402
from tnllm.testing import TOL, decode_against_step, rel_err  # noqa: E402
from tnllm.testing import poisoned_allocations as poisoned  # noqa: E402


def make_stack(L, B, d, H, e, g, lrpe, seed, dtype=torch.float32):
    """x, the stacked state [L, B, H, Dk, e], the five per-layer weight lists, s, theta (or None), pos."""
    gen = torch.Generator().manual_seed(seed)
    h = H * e

    def w(n, k):
        return (torch.randn(n, k, generator=gen) * k ** -0.5).to(dtype)

    x = (torch.randn(B, d, generator=gen) * 2).to(dtype)
    S = torch.randn(L, B, H, 2 * e if lrpe else e, e, generator=gen)
    ws = [[w(4 * h, d) for _ in range(L)], [w(d, h) for _ in range(L)], [w(g, d) for _ in range(L)],
          [w(g, d) for _ in range(L)], [w(d, g) for _ in range(L)]]
    s = [torch.rand(H, generator=gen) * 2 for _ in range(L)]
    theta = [(10000 ** (-2 / h * torch.arange(h, dtype=torch.float32))).reshape(H, 1, e) * (1 + i)
             for i in range(L)] if lrpe else None
    pos = torch.randint(0, 200000, (B,), generator=gen) if lrpe else None
    return x, S, ws, s, theta, pos


def check(x, S, x_ref, S_ref, dtype, what):
    for name, got, ref in (("x", x, x_ref), ("state", S, S_ref)):
        err = rel_err(got, ref)
        assert err <= TOL[dtype], f"{name}: relative error {err:.3e} > {TOL[dtype]:.0e} ({dtype}, {what})"


def reference(x, S, ws, s, theta, pos, act, glu_act):
    return decode_stack_naive(x.float(), S, *([t.float() for t in wl] for wl in ws), s, theta, pos, act, glu_act)


@given(L=st.integers(1, 4), B=st.integers(1, tri.MAX_ROWS), d=st.sampled_from([8, 21, 30]), H=st.integers(1, 2),
       e=st.sampled_from([3, 4]), g=st.sampled_from([7, 20]), lrpe=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), act=st.sampled_from(["silu", "relu", "none"]),
       glu_act=st.sampled_from(["none", "silu"]), prefetch=st.booleans(), spin=st.integers(0, 1),
       seed=st.integers(0, 2**31 - 1))
def test_persistent_loop_matches_reference(L, B, d, H, e, g, lrpe, dtype, act, glu_act, prefetch, spin, seed):
    """The whole persistent launch (one program, every row of every tile in it) against the reference, and bit for
    bit against the staged launches of the same program count; the counters are back at zero afterwards."""
    x, S, ws, s, theta, pos = make_stack(L, B, d, H, e, g, lrpe, seed, dtype)
    x_ref, S_ref = reference(x, S, ws, s, theta, pos, act, glu_act)
    cfg = tri.LayerConfig(nprog=1, prefetch=prefetch, spin=spin)
    xp, Sp = x.clone(), S.clone()
    with poisoned():
        tri.decode_stack_triton(xp, Sp, *ws, s, theta, pos, act, glu_act, persistent=True, cfg=cfg)
    check(xp, Sp, x_ref, S_ref, dtype, f"persistent, L={L}, {cfg}")
    assert tri._counters(x.device).tolist() == [0, 0], "the barrier counters were not reset"
    xs, Ss = x.clone(), S.clone()
    tri.decode_stack_triton(xs, Ss, *ws, s, theta, pos, act, glu_act, persistent=False, cfg=cfg)
    assert torch.equal(xp, xs) and torch.equal(Sp, Ss), "persistent and staged launches differ"


@given(L=st.integers(1, 3), B=st.integers(1, tri.MAX_ROWS), d=st.sampled_from([8, 33]), H=st.integers(1, 3),
       e=st.sampled_from([4, 5]), g=st.sampled_from([7, 40]), lrpe=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), nprog=st.sampled_from([6, 13]),
       seed=st.integers(0, 2**31 - 1))
def test_staged_stack_matches_reference(L, B, d, H, e, g, lrpe, dtype, nprog, seed):
    """Several programs (rows cut unevenly), one launch per stage and layer, through the per-layer table rows."""
    x, S, ws, s, theta, pos = make_stack(L, B, d, H, e, g, lrpe, seed, dtype)
    x_ref, S_ref = reference(x, S, ws, s, theta, pos, "silu", "none")
    with poisoned():
        tri.decode_stack_triton(x, S, *ws, s, theta, pos, "silu", "none", persistent=False,
                                cfg=tri.LayerConfig(nprog=nprog))
    check(x, S, x_ref, S_ref, dtype, f"staged, L={L}, nprog={nprog}")


def test_table_is_built_once_per_set_of_addresses():
    x, S, ws, s, theta, pos = make_stack(2, 1, 8, 1, 4, 7, False, 0)
    cfg = tri.LayerConfig(nprog=1)
    tri.decode_stack_triton(x, S, *ws, s, theta, pos, "silu", "none", persistent=True, cfg=cfg)
    n = len(tri._TABLES)
    tri.decode_stack_triton(x, S, *ws, s, theta, pos, "silu", "none", persistent=True, cfg=cfg)
    assert len(tri._TABLES) == n, "a second call with the same tensors built a new table"
    ws[0][1] = ws[0][1].clone()
    tri.decode_stack_triton(x, S, *ws, s, theta, pos, "silu", "none", persistent=True, cfg=cfg)
    assert len(tri._TABLES) == n + 1, "a new weight tensor must give a new table"
    want = tuple(p for i in range(2) for p in [w[i].data_ptr() for w in ws] + [S[i].data_ptr()] + [s[i].data_ptr()] * 2)
    assert tri._TABLES[("cpu", None, want)].reshape(-1).tolist() == list(want), "the table's rows"


def test_unaligned_layers_run_without_the_vector_hint():
    """States of 1 x 1 x 3 x 3 fp32 (36 bytes) put layer 1's state at an address that is not a multiple of 16:
    the launch drops the alignment hint and stays exact."""
    x, S, ws, s, theta, pos = make_stack(3, 1, 8, 1, 3, 7, False, 5)
    assert S[1].data_ptr() % 16 != 0
    x_ref, S_ref = reference(x, S, ws, s, theta, pos, "silu", "none")
    tri.decode_stack_triton(x, S, *ws, s, theta, pos, "silu", "none", persistent=True, cfg=tri.LayerConfig(nprog=1))
    check(x, S, x_ref, S_ref, torch.float32, "unaligned")


def test_persistent_needs_cuda_or_one_program():
    x, S, ws, s, theta, pos = make_stack(2, 1, 8, 1, 4, 7, False, 0)
    with pytest.raises(ValueError, match=r"persistent=True.*LayerConfig\(nprog=1\)"):
        tri.decode_stack_triton(x, S, *ws, s, theta, pos, "silu", "none", persistent=True,
                                cfg=tri.LayerConfig(nprog=2))


def test_op_dispatch_by_rows(monkeypatch):
    """Up to MAX_ROWS rows the stack op launches the kernel; above it, the reference form: both equal the reference."""
    calls = []
    real = tri.decode_stack_triton
    monkeypatch.setattr(tri, "decode_stack_triton", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    layer_op.use_triton_on_cpu(True)
    try:
        for B in (1, tri.MAX_ROWS + 1):
            x, S, ws, s, theta, pos = make_stack(2, B, 16, 2, 4, 12, True, B)
            x_ref, S_ref = reference(x, S, ws, s, theta, pos, "silu", "none")
            assert decode_stack_step(x, S, *ws, s, theta, pos, "silu", "none") is x
            check(x, S, x_ref, S_ref, torch.float32, f"op, B={B}")
    finally:
        layer_op.use_triton_on_cpu(False)
    assert calls == [1]


@pytest.mark.parametrize("path,launches", [("layer", [1, 1, 1, 1]), ("stack", [1, 3])])
def test_decoder_layer_and_stack_paths_equal_model_step(monkeypatch, path, launches):
    """``CudaGraphDecoder(decode_path="layer" | "stack")`` on a 4-layer model (layer 0 with LRPE), against the aten
    step: the layer path one launch per layer, the stack path two (layer 0; layers 1-3 together) over the decoder's
    stacked state buffers (grids of 8 programs instead of an H200's 132, to keep the interpreter quick)."""
    monkeypatch.setattr(tri, "_num_sms", lambda device: 8)
    calls = []
    real = tri.decode_stack_triton
    monkeypatch.setattr(tri, "decode_stack_triton", lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k))
    layer_op.use_triton_on_cpu(True)
    try:
        torch.manual_seed(4)
        m = TransNormerLLM(TransNormerConfig.from_preset("tiny", decoder_layers=4)).eval()
        B = 2
        dec = CudaGraphDecoder(m, B, decode_path=path)
        assert [(a, b) for a, b, _ in dec.state_stacks] == [(0, 1), (1, 4)]
        pairs, got_states, want_states = decode_against_step(dec, m, torch.randint(1, 259, (B, 3)), 3)
        for t, (got, want) in enumerate(pairs):
            assert rel_err(got, want) < 1e-5, f"token {t}: logits relative error {rel_err(got, want):.2e}"
        for i, (a, b) in enumerate(zip(got_states, want_states)):
            assert rel_err(a, b) < 1e-5, f"state of layer {i}"
    finally:
        layer_op.use_triton_on_cpu(False)
    assert calls == launches * 3, f"expected launches of {launches} layers at every step, got {calls}"
    assert all(w is None for w in dec.fused._w12), "the stacked l1|l2 copies were made though nothing fell back"


@pytest.mark.parametrize("B,H,e,nprog,persistent", [(1, 1, 4, 1, True), (2, 2, 5, 6, False), (4, 3, 5, 6, False),
                                                     (1, 2, 3, 1, True)])
@pytest.mark.parametrize("lrpe", [False, True])
@pytest.mark.parametrize("prefetch", [False, True])
def test_token_mixer_one_item_per_program_and_loop(B, H, e, nprog, persistent, lrpe, prefetch):
    """At most one token-mixer item per program (its state tile read before the first barrier, with the prefetch),
    and more items than programs (each program's items in a loop): both paths against the reference."""
    items = B * H * -(-e // tri.block_v(B, H, e, nprog))
    assert (items <= nprog) == ((B, H) in ((1, 1), (2, 2))), "the cases must cover both mixer paths"
    x, S, ws, s, theta, pos = make_stack(2, B, 12, H, e, 9, lrpe, B * H * e + lrpe)
    x_ref, S_ref = reference(x, S, ws, s, theta, pos, "silu", "none")
    with poisoned():
        tri.decode_stack_triton(x, S, *ws, s, theta, pos, "silu", "none", persistent=persistent,
                                cfg=tri.LayerConfig(nprog=nprog, prefetch=prefetch))
    check(x, S, x_ref, S_ref, torch.float32, f"items={items}, nprog={nprog}")


def test_table_cache_is_bounded_and_keeps_pinned(monkeypatch):
    """Eager calls on ever new tensors do not grow the table cache past MAX_TABLES (least recently used dropped);
    a table a CUDA graph captured (pinned) is never dropped."""
    monkeypatch.setattr(tri, "MAX_TABLES", 3)
    monkeypatch.setattr(tri, "_TABLES", type(tri._TABLES)())
    monkeypatch.setattr(tri, "_PINNED", set())
    dev = torch.device("cpu")
    tri._table((1, 2, 3, 4, 5, 6, 7, 8), dev)
    tri._PINNED.add(("cpu", None, (1, 2, 3, 4, 5, 6, 7, 8)))
    for i in range(10):
        tri._table(tuple(range(16 * i, 16 * i + 8)), dev)
    assert len(tri._TABLES) == 3 + 1
    assert ("cpu", None, (1, 2, 3, 4, 5, 6, 7, 8)) in tri._TABLES
    assert ("cpu", None, tuple(range(144, 152))) in tri._TABLES


def test_direct_op_calls_are_checked():
    """``torch.ops.tnllm.decode_stack_step`` called directly (no public wrapper) with the kernel registered checks
    the shapes before any launch: a list one layer short is named, not read past its end."""
    x, S, ws, s, theta, pos = make_stack(2, 1, 8, 1, 4, 7, False, 0)
    layer_op.use_triton_on_cpu(True)
    try:
        with pytest.raises(ValueError, match="`w3` has 1 entries"):
            torch.ops.tnllm.decode_stack_step(x, S, *ws[:4], ws[4][:1], s, [], None, "silu", "none")
        with pytest.raises(ValueError, match="`wqkvu` must have shape"):
            torch.ops.tnllm.decode_layer_step(x, S[0], ws[0][0][:5], ws[1][0], ws[2][0], ws[3][0], ws[4][0], s[0], None,
                                              None, "silu", "none")
    finally:
        layer_op.use_triton_on_cpu(False)
