"""GPU suite for the one-launch decoder layer (tnllm.ops.decode_layer; ``pytest -m gpu``, skipped without CUDA).

The persistent launch (five stages, grid barriers between them) against the staged launches (the same
per-program code, five launches: equal bit for bit, so the barriers order every read after the writes it
needs) and against the fp32 reference from the same rounded inputs: the 385M layer shape and odd widths,
bf16 / fp16 / fp32, 1 to 4 rows, LRPE on and off, two launch configurations; the 1B layer (too wide for the
kernel) through the op's reference form; many launches in a row and in a CUDA graph (the barrier counters reset
themselves); under torch.compile; the decoder's "layer" path against its "fused" path on a bf16 model (greedy
tokens and logits); and "auto"'s choice.
"""
import pytest
import torch

from tnllm.ops.decode_layer import decode_layer_naive, decode_layer_step
from tnllm.ops.decode_layer import triton as tri

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make(B, d, H, e, g, lrpe, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    h = H * e

    def w(n, k):
        return (torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5).to(dtype)

    x = (torch.randn(B, d, device="cuda", generator=gen) * 2).to(dtype)
    S = torch.randn(B, H, 2 * e if lrpe else e, e, device="cuda", generator=gen)
    ws = (w(4 * h, d), w(d, h), w(g, d), w(g, d), w(d, g))
    s = torch.rand(H, device="cuda", generator=gen) * 2
    theta = (10000 ** (-2 / h * torch.arange(h, device="cuda"))).reshape(H, 1, e) if lrpe else None
    pos = torch.randint(0, 200000, (B,), device="cuda", generator=gen) if lrpe else None
    return x, S, ws, s, theta, pos


BF, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
CASES = [(1, 1024, 8, 128, 2816, True, BF), (1, 1024, 8, 128, 2816, False, BF), (4, 1024, 8, 128, 2816, True, BF),
         (3, 200, 3, 40, 333, True, FP16), (1, 96, 2, 24, 100, False, FP32), (4, 520, 5, 64, 1000, True, FP32)]


# the default (the weight tiles loaded ahead of the barriers) at every shape, and the tiles loaded at their stage
# with the volatile-load barrier polling in 16 warps at the 385M shape (each configuration compiles six kernels)
RUNS = [(c, tri.LayerConfig()) for c in CASES] + [(CASES[0], tri.LayerConfig(prefetch=False, spin=1, num_warps=16))]


def persistent_equals_staged(launcher, x, S, args, cfg):
    """One persistent launch and the staged launches from the same x and state: equal bit for bit (the barriers
    order every read after the writes it needs). Returns the persistent launch's (x, state)."""
    xa, Sa = x.clone(), S.clone()
    launcher(xa, Sa, *args, "silu", "none", persistent=True, cfg=cfg)
    xb, Sb = x.clone(), S.clone()
    launcher(xb, Sb, *args, "silu", "none", persistent=False, cfg=cfg)
    torch.cuda.synchronize()
    assert torch.equal(xa, xb) and torch.equal(Sa, Sb), f"the persistent launch differs from the staged ({cfg})"
    return xa, Sa


@pytest.mark.parametrize("case,cfg", RUNS, ids=lambda x: str(x))
def test_persistent_equals_staged_and_reference(case, cfg):
    B, d, H, e, g, lrpe, dtype = case
    x, S, ws, s, theta, pos = make(B, d, H, e, g, lrpe, dtype)
    x_ref, S_ref = decode_layer_naive(x.float(), S, *(w.float() for w in ws), s, theta, pos, "silu", "none")
    xa, Sa = persistent_equals_staged(tri.decode_layer_triton, x, S, (*ws, s, theta, pos), cfg)
    assert rel(xa, x_ref) <= TOL[dtype], (cfg, rel(xa, x_ref))
    assert rel(Sa, S_ref) <= TOL[dtype], (cfg, rel(Sa, S_ref))
    assert tri._counters(x.device).tolist() == [0, 0], "the barrier counters were not reset"


def test_a_layer_too_wide_takes_the_reference_form():
    """The 1B layer does not fit the kernel's one-tile stages on 132 SMs: the op runs the reference form."""
    x, S, ws, s, theta, pos = make(1, 2048, 16, 128, 5632, False, BF)
    assert not tri.supported(x, S, *ws)
    x_ref, S_ref = decode_layer_naive(x, S, *ws, s, theta, pos, "silu", "none")
    decode_layer_step(x, S, *ws, s, theta, pos, "silu", "none")
    assert torch.equal(x, x_ref) and torch.equal(S, S_ref)


def test_many_launches_and_graph_replays():
    """50 persistent launches in a row, then a CUDA graph of 10 launches replayed 5 times: the same bits as
    the staged launches from the same start (a counter left non-zero would release a barrier early)."""
    x, S, ws, s, theta, pos = make(1, 1024, 8, 128, 2816, True, BF, seed=1)
    xs, Ss = x.clone(), S.clone()
    for _ in range(50):
        tri.decode_layer_triton(x, S, *ws, s, theta, pos, "silu", "none", persistent=True)
        tri.decode_layer_triton(xs, Ss, *ws, s, theta, pos, "silu", "none", persistent=False)
    torch.cuda.synchronize()
    assert torch.equal(x, xs) and torch.equal(S, Ss)
    graph_equals_staged(tri.decode_layer_triton, x, S, (*ws, s, theta, pos), launches=10, replays=5)
    assert tri._counters(x.device).tolist() == [0, 0]


def graph_equals_staged(launcher, x, S, args, launches, replays):
    """A CUDA graph of ``launches`` persistent launches, replayed ``replays`` times from the same start, gives the
    bits of as many staged launches."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            launcher(x, S, *args, "silu", "none", persistent=True)
    xg, Sg = x.clone(), S.clone()
    for _ in range(replays):
        x.copy_(xg)
        S.copy_(Sg)
        graph.replay()
    xs, Ss = xg.clone(), Sg.clone()
    for _ in range(launches):
        launcher(xs, Ss, *args, "silu", "none", persistent=False)
    torch.cuda.synchronize()
    assert torch.equal(x, xs) and torch.equal(S, Ss), "the graph's replays differ from the staged launches"


def test_op_under_compile():
    x, S, ws, s, theta, pos = make(2, 256, 4, 32, 300, True, BF, seed=2)
    xr, Sr = x.clone(), S.clone()
    decode_layer_step(xr, Sr, *ws, s, theta, pos, "silu", "none")

    @torch.compile(fullgraph=True)
    def f(x, S):
        decode_layer_step(x, S, *ws, s, theta, pos, "silu", "none")
        return x * 1

    out = f(x, S)
    torch.cuda.synchronize()
    assert torch.equal(out, xr) and torch.equal(x, xr) and torch.equal(S, Sr)


@pytest.mark.parametrize("B", [1, 4])
def test_decoder_layer_path_matches_the_fused_path(B):
    from tnllm import TransNormerConfig, TransNormerLLM
    from tnllm.compile import CudaGraphDecoder
    torch.manual_seed(0)
    m = TransNormerLLM(TransNormerConfig.from_preset("small")).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(1, m.config.vocab_size, (B, 8), device="cuda")
    lay, fus = CudaGraphDecoder(m, B, decode_path="layer"), CudaGraphDecoder(m, B, decode_path="fused")
    assert lay.decode_path == "layer"
    tl_, tf = lay.prefill(ids).argmax(-1), fus.prefill(ids).argmax(-1)
    assert torch.equal(tl_, tf)                  # the prefill is the model's, the same for both
    worst = 0.0
    for _ in range(12):
        a, b = lay.step(tf), fus.step(tf)       # teacher-forced: both fed the fused path's tokens
        worst = max(worst, rel(a, b))
        tf = b.argmax(-1)
    assert worst < 3e-2, f"logits of the layer path differ from the fused path by {worst:.3e}"
    for i, (p, q) in enumerate(zip(lay.states, fus.states)):
        assert rel(p, q) < 3e-2, f"state of layer {i}"


def test_auto_takes_the_layer_path_at_batch_1_only():
    """``decode_path="auto"`` picks the one-launch layer where it was measured faster: one row of a 385M-shaped
    model (random weights); two rows take the six-operation step."""
    from tnllm import TransNormerConfig, TransNormerLLM
    from tnllm.compile import CudaGraphDecoder
    with torch.device("cuda"):
        m = TransNormerLLM(TransNormerConfig.from_preset("385M")).to(torch.bfloat16).eval()
    assert CudaGraphDecoder(m, 1).decode_path == "layer"
    assert CudaGraphDecoder(m, 2).decode_path == "fused"


# -- stacks of layers in one launch (decode_stack_step) -------------------------------------------------------
def make_stack(L, B, d, H, e, g, lrpe, dtype, seed=0):
    layers = [make(B, d, H, e, g, lrpe, dtype, seed=seed + i) for i in range(L)]
    x, pos = layers[0][0], layers[0][5]
    S = torch.stack([lay[1] for lay in layers]).contiguous()
    ws = [[lay[2][j] for lay in layers] for j in range(5)]
    s = [lay[3] for lay in layers]
    theta = [lay[4] * (1 + i) for i, lay in enumerate(layers)] if lrpe else None
    return x, S, ws, s, theta, pos


# (L, B, d, H, e, g, lrpe, dtype), prefetch: the 385M preset's 23 plain layers both ways, then odd shapes (each
# configuration compiles one persistent kernel and five staged ones)
STACK_CASES = [((23, 1, 1024, 8, 128, 2816, False, BF), True), ((23, 1, 1024, 8, 128, 2816, False, BF), False),
               ((3, 1, 1024, 8, 128, 2816, True, BF), True), ((5, 4, 520, 5, 64, 1000, True, FP32), True),
               ((4, 3, 200, 3, 40, 333, False, FP16), False)]


@pytest.mark.parametrize("case,prefetch", STACK_CASES, ids=str)
def test_stack_persistent_equals_staged_and_reference(case, prefetch):
    """One launch for L layers (the 385M preset's 23 layers after the LRPE one among them) against the staged
    launches (bit for bit: every read ordered after the writes it needs, across the layers too) and the fp32
    reference of the layers in order."""
    L, B, d, H, e, g, lrpe, dtype = case
    x, S, ws, s, theta, pos = make_stack(L, B, d, H, e, g, lrpe, dtype)
    from tnllm.ops.decode_layer import decode_stack_naive
    x_ref, S_ref = decode_stack_naive(x.float(), S, *([w.float() for w in wl] for wl in ws), s, theta, pos)
    cfg = tri.LayerConfig(prefetch=prefetch)
    xa, Sa = persistent_equals_staged(tri.decode_stack_triton, x, S, (*ws, s, theta, pos), cfg)
    # the roundings of L layers compound (the staged launches, each stage tested against the reference on its own in
    # the tests above, are the exact check)
    tol = TOL[dtype] * (2 if L <= 5 else 4)
    assert rel(xa, x_ref) <= tol, rel(xa, x_ref)
    assert rel(Sa, S_ref) <= tol, rel(Sa, S_ref)
    assert tri._counters(x.device).tolist() == [0, 0], "the barrier counters were not reset"


def test_stack_graph_replays_and_profile():
    """A CUDA graph of 3 stack launches replayed 4 times equals the staged launches; the profile marks of every
    layer increase through the stages."""
    x, S, ws, s, theta, pos = make_stack(6, 1, 1024, 8, 128, 2816, False, BF, seed=3)
    tri.decode_stack_triton(x.clone(), S.clone(), *ws, s, theta, pos, "silu", "none", persistent=True)  # the table
    graph_equals_staged(tri.decode_stack_triton, x, S, (*ws, s, theta, pos), launches=3, replays=4)
    ts = torch.zeros(6, tri._num_sms(x.device), 16, dtype=torch.int64, device="cuda")
    tri.decode_stack_triton(x, S, *ws, s, theta, pos, "silu", "none", persistent=True, profile=ts)
    torch.cuda.synchronize()
    marks = ts[:, :, :10]
    assert bool((marks[:, :, 1:] >= marks[:, :, :-1]).all()), "stage marks out of order"
    assert bool((ts[1:, :, 0] >= ts[:-1, :, 9]).all()), "a layer started before the previous one ended"


@pytest.mark.parametrize("compile", [False, True])
def test_decoder_stack_path_matches_the_layer_path(compile):
    """``decode_path="stack"`` (two launches per token at 385M's layout; here the small preset, 4 layers) against
    the per-layer launches (the same per-stage code: the same logits up to the compiler's scheduling, teacher-forced
    by the layer path's tokens)."""
    from tnllm import TransNormerConfig, TransNormerLLM
    from tnllm.compile import CudaGraphDecoder
    torch.manual_seed(0)
    m = TransNormerLLM(TransNormerConfig.from_preset("small")).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(1, m.config.vocab_size, (1, 8), device="cuda")
    stk = CudaGraphDecoder(m, 1, decode_path="stack", compile=compile)
    lay = CudaGraphDecoder(m, 1, decode_path="layer", compile=compile)
    assert [(a, b) for a, b, _ in stk.state_stacks] == [(0, 1), (1, 4)]
    t = stk.prefill(ids).argmax(-1)
    lay.prefill(ids)
    for _ in range(12):
        a, b = stk.step(t), lay.step(t)
        assert rel(a, b) < 1e-2, f"stack and layer paths differ by {rel(a, b):.3e}"
        t = b.argmax(-1)
