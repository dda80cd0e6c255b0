"""The serve engine in process (no HTTP): N requests submitted at once into N slots, greedy, ``ignore_eos``;
reports engine steps/s and generated tokens/s over the whole run (prefill included), so the engine's own
per-step work (admission, the step, sampling, detokenisation, events) is measured without the HTTP side.

    python bench/serve_engine.py --preset tiny --concurrency 64 256
    python bench/serve_engine.py --preset tiny --concurrency 256 --profile     # + cProfile of the engine thread

Prints one line per level; ``--out`` writes ``serve_engine.json``.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import random
import threading
import time
from pathlib import Path

import torch


def run_level(model, tokenizer, n, prompt_len, max_tokens, seed, profile=False):
    from tnllm.serve.engine import Engine, SamplingParams
    done, left = threading.Event(), [n]

    def deliver(events):
        for _, ev in events:
            if ev.finish_reason:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

    eng = Engine(model, tokenizer, max_batch=n, max_queue=n, deliver=deliver)
    prof = cProfile.Profile() if profile else None
    if prof is not None:
        loop = eng._loop

        def profiled():
            prof.enable()
            try:
                loop()
            finally:
                prof.disable()
        eng._loop = profiled
    eng.start()
    rng = random.Random(seed)
    V = model.config.vocab_size
    p = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    items = [([rng.randrange(3, V) for _ in range(rng.randint(*prompt_len))], p, i) for i in range(n)]
    t0 = time.perf_counter()
    eng.submit(items)
    done.wait()
    wall = time.perf_counter() - t0
    st = dict(eng.stats)
    eng.stop()
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    return {"concurrency": n, "wall_s": wall, "steps": st["steps"], "steps_per_s": st["steps"] / wall,
            "tokens_per_s": st["generated_tokens"] / wall, "prefill_batches": st.get("prefill_batches"),
            "prompt_len": list(prompt_len), "max_tokens": max_tokens}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[8, 32], metavar=("MIN", "MAX"))
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per level; the best is reported")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from tnllm import TransNormerConfig, TransNormerLLM
    from tnllm.tokenizer import ByteTokenizer
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    model = TransNormerLLM(TransNormerConfig.from_preset(a.preset)).to(device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    model.eval()
    rows = []
    for n in a.concurrency:
        runs = [run_level(model, ByteTokenizer(), n, tuple(a.prompt_len), a.max_tokens, a.seed + n, a.profile)
                for _ in range(a.repeats)]
        row = max(runs, key=lambda r: r["tokens_per_s"])
        rows.append(row)
        print(f"concurrency {n:>4}: {row['steps_per_s']:.1f} engine steps/s, {row['tokens_per_s']:,.0f} tok/s "
              f"({row['steps']} steps in {row['wall_s']:.2f} s, best of {a.repeats})", flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "serve_engine.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
