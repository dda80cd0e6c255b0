"""``tnllm serve`` end to end: a real server process on 127.0.0.1 (tiny preset, CPU, a checkpoint written here),
driven by the ``openai`` client and by raw httpx requests."""
import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from tnllm import TransNormerConfig, TransNormerLLM, generate  # noqa: E402
from tnllm.tokenizer import ByteTokenizer  # noqa: E402
from tnllm.checkpoints import load_model, save_model  # noqa: E402
from tnllm.serve import ready_url  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny-serve"
TOK = ByteTokenizer()
EOS = TOK.eos_id
LONG = 10 ** 6


class Server:
    """``python -m tnllm serve ...`` as a subprocess; ready once /health answers 200."""

    def __init__(self, ckpt, *args, timeout=120.0):
        # port 0: the server takes a free port itself and names it on its ready line (no race with other
        # workers' servers between choosing a port here and binding it there)
        self.log_path = Path(ckpt).parent / f"server-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "tnllm", "serve", "--ckpt", str(ckpt), "--port", "0",
                                      "--log-level", "warning", "--model-name", NAME, "--threads", "1",
                                      *args], stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        t0, self.url = time.time(), None
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            if self.url is None:
                self.url = ready_url(self.output())
            if self.url is not None:
                try:
                    if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            if time.time() - t0 > timeout:
                self.close()
                raise RuntimeError(f"the server did not come up in {timeout}s:\n{self.output()}")
            time.sleep(0.1)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def output(self) -> str:
        # read through a file of its own: seeking the shared descriptor would move the server's write offset
        return self.log_path.read_text(errors="replace")

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The reference runs (batch 1, tiny) are faster on one thread, most of all on busy shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    # a wider init than the default spreads the random model's logits, so its outputs vary
    model = TransNormerLLM(TransNormerConfig.from_preset("tiny", init_std=0.3))
    path = tmp_path_factory.mktemp("serve") / "ckpt"
    save_model(model, path)
    TOK.save(path)
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    # fp64 on both sides: the batched step and generate's batch-1 step then round far below any gap
    # between two tokens' logits, so the tokens are equal for sure, not just almost always
    return load_model(ckpt, dtype=torch.float64)[0]


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt, "--dtype", "fp64", "--max-batch", "16", "--max-queue", "64", "--max-prompt-tokens", "200",
               "--max-tokens", "512")
    yield s
    s.close()


@pytest.fixture(scope="module")
def small(ckpt):
    """One slot, one queue place: for the queue-full and disconnect tests (whose streams of LONG tokens
    would run for minutes)."""
    s = Server(ckpt, "--max-batch", "1", "--max-queue", "1", "--max-tokens", str(LONG))
    yield s
    s.close()


def encode(prompt: str) -> list[int]:
    return [TOK.bos_id] + TOK.encode(prompt)


def reference(model, ids, max_tokens, temperature=1.0, top_p=None, top_k=None, seed=None, repetition_penalty=1.0,
              ignore_eos=False) -> list[int]:
    out = generate(model, torch.tensor([ids]), max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                   seed=seed, repetition_penalty=repetition_penalty,
                   eos_token_id=None if ignore_eos else EOS)[0, len(ids):].tolist()
    return out


def text_of(ids) -> str:
    return TOK.decode([t for t in ids if t != EOS])


CASES = [   # prompt, max_tokens, sampling (the request's fields; generate's keywords)
    ("def fibonacci(n):\n", 24, dict(temperature=0.0)),
    ("import os", 40, dict(temperature=0.8, top_p=0.9, seed=1)),
    ("hello", 17, dict(temperature=1.3, top_k=12, seed=2)),
    ("x = [", 30, dict(temperature=0.7, top_k=40, top_p=0.8, seed=3)),
    ("while True:", 20, dict(temperature=0.0, repetition_penalty=1.3)),
    ("é€ unicode ☃", 33, dict(temperature=1.0, seed=4, ignore_eos=True)),
    ("a", 1, dict(temperature=1.0, seed=5)),
    ("The quick brown fox jumps over the lazy dog. " * 3, 28, dict(temperature=0.9, seed=6, repetition_penalty=1.1)),
]
EXTRA = ("top_k", "repetition_penalty", "ignore_eos")


def create(client, prompt, max_tokens, sampling, **kw):
    extra = {k: sampling[k] for k in EXTRA if k in sampling}
    std = {k: v for k, v in sampling.items() if k not in EXTRA}
    return client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens,
                                     extra_body={"return_token_ids": True, **extra}, **std, **kw)


def test_health_and_models(server):
    h = server.health()
    assert h["status"] == "ok" and h["slots"] == 16 and h["busy"] == 0 and h["model"] == NAME
    models = server.client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert server.client.models.retrieve(NAME).id == NAME


@pytest.mark.parametrize("i", range(len(CASES)), ids=lambda i: f"case{i}")
def test_tokens_equal_generate(server, model, i):
    prompt, n, sampling = CASES[i]
    r = create(server.client, prompt, n, sampling)
    c = r.choices[0]
    ids = encode(prompt)
    want = reference(model, ids, n, **sampling)
    assert c.token_ids == want
    assert c.prompt_token_ids == ids
    assert c.text == text_of(want)
    assert c.finish_reason == ("stop" if want[-1] == EOS and not sampling.get("ignore_eos") else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), len(want),
                                                                                      len(ids) + len(want))


def test_overlapping_requests_equal_generate(server, model):
    """All cases at once, twice over (more requests than slots, each started at a different time), half of
    them streamed: every request's tokens are still generate's."""
    results, errors = {}, []

    def run(k):
        try:
            prompt, n, sampling = CASES[k % len(CASES)]
            time.sleep(0.01 * k)
            if k % 2:
                ids, text = [], ""
                for ch in create(server.client, prompt, n, sampling, stream=True):
                    ids += ch.choices[0].token_ids
                    text += ch.choices[0].text
                results[k] = (ids, text)
            else:
                c = create(server.client, prompt, n, sampling).choices[0]
                results[k] = (c.token_ids, c.text)
        except Exception as e:          # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2 * len(CASES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for k, (ids, text) in sorted(results.items()):
        prompt, n, sampling = CASES[k % len(CASES)]
        want = reference(model, encode(prompt), n, **sampling)
        assert ids == want, k
        assert text == text_of(want), k
    assert len(results) == 2 * len(CASES)


def test_streaming_sse(server, model):
    """Raw SSE: `data: {...}` chunks, the finish reason on the last choice chunk, usage, `data: [DONE]`."""
    body = {"model": NAME, "prompt": "for i in", "max_tokens": 20, "temperature": 0.9, "seed": 9, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x]
    assert all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 9, "completion_tokens": 20,
                                                         "total_tokens": 29}
    choices = [c["choices"][0] for c in chunks[:-1]]
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["length"]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["object"] == "text_completion"
    want = reference(model, encode("for i in"), 20, temperature=0.9, seed=9, ignore_eos=True)
    assert "".join(c["text"] for c in choices) == text_of(want)


def test_stop_strings(server, model):
    ids = encode("def fibonacci(n):\n")
    full = text_of(reference(model, ids, 60, temperature=0.7, seed=11, ignore_eos=True))
    stop = full[20:23]
    cut = full[:full.index(stop)]
    for stream in (False, True):
        kw = dict(model=NAME, prompt="def fibonacci(n):\n", max_tokens=60, temperature=0.7, seed=11,
                  extra_body={"ignore_eos": True})
        if stream:
            chunks = [ch.choices[0]
                      for ch in server.client.completions.create(stop=[stop, "\x00never"], stream=True, **kw)]
            text, reason = "".join(c.text for c in chunks), chunks[-1].finish_reason
        else:
            c = server.client.completions.create(stop=stop, **kw).choices[0]
            text, reason = c.text, c.finish_reason
        assert (text, reason) == (cut, "stop"), stream
    # a stop string that never appears changes nothing
    c = server.client.completions.create(stop="\x00\x00never", **kw).choices[0]
    assert (c.text, c.finish_reason) == (full, "length")


def test_prompt_lists_echo_and_token_prompts(server, model):
    r = server.client.completions.create(model=NAME, prompt=["import os", "hello"], max_tokens=6, temperature=0,
                                         extra_body={"return_token_ids": True})
    assert [c.index for c in r.choices] == [0, 1]
    for c, p in zip(r.choices, ["import os", "hello"]):
        assert c.token_ids == reference(model, encode(p), 6, temperature=0.0)
    assert r.usage.prompt_tokens == len(encode("import os")) + len(encode("hello"))
    ids = encode("hello")
    r = server.client.completions.create(model=NAME, prompt=ids, max_tokens=5, temperature=0, echo=True)
    assert r.choices[0].text == "hello" + text_of(reference(model, ids, 5, temperature=0.0))
    r = server.client.completions.create(model=NAME, prompt="hello", max_tokens=0)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == ("", "length", 0)


BAD = [   # body (or raw bytes), status, param
    ({"prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    (b'{"prompt": "hi", ', 400, None),
    (b"\xff\xfe", 400, None),
    ([1, 2], 400, None),
    ({"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 513}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    ({"prompt": "x" * 300}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[1, 2], [300]]}, 400, "prompt"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "hi", "n": 2}, 400, "n"),
    ({"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "hi", "top_k": 0}, 400, "top_k"),
    ({"prompt": "hi", "stop": [1]}, 400, "stop"),
    ({"prompt": "hi", "stop": ""}, 400, "stop"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    ({"prompt": "hi", "seed": "7"}, 400, "seed"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
]


def test_bad_requests_get_json_errors_and_disturb_nobody(server, model):
    """A long stream runs while every bad request is refused with an OpenAI-style JSON error; the stream's
    tokens are still generate's."""
    prompt, n = "def fibonacci(n):\n", 300
    got = {}

    def long_stream():
        ids = []
        for ch in create(server.client, prompt, n, dict(temperature=0.8, seed=21, ignore_eos=True), stream=True):
            ids += ch.choices[0].token_ids
        got["ids"] = ids

    t = threading.Thread(target=long_stream)
    t.start()
    for body, status, param in BAD:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(server.url + "/v1/completions", timeout=30, **kw)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], body
        assert err["param"] == param, (body, err)
    for method, path, status in (("GET", "/v1/completions", 405), ("GET", "/nope", 404)):
        r = httpx.request(method, server.url + path)
        assert r.status_code == status and r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument supplied: foo"):
        server.client.completions.create(model=NAME, prompt="hi", extra_body={"foo": 1})
    t.join(120)
    assert got["ids"] == reference(model, encode(prompt), n, temperature=0.8, seed=21, ignore_eos=True)


def _wait(cond, timeout=10.0):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            return False
        time.sleep(0.02)
    return True


def test_queue_full_is_503(small):
    body = {"prompt": "x", "max_tokens": LONG, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as a, a.stream("POST", small.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()          # kept: a dropped iterator closes the connection (a disconnect)
        next(lines)                                     # it holds the only slot
        assert small.health()["busy"] == 1
        waiting = {}
        t = threading.Thread(target=lambda: waiting.update(r=httpx.post(
            small.url + "/v1/completions", json={"prompt": "y", "max_tokens": 3, "temperature": 0}, timeout=60)))
        t.start()
        assert _wait(lambda: small.health()["queued"] == 1)
        full = httpx.post(small.url + "/v1/completions", json={"prompt": "z", "max_tokens": 3})
        assert full.status_code == 503 and full.headers["retry-after"] == "1"
        assert full.json()["error"]["code"] == "server_overloaded"
        with pytest.raises(openai.APIStatusError) as e:
            small.client.completions.create(model=NAME, prompt="z", max_tokens=3)
        assert e.value.status_code == 503
    t.join(60)                                          # the first stream closed: the queued one runs
    assert waiting["r"].status_code == 200 and waiting["r"].json()["usage"]["completion_tokens"] == 3


def test_disconnect_frees_the_slot(small):
    cancelled0 = small.health()["cancelled"]
    body = {"prompt": "x", "max_tokens": LONG, "temperature": 0, "ignore_eos": True, "stream": True}
    for _ in range(2):
        with httpx.Client(timeout=30) as c, c.stream("POST", small.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert json.loads(next(lines)[6:])["choices"][0]["finish_reason"] is None
            assert small.health()["busy"] == 1
        assert _wait(lambda: small.health()["busy"] == 0, 5.0)
    # a non-streaming request whose client times out is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(small.url + "/v1/completions", json={**body, "stream": False}, timeout=1.0)
    assert _wait(lambda: small.health()["busy"] == 0, 5.0)
    assert small.health()["cancelled"] == cancelled0 + 3
    r = small.client.completions.create(model=NAME, prompt="ok", max_tokens=2)
    assert r.usage.completion_tokens == 2


def _percentiles(xs):
    xs = sorted(xs)
    return {f"p{q}": xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] for q in (50, 90, 99)}


async def _load(url, n_requests, concurrency, seed=0):
    import random
    rng = random.Random(seed)
    jobs = []
    for k in range(n_requests):
        words = " ".join(rng.choice(["def", "x", "import", "return", "self", "(", ")", "for"])
                         for _ in range(rng.randint(1, 40)))
        jobs.append((k, words, rng.randint(1, 48), rng.choice([0.0, 0.8]), rng.random() < 0.5))
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    sem = asyncio.Semaphore(concurrency)
    out, failures = {}, []

    async def one(k, prompt, n, temp, stream):
        async with sem:
            t0 = time.perf_counter()
            try:
                kw = dict(model=NAME, prompt=prompt, max_tokens=n, temperature=temp, seed=k,
                          extra_body={"return_token_ids": True})
                if stream:
                    ids, ttft = [], None
                    async for ch in await client.completions.create(stream=True, **kw):
                        ttft = ttft or time.perf_counter() - t0
                        ids += ch.choices[0].token_ids
                else:
                    ids = (await client.completions.create(**kw)).choices[0].token_ids
                    ttft = None
                out[k] = (ids, time.perf_counter() - t0, ttft)
            except Exception as e:      # counted as a failure
                failures.append(f"{k}: {e!r}")

    t0 = time.perf_counter()
    await asyncio.gather(*(one(*j) for j in jobs))
    wall = time.perf_counter() - t0
    await client.close()
    return jobs, out, failures, wall


@pytest.mark.parametrize("n_requests", [200])
def test_load(server, model, tmp_path, n_requests):
    """200 requests of mixed prompt and output lengths, half streamed, 32 in flight (16 slots, so half of them
    queue): no failure, every request's tokens equal generate's; latency percentiles to a file."""
    jobs, out, failures, wall = asyncio.run(_load(server.url, n_requests, 32))
    assert not failures, failures[:5]
    assert len(out) == n_requests
    for k, prompt, n, temp, _ in jobs:
        want = reference(model, encode(prompt), n, temperature=temp, seed=k)
        assert out[k][0] == want, k
    lat = _percentiles([v[1] for v in out.values()])
    ttft = _percentiles([v[2] for v in out.values() if v[2] is not None])
    tokens = sum(len(v[0]) for v in out.values())
    report = {"requests": n_requests, "concurrency": 32, "failures": 0, "wall_s": wall, "requests_per_s":
              n_requests / wall, "tokens_per_s": tokens / wall, "latency_s": lat, "ttft_s": ttft}
    (tmp_path / "load.json").write_text(json.dumps(report, indent=2))
    print(f"\nload: {n_requests} requests, 32 concurrent, {wall:.1f}s, {n_requests / wall:.1f} req/s, "
          f"{tokens / wall:.0f} tok/s; latency p50/p90/p99 {lat['p50']:.3f}/{lat['p90']:.3f}/{lat['p99']:.3f}s; "
          f"ttft p50/p90/p99 {ttft['p50']:.3f}/{ttft['p90']:.3f}/{ttft['p99']:.3f}s -> {tmp_path / 'load.json'}")
    assert server.health()["busy"] == 0


def test_bench_serve_smoke(tmp_path):
    """bench/serve.py's CPU path: a server of random tiny weights, two concurrency levels, serve.json."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--device", "cpu", "--preset", "tiny",
                        "--concurrency", "2", "4", "--requests", "8", "--max-tokens", "3", "6", "--prompt-len", "4",
                        "20", "--server-arg", "--threads 1", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads((tmp_path / "serve.json").read_text())
    assert [x["concurrency"] for x in rows] == [2, 4]
    for x in rows:
        assert x["failures"] == 0 and x["warmup_failures"] == 0 and x["requests"] == 8 and x["tokens_per_s"] > 0
        assert "server_health" not in x
        assert all(x[k]["p50"] <= x[k]["p90"] <= x[k]["p99"] for k in ("ttft_s", "itl_s", "e2e_s"))
    assert "tok/s" in r.stdout and "TTFT" in r.stdout


def test_text_stream_holds_partial_characters_and_stop_prefixes():
    from tnllm.serve.text import TextStream
    ts = TextStream(TOK, encode("p"), stop=["END", "\n\n"])
    out = [ts.push(t) for t in TOK.encode("é EXIT EN")]
    assert out[0] == ("", False) and out[1] == ("é", False)          # the 2-byte character comes out whole
    assert "".join(t for t, _ in out) == "é EXIT "                     # "EN" may start "END": held back
    assert ts.push(TOK.encode("D")[0]) == ("", True) and ts.push(65) == ("", True)
    ts = TextStream(TOK, encode("p"), stop=["END"])
    assert "".join(ts.push(t)[0] for t in TOK.encode("xEN")) == "x"
    assert ts.finish() == "EN"                                         # no stop came: the held text is text
    ts = TextStream(TOK, [], stop=())
    assert [ts.push(t)[0] for t in TOK.encode("☃")] == ["", "", "☃"]
    ts.push(0xE2 + 3)                                                  # a lone lead byte at the end
    assert ts.finish() == "\ufffd"


def test_cli_errors(tmp_path, capsys):
    from tnllm.baseline import TransformerLM
    from tnllm.cli import main
    import socket
    assert main(["serve", "--ckpt", str(tmp_path / "nope"), "--port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    save_model(TransformerLM(TransNormerConfig.from_preset("tiny")), tmp_path / "tf")
    TOK.save(tmp_path / "tf")
    assert main(["serve", "--ckpt", str(tmp_path / "tf"), "--device", "cpu", "--port", "0"]) == 2
    assert "TransNormerLLM" in capsys.readouterr().err
    assert main(["serve", "--preset", "tiny", "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err
    with socket.socket() as busy:  # a taken port fails at once, before the model loads
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--preset", "tiny", "--port", str(port)]) == 2
        assert f"--host/--port: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
