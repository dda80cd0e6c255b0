"""GPU suite for weight-only int8 decoding through torchao (``pytest -m gpu``; skipped without CUDA or
without torchao): every decode path of the int8 model, captured (and compiled), against the int8 model's
eager step; the int8 model against the bf16 one."""
import pytest
import torch

from tnllm import TransNormerConfig, TransNormerLLM
from tnllm.compile import CudaGraphDecoder, quantize_int8

pytestmark = pytest.mark.gpu

CFG = dict(vocab_size=1024, decoder_embed_dim=512, decoder_layers=3, decoder_attention_heads=4, glu_dim=1408)


def _model(seed=0):
    pytest.importorskip("torchao")
    torch.manual_seed(seed)
    m = TransNormerLLM(TransNormerConfig(**CFG)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4.0)
    return m.to("cuda", torch.bfloat16)


def _agreement(ref, other, B=3, T=6, n=24, margin=0.0):
    """Greedy agreement of ``other`` with ``ref`` fed ``ref``'s tokens, over the positions where ``ref``'s
    top-1 logit leads its top-2 by more than ``margin`` times its largest |logit| (a near-tie may go either
    way under another summation order; those positions are not counted, but at least half must count)."""
    ids = torch.randint(1, 1024, (B, T), device="cuda", generator=torch.Generator(device="cuda").manual_seed(5))
    sa, agree, lr = ref.zero_state(B), [], None
    for t in range(T + n):
        tok = ids[:, t] if t < T else lr.argmax(-1)
        with torch.no_grad():
            lr, sa = ref.step(tok, sa, decode_kernel=False)
        lo = other(tok)
        if t >= T - 1:
            top = lr.float().topk(2, -1).values
            decided = (top[:, 0] - top[:, 1]) > margin * lr.float().abs().amax(-1)
            agree.append(torch.where(decided, (lr.argmax(-1) == lo.argmax(-1)).float(), -1.0))
    agree = torch.stack(agree)  # 1 agreed, 0 disagreed, -1 not counted
    counted = agree >= 0
    assert counted.float().mean() >= 0.5, f"only {int(counted.sum())} of {agree.numel()} positions decided"
    return float(agree[counted].mean())


@pytest.mark.parametrize("policy,path", [("graph", "kernel"), ("compiled+graph", "kernel"),
                                         ("compiled+graph", "fused"), ("graph", "fused")])
def test_int8_decoder_paths(policy, path):
    m = quantize_int8(_model(1))
    dec = CudaGraphDecoder(m, 3, compile=policy.startswith("compiled"), decode_path=path)
    assert _agreement(m, dec.step, margin=0.01) >= 0.97
    assert dec.graph is not None


def test_int8_against_bf16():
    ref = _model(2)
    q = quantize_int8(_model(2))
    st = q.zero_state(3)

    def step(tok):
        nonlocal st
        with torch.no_grad():
            lg, st = q.step(tok, st)
        return lg
    assert _agreement(ref, step) >= 0.9
