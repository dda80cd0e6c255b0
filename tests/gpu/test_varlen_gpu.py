"""GPU suite for packed variable-length sequences (``pytest -m gpu``; skipped without CUDA).

``tnllm.ops.lightning_attn_varlen`` on CUDA (the Triton sweeps with per-program row offsets) against one
fp64 oracle call per sequence (tnllm.testing), bf16 / fp16 / fp32, gradients and per-sequence states,
NaN-poisoned allocations; a NaN stays in its own sequence; no host sync (sync debug mode "error") and CUDA
graph capture with boundaries changed between replays; torch.compile(fullgraph=True); a bad cu_seqlens is
a device-side assertion (in a child process: it ends the CUDA context).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tnllm.testing as tt
from tnllm.ops import lightning_attn_varlen

pytestmark = pytest.mark.gpu

DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def poisoned(q, k, v, s, cu_seqlens, initial_state=None, output_final_state=False):
    with tt.poisoned_allocations():
        return lightning_attn_varlen(q, k, v, s, cu_seqlens, initial_state=initial_state,
                                     output_final_state=output_final_state)


def check(lengths, H, Dk, Dv, dt, state, rates=None, layout="contiguous", seed=0):
    rates = rates or tuple(float(x) for x in torch.linspace(0.01, 1.0, H))
    case = tt.VarlenCase(H=H, lengths=tuple(lengths), Dk=Dk, Dv=Dv, dtype=DT[dt], device="cuda", layout=layout,
                         rates=rates, state=state, seed=seed)
    tt.check_varlen_case(poisoned, case)


CASES = [   # (lengths, H, Dk, Dv, dtype): the model widths, the LRPE layer (Dk = 256), empty and one-token sequences
    ((0, 1, 63, 64, 65, 0, 300, 2), 4, 128, 128, "bf16"),
    ((0, 1, 63, 64, 65, 0, 300, 2), 4, 128, 128, "fp16"),
    ((0, 1, 63, 64, 65, 0, 300, 2), 2, 128, 128, "fp32"),
    ((777, 5, 0, 130), 2, 256, 128, "bf16"),
    ((777, 5, 0, 130), 2, 256, 128, "fp32"),
    ((33, 200, 1), 2, 48, 80, "fp16"),
    (tuple(range(0, 400, 7)), 2, 64, 64, "bf16"),          # 58 sequences of 0..399
]


@pytest.mark.parametrize("lengths,H,Dk,Dv,dt", CASES,
                         ids=[f"N{len(c[0])}-T{sum(c[0])}-H{c[1]}-Dk{c[2]}-Dv{c[3]}-{c[4]}" for c in CASES])
@pytest.mark.parametrize("state", [False, True], ids=["nostate", "state"])
def test_varlen_cuda_matches_one_call_per_sequence(lengths, H, Dk, Dv, dt, state):
    check(lengths, H, Dk, Dv, dt, state, seed=sum(lengths) % 1000 + Dk)


def test_layouts_and_rates_cuda():
    check((100, 0, 517), 4, 128, 128, "bf16", True, layout="bthd", rates=(1e-5, 0.0, float("inf"), 5.0))
    check((3, 250), 2, 64, 32, "fp16", True, layout="padded", rates=(0.1, 1e4))


def test_property_cuda():
    tt.assert_varlen_agrees(poisoned, device="cuda", dtypes=(torch.bfloat16,), max_examples=12, max_len=300,
                            dims=(16, 64))


def test_nonfinite_isolated_cuda():
    tt.assert_varlen_isolated(lightning_attn_varlen, device="cuda", dtypes=(torch.float32, torch.bfloat16),
                              max_examples=8, max_len=150, dims=(16, 64))


def _inputs(lengths, H=4, D=64, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    T, N = sum(lengths), len(lengths)
    q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=dtype, generator=g) / 8 for _ in range(3))
    S0 = torch.randn(N, H, D, D, device="cuda", generator=g)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device="cuda", dtype=torch.int32)
    s = torch.linspace(0.01, 1.0, H, device="cuda")
    return q, k, v, s, cu, S0


def test_no_host_sync_forward_and_backward():
    q, k, v, s, cu, S0 = _inputs([100, 0, 37, 260])
    q, k, v, S0 = (x.requires_grad_() for x in (q, k, v, S0))
    lightning_attn_varlen(q, k, v, s, cu, S0, True)           # reads s once (memoised)
    try:
        torch.cuda.set_sync_debug_mode("error")               # any synchronising call raises
        o, S = lightning_attn_varlen(q, k, v, s, cu, S0, True)
        (o.float().sum() + S.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(q.grad).all() and torch.isfinite(S0.grad).all()


def test_cuda_graph_replay_with_new_boundaries():
    """Captured once, replayed with other boundaries (same N) copied into the captured tensor: the kernel
    reads them on the device, so the replay equals an eager call with the new boundaries."""
    q, k, v, s, cu, S0 = _inputs([100, 0, 37, 263])
    lightning_attn_varlen(q, k, v, s, cu, S0, True)
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        lightning_attn_varlen(q, k, v, s, cu, S0, True)       # warm-up (compiles) outside capture
    torch.cuda.current_stream().wait_stream(st)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        o, S = lightning_attn_varlen(q, k, v, s, cu, S0, True)
    for lengths in ([400, 0, 0, 0], [1, 2, 3, 394], [100, 0, 37, 263]):
        cu.copy_(torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device="cuda"))
        g.replay()
        ro, rS = lightning_attn_varlen(q, k, v, s, cu.clone(), S0, True)
        torch.cuda.synchronize()
        assert torch.equal(o, ro) and torch.equal(S, rS), lengths


def test_compile_fullgraph_cuda():
    q, k, v, s, cu, S0 = _inputs([50, 0, 300, 7], seed=3)
    q, k, v, S0 = (x.requires_grad_() for x in (q, k, v, S0))

    def f(q, k, v, cu, S0):
        o, S = lightning_attn_varlen(q * 1.5, k, v, s, cu, initial_state=S0, output_final_state=True)
        return o.float().sin().sum() + S.square().sum()
    cf = torch.compile(f, fullgraph=True, dynamic=True)
    a = f(q, k, v, cu, S0)
    ga = torch.autograd.grad(a, [q, k, v, S0])
    b = cf(q, k, v, cu, S0)
    gb = torch.autograd.grad(b, [q, k, v, S0])
    assert tt.rel_err(b, a) < 1e-3
    for x, y in zip(gb, ga):
        assert tt.rel_err(x, y) < 1e-3


@pytest.mark.parametrize("bad", ["[0, 5, 3, 10]", "[1, 4, 7, 10]", "[0, 4, 7, 9]"])
def test_bad_boundaries_are_a_device_side_assertion(bad):
    code = textwrap.dedent(f"""
        import torch
        from tnllm.ops import lightning_attn_varlen
        q = torch.randn(1, 2, 10, 16, device="cuda")
        lightning_attn_varlen(q, q, q, torch.ones(2, device="cuda"), torch.tensor({bad}, device="cuda"))
        torch.cuda.synchronize()
        print("NO ERROR")
    """)
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "NO ERROR" not in out, out[-2000:]
    assert "cu_seqlens" in out or "device-side assert" in out, out[-2000:]


# ---- the model on CUDA ----------------------------------------------------------------------------------------

def _model(dtype=torch.bfloat16):
    from tnllm import TransNormerConfig, TransNormerLLM
    torch.manual_seed(0)
    cfg = TransNormerConfig(vocab_size=97, decoder_embed_dim=256, decoder_layers=2, decoder_attention_heads=2,
                            glu_dim=384)                      # head dim 128, the LRPE layer at Dk = 256
    return TransNormerLLM(cfg).cuda().to(dtype).eval()


def test_model_packed_forward_equals_per_document_cuda():
    m = _model()
    ids = torch.randint(3, 97, (2, 300), device="cuda")
    cu = torch.tensor([0, 7, 7, 150, 300, 301, 599, 600], device="cuda")
    with torch.no_grad():
        got = m(ids, cu_seqlens=cu).float()
        flat = ids.reshape(-1)
        b = cu.tolist()
        ref = torch.cat([m(flat[x:y][None]).float() for x, y in zip(b[:-1], b[1:]) if y > x], 1).reshape(2, 300, -1)
    assert tt.rel_err(got, ref) < 2e-2


def test_model_packed_prefill_and_generate_cuda():
    from tnllm import generate
    m = _model(torch.float32)
    prompts = [torch.randint(3, 97, (n,)) for n in (5, 300, 1, 77)]
    out = generate(m, prompts, max_new_tokens=6)
    for p, o in zip(prompts, out):
        assert torch.equal(o, generate(m, p[None], max_new_tokens=6)[0])


def test_model_compile_with_cu_seqlens_cuda():
    m = _model()
    cm = _model()
    cm.compile()
    ids = torch.randint(3, 97, (1, 500), device="cuda")
    cu = torch.tensor([0, 100, 100, 433, 500], device="cuda")
    with torch.no_grad():
        assert tt.rel_err(cm(ids, cu_seqlens=cu).float(), m(ids, cu_seqlens=cu).float()) < 1e-2


def test_train_steps_pack_documents_cuda(tmp_path):
    from tnllm.train.loop import TrainConfig, Trainer
    corpus = tmp_path / "c"
    corpus.mkdir()
    for d in range(6):
        (corpus / f"m{d}.py").write_text("".join(f"x{d} = {i}\n" for i in range(10 + 20 * d)))
    for compile_ in (False, True):
        cfg = TrainConfig(out_dir=str(tmp_path / f"run{compile_}"), preset="tiny", data=str(corpus), seq_len=64,
                          batch_size=4, steps=3, warmup_steps=1, eval_batches=1, progress=False, plot=False,
                          val_fraction=0.3, device="cuda", pack_documents=True, compile=compile_, checkpoint=False)
        t = Trainer(cfg, log=lambda m: None)
        summary = t.fit()
        losses = [r["loss"] for r in t.history if "loss" in r]
        assert len(losses) == 3 and all(x == x and x < 20 for x in losses) and summary["val_loss"] < 20
