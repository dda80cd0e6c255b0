"""GPU suite (``pytest -m gpu``; skipped without CUDA): tnllm.hf on a CUDA device (the Triton prefill path).

transformers' ``generate`` on the wrapper gives the tokens of ``tnllm.generate`` (greedy, left padding, beam
search through the reordered recurrent state), and a bf16 ``AutoModelForCausalLM`` load equals
``TransNormerLLM.from_pretrained(dtype=bf16)``.
"""
import pytest
import torch

pytestmark = pytest.mark.gpu

# tnllm and transformers are imported inside the tests, not at collection: this folder is collected before
# tests/ops/test_triton.py, which must set TRITON_INTERPRET before tnllm's Triton kernels are decorated


def _imports():
    pytest.importorskip("transformers")
    import tnllm
    import tnllm.hf
    return tnllm, tnllm.hf


def _model(dtype=torch.float32, **kw):
    from tnllm import TransNormerConfig, TransNormerLLM
    torch.manual_seed(0)
    cfg = TransNormerConfig(vocab_size=512, decoder_embed_dim=256, decoder_layers=3, decoder_attention_heads=4,
                            glu_dim=512, **kw)
    return TransNormerLLM(cfg).to("cuda", dtype).eval()


def _prompts(B=3, T=150):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (B, T), generator=g)
    mask = torch.ones_like(ids)
    for b in range(1, B):
        mask[b, :17 * b] = 0
    return ids.masked_fill(mask == 0, 0).cuda(), mask.cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_greedy_generate_equals_tnllm(dtype):
    tnllm, th = _imports()
    m = _model(dtype)
    hf = th.TransNormerForCausalLM.from_tnllm(m)
    ids, mask = _prompts()
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None)
    ref = tnllm.generate(m, ids, attention_mask=mask, max_new_tokens=16)
    assert out.cpu().tolist() == ref.tolist()
    assert torch.equal(hf(ids, attention_mask=mask, use_cache=False).logits, m(ids, attention_mask=mask))


def test_cuda_beam_search_cached_equals_uncached():
    _, th = _imports()
    m = _model(init_std=0.3)
    hf = th.TransNormerForCausalLM.from_tnllm(m)
    ids, mask = _prompts(B=2, T=70)
    kw = dict(attention_mask=mask, max_new_tokens=8, num_beams=4, do_sample=False, eos_token_id=None)
    assert hf.generate(ids, **kw).tolist() == hf.generate(ids, use_cache=False, **kw).tolist()


def test_cuda_bf16_auto_load_equals_tnllm_load(tmp_path):
    tnllm, _ = _imports()
    from transformers import AutoModelForCausalLM
    m = _model()
    m.save_pretrained(tmp_path / "ckpt")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16).to("cuda")
    ref = tnllm.TransNormerLLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16, device="cuda")
    ids, _ = _prompts(B=2)
    assert hf.device.type == "cuda" and torch.equal(hf(ids).logits, ref(ids))
