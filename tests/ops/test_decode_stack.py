"""tnllm.ops.decode_layer.decode_stack_step: L like decoder layers' decode step in one launch. On CPU (the
reference form): equal to the layers one after another, in place, opcheck, torch.compile(fullgraph=True); every
bad input named (with its layer); the runs of like layers and the stacked state buffers that the decoder's
"stack" path launches over. The Triton kernel under TRITON_INTERPRET=1:
tests/interpret/test_decode_stack_interpreted.py; on the GPU: tests/gpu/test_decode_layer_gpu.py."""
import pytest
import torch

from tnllm import TransNormerConfig, TransNormerLLM
from tnllm.compile import CudaGraphDecoder
from tnllm.compile.fused_step import FusedDecodeStep, stacked_zero_state, state_groups
from tnllm.ops.decode_layer import decode_layer_naive, decode_stack_naive, decode_stack_step


def _stack(L=3, B=2, d=16, H=2, e=4, g=12, lrpe=False, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)

    def w(n, k):
        return (torch.randn(n, k, generator=gen) * k ** -0.5).to(dtype)

    h = H * e
    x = torch.randn(B, d, generator=gen).to(dtype)
    S = torch.randn(L, B, H, 2 * e if lrpe else e, e, generator=gen, dtype=torch.float64 if dtype == torch.float64
                    else torch.float32)
    ws = [[w(4 * h, d) for _ in range(L)], [w(d, h) for _ in range(L)], [w(g, d) for _ in range(L)],
          [w(g, d) for _ in range(L)], [w(d, g) for _ in range(L)]]
    s = [torch.rand(H, generator=gen) for _ in range(L)]
    theta = [torch.rand(H, 1, e, generator=gen) for _ in range(L)] if lrpe else None
    pos = torch.tensor([3, 70000][:B]) if lrpe else None
    return x, S, ws, s, theta, pos


@pytest.mark.parametrize("lrpe", [False, True])
def test_stack_is_the_layers_in_order(lrpe):
    x, S, ws, s, theta, pos = _stack(lrpe=lrpe, dtype=torch.float64)
    xr, states = x, []
    for i in range(3):
        xr, Si = decode_layer_naive(xr, S[i], *(wl[i] for wl in ws), s[i], None if theta is None else theta[i], pos)
        states.append(Si)
    x_ref, S_ref = decode_stack_naive(x, S, *ws, s, theta, pos)
    assert torch.equal(x_ref, xr) and torch.equal(S_ref, torch.stack(states))
    out = decode_stack_step(x, S, *ws, s, theta, pos)
    assert out is x and torch.equal(x, x_ref) and torch.equal(S, S_ref)


def test_op_opcheck_and_compile():
    x, S, ws, s, theta, pos = _stack(lrpe=True)
    torch.library.opcheck(torch.ops.tnllm.decode_stack_step.default, (x, S, *ws, s, theta, pos, "silu", "none"))
    xn, Sn, wn, sn, _, _ = _stack(L=2, lrpe=False, seed=1)
    torch.library.opcheck(torch.ops.tnllm.decode_stack_step.default, (xn, Sn, *wn, sn, [], None, "relu", "silu"))
    x2, S2 = x.clone(), S.clone()
    want_x, want_S = decode_stack_naive(x2, S2, *ws, s, theta, pos)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, S):
        decode_stack_step(x, S, *ws, s, theta, pos)
        return x + 0

    got = f(x2, S2)
    assert torch.equal(got, want_x) and torch.equal(x2, want_x) and torch.equal(S2, want_S)


def test_bad_inputs_are_named():
    x, S, ws, s, theta, pos = _stack()
    with pytest.raises(ValueError, match=r"`state` must be one tensor \[L, B, H, Dk, e\] with L = 3"):
        decode_stack_step(x, S[0], *ws, s, theta, pos)
    with pytest.raises(ValueError, match="`w2` has 2 entries, `wqkvu` 3"):
        decode_stack_step(x, S, ws[0], ws[1], ws[2], ws[3][:2], ws[4], s, theta, pos)
    with pytest.raises(TypeError, match="`wout` must be a list of per-layer tensors"):
        decode_stack_step(x, S, ws[0], ws[1][0], *ws[2:], s, theta, pos)
    with pytest.raises(ValueError, match="`wqkvu` is empty"):
        decode_stack_step(x, S[:0], [], [], [], [], [], [], None, None)
    bad = [list(wl) for wl in ws]
    bad[4][2] = torch.randn(16, 11)
    with pytest.raises(ValueError, match="layer 2: `w3` must have shape"):
        decode_stack_step(x, S, *bad, s, theta, pos)
    with pytest.raises(ValueError, match="layer 0: .*`pos`"):
        decode_stack_step(x, S.repeat(1, 1, 1, 2, 1), *ws, s, [torch.rand(2, 1, 4)] * 3, None)
    with pytest.raises(ValueError, match="`act`"):
        decode_stack_step(x, S, *ws, s, theta, pos, act="gelu")
    xl, Sl, wl, sl, thl, pl = _stack(lrpe=True)
    with pytest.raises(ValueError, match="all have LRPE .* or none has"):
        decode_stack_step(xl, Sl, *wl, sl, [thl[0], None, thl[2]], pl)


def test_state_groups_of_the_presets():
    """The released layouts: LRPE on layer 0 only, so layer 0 is one run and the other layers another."""
    with torch.device("meta"):
        m = TransNormerLLM(TransNormerConfig.from_preset("385M"))
    assert state_groups(m) == [(0, 1), (1, 24)]
    cfg = TransNormerConfig.from_preset("tiny", decoder_layers=5, linear_use_lrpe_list=[1, 0, 0, 1, 1])
    assert state_groups(TransNormerLLM(cfg)) == [(0, 1), (1, 3), (3, 5)]


def test_stacked_buffers_are_views_and_the_stack_path_runs_on_cpu():
    """The decoder's state buffers are views of one tensor per run; on the CPU the "stack" path runs the reference
    of the same maths (the kernel is CUDA's, or the interpreter's) and equals the fused path token for token."""
    torch.manual_seed(0)
    m = TransNormerLLM(TransNormerConfig.from_preset("tiny", decoder_layers=3)).eval()
    states, stacks = stacked_zero_state(m, 2)
    assert [(a, b, tuple(S.shape)) for a, b, S in stacks] == [(0, 1, (1, 2, 4, 32, 16)), (1, 3, (2, 2, 4, 16, 16))]
    stacks[1][2][1].fill_(2.0)
    assert bool((states[2] == 2.0).all()) and bool((states[1] == 0).all())
    ids = torch.randint(1, 259, (2, 5))
    got = CudaGraphDecoder(m, 2, decode_path="stack").generate(ids, max_new_tokens=4)
    want = CudaGraphDecoder(m, 2, decode_path="fused").generate(ids, max_new_tokens=4)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="`stack=True`.*`layer_kernel=True`"):
        FusedDecodeStep(m, stack=True)


def test_stacks_for_some_layers_keep_the_layer_order(monkeypatch):
    """``FusedDecodeStep(stack=True)`` given stacks for layers 1-2 only (of 3): layer 0 runs first as its own launch,
    then the stack, in the model's order (here through the op's reference form, the CPU's kernel, with the layer
    kernel forced to apply), and the result equals the fused step's."""
    from tnllm.compile import fused_step
    torch.manual_seed(1)
    m = TransNormerLLM(TransNormerConfig.from_preset("tiny", decoder_layers=3)).eval()
    states, stacks = stacked_zero_state(m, 2)
    g = torch.Generator().manual_seed(2)
    for S in states:
        S.copy_(torch.randn(S.shape, generator=g) * 0.3)
    ref_states = [S.clone() for S in states]
    order = []
    real_layer, real_stack = fused_step.decode_layer_step, fused_step.decode_stack_step
    monkeypatch.setattr(fused_step, "layer_kernel_applies", lambda *a, **k: True)
    monkeypatch.setattr(fused_step, "decode_layer_step", lambda *a, **k: order.append("layer") or real_layer(*a, **k))
    monkeypatch.setattr(fused_step, "decode_stack_step", lambda *a, **k: order.append("stack") or real_stack(*a, **k))
    ids, pos = torch.tensor([5, 9]), torch.tensor([3, 70])
    got = FusedDecodeStep(m, layer_kernel=True, stack=True)(ids, states, pos, stacks=stacks[1:])
    assert order == ["layer", "stack"]
    monkeypatch.setattr(fused_step, "layer_kernel_applies", lambda *a, **k: False)
    want = FusedDecodeStep(m)(ids, ref_states, pos)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(states, ref_states):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
