"""Serving benchmark: ``tnllm serve`` under N concurrent streams.

Starts ``python -m tnllm serve`` (random weights of ``--preset``, or ``--ckpt``) on 127.0.0.1, waits for
/health, then for each concurrency level keeps that many streaming requests in flight (each client
stream sends its next request as soon as one ends) until ``--requests`` have finished. Prompts are random
token ids of ``--prompt-len`` (a range), outputs ``--max-tokens`` long (``ignore_eos``, so every request
produces exactly that many tokens). Clients run in ``--client-procs`` processes (asyncio + httpx each, raw
SSE parsing), so the client side is not what is measured.

Reported per level: requests/s, output tokens/s, time to first token (request sent -> first token chunk)
and inter-token latency (gap between two token chunks of one stream; a chunk holding k tokens counts as
k gaps of 1/k of it; tokens that come with the first one count in TTFT) at p50/p90/p99, end-to-end latency, and the server's decode steps/s.

    python bench/serve.py --device cpu --preset tiny --concurrency 4 16 --requests 64 --max-tokens 16
    python bench/serve.py --device cuda --preset 385M --concurrency 64 256 --max-batch 256 --out $OUT   # H200

Writes ``serve.json`` (one row per level, with the server's command line) under ``--out``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summary(xs):
    return {f"p{q}": pct(xs, q) for q in (50, 90, 99)}


async def _client(url, jobs, streams, vocab, seed):
    import httpx
    rng = random.Random(seed)
    out = []
    queue = list(jobs)
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def stream_worker():
            while queue:
                plen, n = queue.pop()
                body = {"prompt": [rng.randrange(3, vocab) for _ in range(plen)], "max_tokens": n, "stream": True,
                        "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
                t0 = time.perf_counter()
                first, last, gaps, count, err = None, None, [], 0, None
                try:
                    async with client.stream("POST", "/v1/completions", json=body) as r:
                        if r.status_code != 200:
                            err = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                        else:
                            async for line in r.aiter_lines():
                                if not line.startswith("data: ") or line == "data: [DONE]":
                                    continue
                                ch = json.loads(line[6:])
                                if "error" in ch:
                                    err = ch["error"]["message"]
                                    break
                                k = len(ch["choices"][0].get("token_ids") or [])
                                if not k:
                                    continue
                                now = time.perf_counter()
                                if first is None:      # tokens beside the first one arrived with it:
                                    first = now            # they count in TTFT, not as gaps
                                elif k:
                                    gaps += [(now - last) / k] * k
                                last, count = now, count + len(ch["choices"][0]["token_ids"])
                except Exception as e:       # counted as a failure
                    err = repr(e)
                end = time.perf_counter()
                out.append({"ok": err is None and count == n, "error": err, "tokens": count, "plen": plen,
                            "ttft": None if first is None else first - t0, "e2e": end - t0, "gaps": gaps})

        await asyncio.gather(*(stream_worker() for _ in range(streams)))
    return out


def _client_proc(args):
    url, jobs, streams, vocab, seed = args
    return asyncio.run(_client(url, jobs, streams, vocab, seed))


def run_level(url, concurrency, n_requests, procs, plen, max_tokens, vocab, seed):
    rng = random.Random(seed)
    jobs = [(rng.randint(*plen), rng.randint(*max_tokens)) for _ in range(n_requests)]
    procs = max(1, min(procs, concurrency))
    parts = [(url, jobs[i::procs], concurrency // procs + (i < concurrency % procs), vocab, seed + i)
             for i in range(procs)]
    h0 = _get(url + "/health")
    t0 = time.perf_counter()
    if procs == 1:
        rows = _client_proc(parts[0])
    else:
        with mp.get_context("spawn").Pool(procs) as pool:
            rows = [r for part in pool.map(_client_proc, parts) for r in part]
    wall = time.perf_counter() - t0
    h1 = _get(url + "/health")
    ok = [r for r in rows if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    gaps = [g for r in ok for g in r["gaps"]]
    return {"concurrency": concurrency, "requests": n_requests, "failures": len(rows) - len(ok),
            "first_errors": [r["error"] for r in rows if not r["ok"]][:3], "wall_s": wall,
            "requests_per_s": len(ok) / wall, "tokens_per_s": tokens / wall,
            "ttft_s": summary([r["ttft"] for r in ok if r["ttft"] is not None]), "itl_s": summary(gaps),
            "e2e_s": summary([r["e2e"] for r in ok]),
            "server_steps_per_s": (h1["steps"] - h0["steps"]) / wall,
            "mean_rows_per_step": (h1["generated_tokens"] - h0["generated_tokens"]) / max(1, h1["steps"] - h0["steps"]),
            "client_procs": procs, "prompt_len": list(plen), "max_tokens": list(max_tokens)}


def _get(url):
    import httpx
    return httpx.get(url, timeout=30).json()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny", help="random weights of this preset (default tiny)")
    src.add_argument("--ckpt", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--concurrency", type=int, nargs="+", default=[4, 16])
    p.add_argument("--requests", type=int, default=None, help="per level (default 4 x concurrency)")
    p.add_argument("--max-batch", type=int, default=None, help="server slots (default: the largest concurrency)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    p.add_argument("--max-tokens", type=int, nargs=2, default=[64, 128], metavar=("MIN", "MAX"))
    p.add_argument("--client-procs", type=int, default=None, help="client processes (default: 1 per 64 streams)")
    p.add_argument("--server-arg", action="append", default=[], help="extra `tnllm serve` option (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server to come up")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    import httpx
    from tnllm.config import TransNormerConfig
    from tnllm.serve import ready_url
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    batch = a.max_batch or max(a.concurrency)
    src = ["--ckpt", a.ckpt] if a.ckpt else ["--preset", a.preset]
    cmd = [sys.executable, "-m", "tnllm", "serve", *src, "--port", "0", "--device", a.device, "--dtype",
           a.dtype, "--max-batch", str(batch), "--max-queue", str(max(a.concurrency) * 2), "--log-level",
           "warning", "--max-prompt-tokens", str(max(a.prompt_len)), *[x for s in a.server_arg for x in s.split()]]
    if a.ckpt:
        from tnllm.checkpoints import resolve_checkpoint
        vocab = json.loads((resolve_checkpoint(a.ckpt) / "config.json").read_text())["vocab_size"]
    else:
        vocab = TransNormerConfig.from_preset(a.preset).vocab_size
    log = open(out / "serve_server.log", "w")
    print(" ".join(cmd), flush=True)
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    rows, url = [], None
    try:
        t0 = time.time()
        while True:
            if server.poll() is not None:
                raise SystemExit(f"server exited with {server.returncode}; see {out / 'serve_server.log'}")
            if url is None:  # port 0: the server names the free port it took on its ready line
                url = ready_url((out / "serve_server.log").read_text(errors="replace"))
            try:
                if url is not None and httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() - t0 > a.timeout:
                raise SystemExit(f"server not up after {a.timeout}s; see {out / 'serve_server.log'}")
            time.sleep(0.2)
        startup = time.time() - t0
        # warm-up: a few requests, so lazy imports and the first graph replays are not measured
        warm = run_level(url, min(4, batch), min(4, batch), 1, tuple(a.prompt_len), (4, 4), vocab, a.seed + 99)
        if warm["failures"]:
            print(f"warm-up: {warm['failures']} of {warm['requests']} requests failed: {warm['first_errors'][:1]}; "
                  f"server health: {_get(url + '/health')}", flush=True)
        for c in a.concurrency:
            procs = a.client_procs or max(1, c // 64)
            row = run_level(url, c, a.requests or 4 * c, procs, tuple(a.prompt_len), tuple(a.max_tokens), vocab,
                            a.seed + c)
            row.update(server_cmd=" ".join(cmd[1:]), startup_s=startup, max_batch=batch,
                       warmup_failures=warm["failures"])
            if row["failures"]:
                row["server_health"] = _get(url + "/health")      # names why an engine stopped itself
            rows.append(row)
            f = lambda d: "/".join("-" if v is None else f"{v * 1e3:.1f}" for v in d.values())   # noqa: E731
            print(f"concurrency {c:>4}: {row['requests_per_s']:.2f} req/s, {row['tokens_per_s']:,.0f} tok/s, "
                  f"failures {row['failures']}, TTFT p50/p90/p99 {f(row['ttft_s'])} ms, ITL {f(row['itl_s'])} ms, "
                  f"server {row['server_steps_per_s']:.0f} steps/s x {row['mean_rows_per_step']:.1f} rows",
                  flush=True)
            (out / "serve.json").write_text(json.dumps(rows, indent=2) + "\n")
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    return 0 if all(r["failures"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
