"""``tnllm.serve`` in process (no HTTP): the slot buffers' in-place step and packed prefill, the engine's
batched admission, the incremental text stream and the SSE event merge."""
import random
import threading

import pytest
import torch

from tnllm import TransNormerConfig, TransNormerLLM, generate
from tnllm.serve.backend import SlotBatch
from tnllm.serve.engine import Engine, SamplingParams
from tnllm.serve.text import TextStream
from tnllm.tokenizer import ByteTokenizer

pytest.importorskip("starlette")
from tnllm.serve.app import merge_events  # noqa: E402
from tnllm.serve.engine import Event  # noqa: E402

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TransNormerLLM(TransNormerConfig.from_preset("tiny", init_std=0.3)).double().eval()


PROMPTS = [[1, 40, 41, 42], [1, 50, 51, 52, 53, 54, 55, 56, 57], [1], [1, 99, 98]]


def test_prefill_rows_is_each_prompt_alone(model):
    sb = SlotBatch(model, 6)
    rows = [4, 0, 5, 2]
    logits = sb.prefill_rows(rows, PROMPTS)
    assert logits.shape == (4, model.config.vocab_size) and logits.dtype == torch.float32
    for r, p, lg in zip(rows, PROMPTS, logits):
        ref, st = model.prefill(torch.tensor([p]))
        torch.testing.assert_close(lg, ref[0, -1].float(), rtol=1e-6, atol=1e-6)
        assert int(sb.position[r]) == len(p)
        for S, B in zip(st, sb.states):
            torch.testing.assert_close(B[r], S[0], rtol=1e-10, atol=1e-12)
    for r in (1, 3):                                  # the rows not loaded are untouched (zero, position 0)
        assert int(sb.position[r]) == 0 and all(not bool(B[r].any()) for B in sb.states)


def test_step_writes_into_the_slot_buffers(model):
    sb = SlotBatch(model, 4)
    sb.prefill_rows([0, 1, 2], PROMPTS[:3])
    before = [S.clone() for S in sb.states]
    pos = sb.position.clone()
    ptrs = [S.data_ptr() for S in sb.states]
    tokens = torch.tensor([7, 8, 9, 0])
    out = sb.step(tokens).clone()
    from tnllm.model import RecurrentState
    ref, new = model.step(tokens, RecurrentState(before, pos))
    assert [S.data_ptr() for S in sb.states] == ptrs            # the same buffers, updated in place
    torch.testing.assert_close(out, ref.float(), rtol=1e-6, atol=1e-6)
    for S, B in zip(new, sb.states):
        torch.testing.assert_close(B, S, rtol=1e-10, atol=1e-12)
    assert sb.position.tolist() == (pos + 1).tolist()


def test_prefill_rows_bad_input(model):
    sb = SlotBatch(model, 4)
    with pytest.raises(ValueError, match="same length"):
        sb.prefill_rows([0, 1], [[1, 2]])
    with pytest.raises(ValueError, match="distinct"):
        sb.prefill_rows([1, 1], [[1, 2], [3]])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sb.prefill_rows([0, 1], [[1, 2], []])
    with pytest.raises(ValueError, match="`row` must be an int in"):
        sb.prefill_rows([0, 4], [[1, 2], [3]])


def _run(engine, items):
    results, done = {}, threading.Event()

    def deliver(events):
        for tag, ev in events:
            ids, text, fin = results.setdefault(tag, ([], [], []))
            ids += ev.token_ids
            text.append(ev.text)
            if ev.finish_reason:
                fin.append(ev.finish_reason)
                if len(results) == len(items) and all(v[2] for v in results.values()):
                    done.set()

    engine.deliver = deliver
    engine.start()
    try:
        engine.submit(items)
        assert done.wait(120)
    finally:
        engine.stop()
    return results


SETTINGS = [dict(temperature=0.0), dict(temperature=0.9, seed=1), dict(temperature=1.2, top_k=20, seed=2),
            dict(temperature=0.0, repetition_penalty=1.3), dict(temperature=0.7, top_p=0.8, seed=3)]


def test_engine_admits_together_and_equals_generate(model):
    """More requests than slots, all submitted at once: the first ones share one packed prefill, the rest
    are admitted as rows free up; each request's tokens are generate's for its prompt and settings."""
    rng = random.Random(0)
    items = []
    for k in range(7):
        prompt = [1] + [rng.randrange(3, 259) for _ in range(rng.randint(1, 12))]
        items.append((prompt, SamplingParams(max_tokens=6 + k, ignore_eos=True, **SETTINGS[k % len(SETTINGS)]), k))
    eng = Engine(model, TOK, max_batch=4, max_queue=8)
    results = _run(eng, items)
    assert eng.stats["prefill_batches"] < len(items) and eng.stats["prefill_tokens"] == sum(len(p) for p, _, _ in items)
    for prompt, p, k in items:
        kw = {n: getattr(p, n) for n in ("temperature", "top_k", "top_p", "seed", "repetition_penalty")}
        want = generate(model, torch.tensor([prompt]), p.max_tokens, eos_token_id=None, **kw)[0, len(prompt):].tolist()
        ids, text, fin = results[k]
        assert ids == want, k
        assert "".join(text) == TOK.decode(want) and fin == ["length"]


def test_packed_prefill_failure_retries_each_prompt(model, monkeypatch):
    """A packed prefill that fails falls back to one prompt at a time: only the prompt that fails alone ends
    with an error, the others decode as usual."""
    eng = Engine(model, TOK, max_batch=4, max_queue=4)
    bad = [1, 66, 66, 66]
    alone = eng.slots.prefill_into

    def packed(rows, prompts):
        raise RuntimeError("packed prefill out of memory")

    def one(row, ids):
        if list(ids) == bad:
            raise RuntimeError("this prompt is too long")
        return alone(row, ids)
    monkeypatch.setattr(eng.slots, "prefill_rows", packed)
    monkeypatch.setattr(eng.slots, "prefill_into", one)
    p = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    results = _run(eng, [(PROMPTS[0], p, "a"), (bad, p, "b"), (PROMPTS[1], p, "c")])
    assert results["b"][2] == ["error"] and results["b"][0] == [] and "too long" in eng.error
    for k, prompt in (("a", PROMPTS[0]), ("c", PROMPTS[1])):
        want = generate(model, torch.tensor([prompt]), 3, temperature=0.0, eos_token_id=None)[0, len(prompt):]
        assert results[k][0] == want.tolist() and results[k][2] == ["length"]


class WindowTokenizer:
    """ByteTokenizer's decode only (no token_bytes): TextStream's window path."""
    def decode(self, ids):
        return TOK.decode(ids)


@pytest.mark.parametrize("seed", range(4))
def test_text_stream_incremental_equals_window_decode(seed):
    rng = random.Random(seed)
    pool = TOK.encode("ab é€☃ END\n") + [0x80 + 3, 0xE2 + 3, 0xF0 + 3, 2]     # stray and lead bytes, a special
    ids = [rng.choice(pool) for _ in range(80)]
    for stop in ((), ("END",), ("\n", "€☃")):
        fast, slow = TextStream(TOK, [1, 40], stop), TextStream(WindowTokenizer(), [1, 40], stop)
        assert fast._utf8 is not None and slow._utf8 is None
        a, b = [fast.push(t) for t in ids], [slow.push(t) for t in ids]
        text_a = "".join(t for t, _ in a) + fast.finish()
        text_b = "".join(t for t, _ in b) + slow.finish()
        assert text_a == text_b
        assert [s for _, s in a] == [s for _, s in b]
        if not stop:
            assert text_a == TOK.decode(ids)


def test_merge_events():
    ev = [(0, Event("a", [10])), (1, Event("x", [20])), (0, Event("", [11])), (0, Event("b", [12], "length")),
          (1, Event("y", [21]))]
    out = merge_events(ev)
    assert [(i, e.text, e.token_ids, e.finish_reason) for i, e in out] == [(0, "ab", [10, 11, 12], "length"),
                                                                          (1, "xy", [20, 21], None)]
    assert ev[0][1].token_ids == [10]                        # the events themselves are not changed
    out = merge_events([(0, Event("a", [1])), (1, Event("", [], "error", "boom")), (0, Event("b", [2]))])
    assert [(i, e.finish_reason) for i, e in out] == [(0, None), (1, "error")]


def test_bench_serve_engine_smoke(tmp_path):
    import importlib.util
    import json
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("bench_serve_engine",
                                                  Path(__file__).resolve().parents[1] / "bench" / "serve_engine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    n = torch.get_num_threads()
    try:
        assert mod.main(["--concurrency", "2", "3", "--max-tokens", "4", "--prompt-len", "2", "5",
                         "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(n)
    rows = json.loads((tmp_path / "serve_engine.json").read_text())
    assert [r["concurrency"] for r in rows] == [2, 3]
    for r in rows:
        assert r["steps"] == 3 and r["tokens_per_s"] > 0 and r["prefill_batches"] == 1


def test_failure_after_the_prefill_ends_only_the_admitted_requests(model, monkeypatch):
    """An error past the prefill (in sampling, say) ends the requests admitted with it, with an error event,
    and gives their slots back."""
    eng = Engine(model, TOK, max_batch=4, max_queue=4)
    real = eng._advance
    calls = [0]

    def advance(reqs, logits, events):
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("sampling broke")
        return real(reqs, logits, events)
    monkeypatch.setattr(eng, "_advance", advance)
    p = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    results = _run(eng, [(PROMPTS[0], p, "a"), (PROMPTS[1], p, "b")])
    assert results["a"][2] == ["error"] and results["b"][2] == ["error"] and "sampling broke" in eng.error
    assert eng.stats["finished"] == 0 and sorted(eng._free) == [0, 1, 2, 3]     # their slots are free again


def test_a_device_failure_stops_the_engine_and_ends_every_stream(model, monkeypatch):
    """A failing step whose slots cannot even be reset (a sticky CUDA error: every later launch fails) stops the
    engine: the running and the waiting requests all get an error event (none hangs), the engine reports not
    alive (``/health`` 503) and new requests are refused with EngineStopped."""
    from tnllm.serve.engine import EngineStopped
    eng = Engine(model, TOK, max_batch=2, max_queue=4)
    steps = [0]
    real_step = eng.slots.step

    def step(tokens):
        steps[0] += 1
        if steps[0] == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_step(tokens)

    def free(row):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(eng.slots, "step", step)
    monkeypatch.setattr(eng.slots, "free", free)
    p = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    results, done = {}, threading.Event()
    items = [(PROMPTS[i % 4], p, i) for i in range(5)]          # 2 running, 3 waiting

    def deliver(events):
        for tag, ev in events:
            if ev.finish_reason:
                results[tag] = ev
                if len(results) == len(items):
                    done.set()
    eng.deliver = deliver
    eng.start()
    try:
        eng.submit(items)
        assert done.wait(60), f"streams left hanging: {sorted(set(range(5)) - set(results))}"
        assert all(ev.finish_reason == "error" for ev in results.values())
        assert "illegal memory access" in results[0].error
        assert any("the engine stopped" in ev.error for ev in results.values())
        eng._thread.join(10)
        assert not eng.alive and eng.snapshot()["alive"] is False
        with pytest.raises(EngineStopped):
            eng.submit([(PROMPTS[0], p, "late")])
    finally:
        eng.stop()


def test_decode_paths_of_the_slot_step():
    """The slot step's ``decode_path``: "auto" is model.step on CPU (bit-identical to generate); "fused"
    (the CUDA default where the model allows it) runs ``FusedDecodeStep`` on the slot buffers, in place, to
    the aten step's logits and states at fp32 roundings; an unknown path is refused by name."""
    torch.manual_seed(0)
    m = TransNormerLLM(TransNormerConfig.from_preset("tiny", init_std=0.3)).eval()
    a, f = SlotBatch(m, 4), SlotBatch(m, 4, decode_path="fused")
    assert a.decode_path == "aten" and a._fused is None and f.decode_path == "fused"
    for sb in (a, f):
        sb.prefill_rows([0, 1, 2], PROMPTS[:3])
    ptrs = [S.data_ptr() for S in f.states]
    for tokens in ([7, 8, 9], [3, 4, 5, 6], [10]):
        t = torch.tensor(tokens)
        la, lf = a.step(t).clone(), f.step(t).clone()
        torch.testing.assert_close(lf, la, rtol=1e-5, atol=1e-5)
    assert [S.data_ptr() for S in f.states] == ptrs
    for Sa, Sf in zip(a.states, f.states):           # relative RMS error of each layer's state
        assert float((Sf - Sa).norm() / Sa.norm()) < 1e-5
    assert f.position.tolist() == a.position.tolist() == [4 + 3, 9 + 2, 1 + 2, 1]        # prompt length + steps
    with pytest.raises(ValueError, match="decode_path"):
        SlotBatch(m, 2, decode_path="fast")
    with pytest.raises(ValueError, match="decode_path='stack'.*use 'layer'"):
        SlotBatch(m, 2, decode_path="stack")
    eng = Engine(m, TOK, max_batch=2, decode_path="fused")
    assert eng.slots.decode_path == "fused"
