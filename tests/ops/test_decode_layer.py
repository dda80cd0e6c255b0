"""tnllm.ops.decode_layer: one decoder layer's decode step. The reference equals the model's layer (the two
weight-free norms folded in) within rounding, in fp64 exactly the fused step's layer; the custom op on CPU:
in place, opcheck, torch.compile(fullgraph=True); every bad input named; which layer shapes take the one-tile
stages, and when ``decode_path="auto"`` takes the layer path. The Triton kernel under TRITON_INTERPRET=1:
tests/interpret/test_decode_layer_interpreted.py; on the GPU: tests/gpu/test_decode_layer_gpu.py."""
import pytest
import torch

from tnllm import RecurrentState, TransNormerConfig, TransNormerLLM
from tnllm.compile import CudaGraphDecoder
from tnllm.compile.fused_step import FusedDecodeStep, layer_pays
from tnllm.ops.decode_layer import decode_layer_naive, decode_layer_step
from tnllm.ops.decode_layer.op import one_fits, shared_gpu


def _model(dtype=torch.float64, glu_act="none", seed=0):
    torch.manual_seed(seed)
    m = TransNormerLLM(TransNormerConfig.from_preset("tiny", glu_act=glu_act)).to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)
    return m


def _layer_args(m, i, x, S, pos):
    tm, glu = m.model.layers[i].token_mixer, m.model.layers[i].channel_mixer
    theta = tm.lrpe.theta if tm.lrpe is not None else None
    return (x, S, tm.qkvu_proj.weight, tm.out_proj.weight, glu.l1.weight, glu.l2.weight, glu.l3.weight, tm.s,
            theta, pos if theta is not None else None, tm.act_name, m.config.glu_act)


@pytest.mark.parametrize("glu_act", ["none", "silu"])
def test_reference_is_the_model_step_layer_by_layer(glu_act):
    """The model's step (fp64) run layer by layer equals the reference at every layer: x and the state."""
    m = _model(glu_act=glu_act)
    B = 3
    g = torch.Generator().manual_seed(1)
    states = [torch.randn(B, *s, generator=g, dtype=torch.float64) * 0.3 for s in m.state_shapes()]
    pos = torch.tensor([0, 5, 100000])
    ids = torch.randint(1, 259, (B,), generator=g)
    with torch.no_grad():
        want, new = m.step(ids, RecurrentState([S.clone() for S in states], pos), decode_kernel=False)
        x = m.model.embed_tokens(ids) * m.model.embed_scale
        for i in range(len(m.model.layers)):
            x, S = decode_layer_naive(*_layer_args(m, i, x, states[i], pos))
            assert torch.allclose(S, new[i], rtol=1e-10, atol=1e-10), f"state of layer {i}"
        got = m.head(x)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)


def test_op_in_place_opcheck_and_compile():
    m = _model(torch.float32)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 64, generator=g)
    S = torch.randn(2, *m.state_shapes()[0], generator=g)
    pos = torch.tensor([3, 7])
    args = _layer_args(m, 0, x, S, pos)
    with torch.no_grad():
        want_x, want_S = decode_layer_naive(*args)
        out = decode_layer_step(*args)
    assert out is x and torch.equal(x, want_x) and torch.equal(S, want_S)
    x2, S2 = torch.randn(2, 64, generator=g), torch.randn(2, *m.state_shapes()[0], generator=g)
    a2 = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in _layer_args(m, 0, x2, S2, pos))
    torch.library.opcheck(torch.ops.tnllm.decode_layer_step.default, a2)
    x3, S3 = x2.clone(), S2.clone()
    want_x, want_S = decode_layer_naive(x3, S3, *a2[2:])

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, S):
        decode_layer_step(x, S, *a2[2:])
        return x + 0

    got = f(x3, S3)
    assert torch.equal(got, want_x) and torch.equal(x3, want_x) and torch.equal(S3, want_S)


def test_bad_inputs_are_named():
    m = _model(torch.float32)
    x = torch.randn(1, 64)
    S = torch.randn(1, *m.state_shapes()[1])                       # layer 1: no LRPE
    args = list(_layer_args(m, 1, x, S, None))
    bad = {0: (torch.randn(64), "`x`"), 1: (torch.randn(1, 4, 16, 16, dtype=torch.float64), "`state`"),
           2: (torch.randn(10, 64), "`wqkvu`"), 3: (torch.randn(64, 10), "`wout`"), 4: (torch.randn(96, 10), "`w1`"), 6: (torch.randn(64, 10), "`w3`"),
           7: (torch.rand(3), "`s`")}
    for i, (val, name) in bad.items():
        a = list(args)
        a[i] = val
        with pytest.raises((ValueError, TypeError), match=name):
            decode_layer_step(*a)
    a = list(args)
    a[2] = a[2].double()
    with pytest.raises(TypeError, match="`wqkvu` must have x's dtype"):
        decode_layer_step(*a)
    a = list(args)
    a[10] = "gelu"
    with pytest.raises(ValueError, match="`act`"):
        decode_layer_step(*a)
    S0 = torch.randn(1, *m.state_shapes()[0])                      # layer 0: LRPE, positions needed
    a = list(_layer_args(m, 0, x, S0, None))
    with pytest.raises(ValueError, match="`pos`"):
        decode_layer_step(*a)


def test_which_layers_take_the_one_tile_stages():
    """On 132 SMs the 385M layer is one tile per program and stage; the 1B and 7B layers are not."""
    shapes = {n: TransNormerConfig.from_preset(n) for n in ("385M", "1B", "7B")}
    fits = {n: one_fits(1, c.decoder_embed_dim, c.hidden_dim, c.glu_dim, 132) for n, c in shapes.items()}
    assert fits == {"385M": True, "1B": False, "7B": False}


def test_auto_keeps_the_cpu_paths():
    m = _model(torch.float32)
    assert not layer_pays(m, 1)                     # CPU: never
    assert CudaGraphDecoder(m, 1).decode_path == "aten"
    dec = CudaGraphDecoder(m, 1, decode_path="layer")    # explicit: the fused step on CPU (the kernel is CUDA's)
    assert dec.decode_path == "layer" and isinstance(dec.fused, FusedDecodeStep) and dec.fused.layer_kernel


def test_mps_is_detected(monkeypatch):
    """Under the CUDA MPS (its client variables set) the launcher defaults to the staged launches and "auto" keeps
    the fused step: a grid barrier needs every program resident, which an MPS SM limit can prevent."""
    for v in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"):
        monkeypatch.delenv(v, raising=False)
    assert not shared_gpu()
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "50")
    assert shared_gpu()


def test_layer_path_stacks_l1_l2_only_when_it_falls_back():
    """The layer kernel reads l1 and l2 from the model: ``FusedDecodeStep(layer_kernel=True)`` makes the stacked
    l1|l2 copies only at the first call that takes the six operations (here: the CPU), and then equals the fused
    step."""
    m = _model(torch.float32)
    lay, fus = FusedDecodeStep(m, layer_kernel=True), FusedDecodeStep(m)
    w12_bytes = sum(w.numel() * w.element_size() for w in fus._w12)
    assert all(w is None for w in lay._w12) and lay.extra_bytes == fus.extra_bytes - w12_bytes
    g = torch.Generator().manual_seed(4)
    st = [torch.randn(2, *s, generator=g) for s in m.state_shapes()]
    ids, pos = torch.tensor([5, 9]), torch.tensor([3, 70000])
    a = [S.clone() for S in st]
    got, want = lay(ids, a, pos), fus(ids, st, pos)
    assert torch.equal(got, want) and all(torch.equal(x, y) for x, y in zip(a, st))
    assert lay.extra_bytes == fus.extra_bytes
    with torch.no_grad():                       # an in-place update of l1 is re-copied by refresh, as in "fused"
        m.model.layers[0].channel_mixer.l1.weight.mul_(2.0)
    glu = m.model.layers[0].channel_mixer
    assert lay.refresh() == (1, False) and torch.equal(lay._w12[0], torch.cat([glu.l1.weight, glu.l2.weight]))
