"""Writes tests/data/decode_reference.pt: outputs of a seeded tiny TransNormerLLM (and the Transformer
baseline) through every decoding path, computed by the code before the state/decoder redesign
(commit efc3903). tests/test_decode_reference.py holds the current code bit-exact to them.

Run from the repository root: ``python tests/data/make_decode_reference.py`` (CPU, a few seconds).
"""
from __future__ import annotations

from pathlib import Path

import dataclasses

import torch

from tnllm import TransNormerConfig, TransNormerLLM, generate
from tnllm.baseline import TransformerLM, matched_config

OUT = Path(__file__).with_name("decode_reference.pt")
CFG = dict(vocab_size=61, decoder_embed_dim=32, decoder_layers=3, decoder_attention_heads=4, glu_dim=48,
           linear_use_lrpe_list=[1, 0, 1])


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 61, (3, 11), generator=g)
    more = torch.randint(3, 61, (3, 5), generator=g)
    toks = torch.randint(3, 61, (3, 4), generator=g)         # 4 steps of [3]
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, :4] = 0
    mask[2, :1] = 0
    return ids, more, toks.T.contiguous(), mask


@torch.no_grad()
def compute(model, base, onnx_path=None):
    from tnllm.compile import CudaGraphDecoder
    from tnllm.export import RecurrentStep
    ids, more, toks, mask = inputs()
    r = {}
    r["forward"] = model(ids)
    r["forward_masked"] = model(ids, attention_mask=mask)
    r["hidden"] = model.hidden_states(ids)
    lg, st = model.prefill(ids)
    r["prefill"], r["prefill_state"] = lg, list(st)
    lg2, st2 = model.prefill(more, st)
    r["prefill2"], r["prefill2_state"] = lg2, list(st2)
    steps, s = [], st2
    for t in toks:
        lg3, s = model.step(t, s)
        steps.append(lg3)
    r["steps"], r["steps_state"] = torch.stack(steps), list(s)
    lgm, stm = model.prefill(ids, attention_mask=mask)
    r["prefill_masked"], r["prefill_masked_state"] = lgm, list(stm)
    r["step_from_none"] = model.step(toks[0])[0]
    r["greedy"] = generate(model, ids, max_new_tokens=6, temperature=0.0)
    r["greedy_masked"] = generate(model, ids, max_new_tokens=6, temperature=0.0, attention_mask=mask)
    r["sampled"] = generate(model, ids, max_new_tokens=6, temperature=0.9, top_k=20, top_p=0.9,
                            repetition_penalty=1.3, seed=5)
    r["eos"] = generate(model, ids, max_new_tokens=6, eos_token_id=int(r["greedy"][1, 12]), pad_token_id=0)
    # static-buffer decoder (CPU, no graph), per-row positions
    dec = CudaGraphDecoder(model, 3)
    first = dec.prefill(ids)
    dec.reset(st, position=torch.tensor([11, 4, 20]))
    r["cg_first"] = first
    r["cg_steps"] = torch.stack([dec.step(t) for t in toks])
    r["cg_state"] = [b.clone() for b in dec.states]
    r["cg_generate"] = CudaGraphDecoder(model, 3).generate(ids, max_new_tokens=5)
    # the exported step module, per-row positions
    pos = torch.tensor([0, 7, 1000])
    states = tuple(S * 0.5 for S in st)
    lge, ste = RecurrentStep(model)(toks[0], pos, states)
    r["export_step"], r["export_step_state"] = lge, list(ste)
    # the Transformer baseline
    lb, cb = base.prefill(ids)
    lb2, cb = base.step(toks[0], cb)
    r["base_prefill"], r["base_step"] = lb, lb2
    r["base_greedy"] = generate(base, ids, max_new_tokens=5)
    if onnx_path is not None:
        from tnllm.export import OnnxRecurrentDecoder
        od = OnnxRecurrentDecoder(onnx_path, threads=1)
        r["onnx_greedy"] = torch.from_numpy(od.generate(ids.numpy(), 6))
        r["onnx_generate"] = generate(od, ids, max_new_tokens=6, attention_mask=mask)
    return r


def build():
    torch.manual_seed(0)
    model = TransNormerLLM(TransNormerConfig(**CFG)).eval()
    torch.manual_seed(1)
    base = TransformerLM(matched_config(TransNormerConfig(**CFG))).eval()
    return model, base


def load(data):
    model, _ = build()
    model.load_state_dict(data["model"])
    # the baseline's SwiGLU width as recorded (matched_config's rounding may change; the weights fix it)
    g = data["base"]["model.layers.0.mlp.w1.weight"].shape[0]
    base = TransformerLM(dataclasses.replace(matched_config(TransNormerConfig(**CFG)), glu_dim=g)).eval()
    base.load_state_dict(data["base"])
    return model, base


if __name__ == "__main__":
    import tempfile
    from tnllm.export import export_onnx
    model, base = build()
    with tempfile.TemporaryDirectory() as d:
        path = export_onnx(model, Path(d) / "step.onnx")
        ref = compute(model, base, path)
    torch.save({"model": model.state_dict(), "base": base.state_dict(), "ref": ref}, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): {sorted(ref)}")
