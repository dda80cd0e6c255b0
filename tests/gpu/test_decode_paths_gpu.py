"""GPU suite for the decode paths (``pytest -m gpu``, skipped without CUDA): the model's step through the
fused Triton kernels against the aten step, at bf16 (and fp32), states included; greedy agreement;
``CudaGraphDecoder`` on every ``decode_path``, eager and compiled, captured in a CUDA graph.

Greedy agreement is teacher-forced: both paths are fed the aten path's tokens, and at each step the
argmax of the two is compared, so one near-tie does not make every later token differ."""
import copy

import pytest
import torch

from tnllm import RecurrentState, TransNormerConfig, TransNormerLLM
from tnllm.compile import CudaGraphDecoder

pytestmark = pytest.mark.gpu

# e = 128 like the released presets; layer 0 LRPE (Dk = 256), the others not
CFG = dict(vocab_size=1024, decoder_embed_dim=512, decoder_layers=3, decoder_attention_heads=4, glu_dim=1408)


def _model(dtype, seed=0):
    torch.manual_seed(seed)
    m = TransNormerLLM(TransNormerConfig(**CFG)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4.0)                      # logits far from uniform
    return m.to("cuda", dtype)


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-4}


def _teacher_forced(step_a, step_b, ids, n, margin=0.0):
    """Feed ids [B, T] then n of step_a's greedy tokens to both; the largest relative logit difference, and
    per-step argmax agreement over the rows whose top-1 / top-2 gap under step_a exceeds ``margin`` (a
    near-tie of the reference is a coin toss for any rounding, not a defect of the path under test)."""
    agree, worst = [], 0.0
    la = lb = None
    for t in range(ids.shape[1] + n):
        tok = ids[:, t] if t < ids.shape[1] else la.argmax(-1)
        la, lb = step_a(tok), step_b(tok)
        worst = max(worst, rel(lb, la))
        if t >= ids.shape[1] - 1:
            top2 = la.topk(2, dim=-1).values
            clear = (top2[:, 0] - top2[:, 1]) > margin
            agree += (la.argmax(-1) == lb.argmax(-1))[clear].float().tolist()
    return sum(agree) / max(1, len(agree)), worst


def _fp32_copy(m):
    """The bf16 model's own (rounded) weights in fp32: the reference every bf16 path is measured against, so
    that eager and compiled bf16 (which round at different places) are held to one truth."""
    return copy.deepcopy(m).float()


# logits here are O(10); bf16 paths differ from the fp32 reference by ~0.1 at most: a top-1/top-2 gap above
# MARGIN must give the same token
MARGIN = 0.5


def _stepper(m, B, kernel):
    st = m.zero_state(B)

    def step(tok):
        nonlocal st
        with torch.no_grad():
            lg, st = m.step(tok, st, decode_kernel=kernel)
        return lg.float()
    step.state = lambda: st
    return step


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_kernel_step_vs_aten_step(dtype):
    m, B = _model(dtype), 4
    g = torch.Generator(device="cuda").manual_seed(1)
    st0 = [torch.randn(B, *hkv, device="cuda", generator=g) * 0.3 for hkv in m.state_shapes()]
    pos = torch.tensor([0, 5, 1000, 131072], device="cuda")
    a = RecurrentState([S.clone() for S in st0], pos)
    k = RecurrentState([S.clone() for S in st0], pos)
    ids = torch.randint(1, 1024, (6, B), device="cuda", generator=g)
    with torch.no_grad():
        for t in range(6):
            la, a = m.step(ids[t], a, decode_kernel=False)
            lk, k = m.step(ids[t], k, decode_kernel=True)
            assert rel(lk.float(), la.float()) <= TOL[dtype], f"logits, token {t}"
    for i, (x, y) in enumerate(zip(k, a)):
        assert rel(x, y) <= TOL[dtype], f"state {i}"
    assert m.model.layers[0].token_mixer.uses_kernel(torch.zeros(1, 1, 512, device="cuda", dtype=dtype), st0[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_kernel_step_greedy_agreement(dtype):
    m, B = _model(dtype, seed=3), 4
    ref = _fp32_copy(m) if dtype == torch.bfloat16 else m
    ids = torch.randint(1, 1024, (B, 8), device="cuda")
    agree, worst = _teacher_forced(_stepper(ref, B, False), _stepper(m, B, True), ids, 32,
                                   margin=MARGIN if dtype == torch.bfloat16 else 0.0)
    assert worst <= TOL[dtype], worst
    assert agree == 1.0, agree


@pytest.mark.parametrize("compiled", [False, True], ids=["graph", "compiled+graph"])
@pytest.mark.parametrize("path", ["aten", "kernel", "fused"])
def test_graph_decoder_paths(path, compiled):
    dtype = torch.bfloat16
    m, B = _model(dtype, seed=4), 3
    dec = CudaGraphDecoder(m, B, compile=compiled, decode_path=path)
    assert dec.decode_path == path
    ref = _stepper(_fp32_copy(m), B, False)
    ids = torch.randint(1, 1024, (B, 6), device="cuda")
    agree, worst = _teacher_forced(ref, lambda t: dec.step(t).float(), ids, 24, margin=MARGIN)
    assert dec.graph is not None
    assert worst <= TOL[dtype] and agree == 1.0, (worst, agree)
    for x, y in zip(dec.state(), ref.state()):
        assert rel(x, y) <= TOL[dtype]


def test_auto_path_on_cuda():
    """One row of a model whose layers are one weight tile per program and stage: the one-launch layer; more
    rows: the fused step; fp64: the aten step."""
    m = _model(torch.bfloat16)
    assert CudaGraphDecoder(m, 1).decode_path == "layer"
    assert CudaGraphDecoder(m, 2).decode_path == "fused"
    assert CudaGraphDecoder(_model(torch.float64), 1).decode_path == "aten"


def test_fused_path_fp32_greedy_equals_model_step():
    m, B = _model(torch.float32, seed=6), 4
    dec = CudaGraphDecoder(m, B, decode_path="fused")
    ids = torch.randint(1, 1024, (B, 8), device="cuda")
    agree, worst = _teacher_forced(_stepper(m, B, False), lambda t: dec.step(t).float(), ids, 32)
    assert worst <= 1e-4 and agree == 1.0, (worst, agree)


def test_fused_graph_follows_in_place_weight_updates():
    m, B = _model(torch.bfloat16, seed=7), 2
    dec = CudaGraphDecoder(m, B, decode_path="fused")
    tok = torch.tensor([3, 4], device="cuda")
    dec.step(tok)                                                # captures the graph
    g = dec.graph
    with torch.no_grad():
        for layer in m.model.layers:
            layer.channel_mixer.l1.weight.mul_(0.5)
    dec.reset()
    got = dec.step(tok)
    assert dec.graph is g                                        # re-copied in place: the same graph
    with torch.no_grad():
        want, _ = m.step(tok, m.zero_state(B), decode_kernel=False)
    assert rel(got, want.float()) <= TOL[torch.bfloat16]
