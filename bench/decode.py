"""Decode benchmark: per-token latency and memory against context length, TNL vs a Llama-style Transformer.

TNL decodes from a fixed-size state, so a context of c tokens only sets the LRPE position (and the
state's contents, which do not change the work); the Transformer attends over a KV cache of c keys.
Both run the same policy: a static-buffer step captured in a CUDA graph (``graph``); TNL also with
the step compiled by inductor first (``compiled``). On CPU the steps run eagerly.

The Transformer is ``tnllm.baseline.TransformerLM`` of ``matched_config`` (same parameter count),
driven by a static KV cache here (its own ``step`` grows the cache by ``torch.cat``, which copies it
every token and cannot be captured). Prefill throughput: the parallel paths (Lightning Attention op
vs SDPA causal) over T tokens, logits of the last position only.

    python bench/decode.py --device cuda --preset 385M --out results/          # H200
    python bench/decode.py --device cpu --preset small --contexts 256 2048 --batches 1 4 --steps 10

Writes ``decode.json`` (every measurement, appended as it is made), ``decode.md`` (tables) and
``decode.png`` (plot) under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from tnllm import TransNormerConfig, TransNormerLLM
from tnllm.baseline import TransformerLM, apply_rope, matched_config, rope_tables
from tnllm.compile import CudaGraphDecoder

GiB = 1 << 30


# -- timing ---------------------------------------------------------------------------------------
def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_loop(fn, steps: int, warmup: int, dev) -> float:
    """Mean seconds per call of ``fn`` over ``steps`` calls (after ``warmup``)."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    if dev.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3 / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def copy_bandwidth(dev, nbytes: int = 2 * GiB) -> float:
    """Device copy bandwidth in bytes/s (read + write counted)."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
    y = torch.empty_like(x)
    t = time_loop(lambda: y.copy_(x), 10, 3, dev)
    del x, y
    return 2 * nbytes / t


# -- the Transformer with a static KV cache ---------------------------------------------------------
class StaticKV:
    """One decode step of ``TransformerLM`` at context ``ctx``: writes the new key at position ctx - 1 of
    a cache of ``ctx`` slots and attends over all of them (SDPA). Replaying it is the per-token work at
    that context (the slot is overwritten each time)."""

    def __init__(self, tf: TransformerLM, B: int, ctx: int, dtype, dev):
        cfg = tf.config
        self.tf, self.B, self.H, self.e = tf, B, cfg.decoder_attention_heads, cfg.head_dim
        shape = (B, self.H, ctx, self.e)
        self.caches = [(torch.randn(shape, dtype=dtype, device=dev).mul_(0.5),
                        torch.randn(shape, dtype=dtype, device=dev).mul_(0.5)) for _ in tf.model.layers]
        self.ids = torch.ones(B, dtype=torch.int64, device=dev)
        self.pos = torch.full((1,), ctx - 1, dtype=torch.int64, device=dev)
        self.logits = torch.zeros(B, cfg.vocab_size, dtype=torch.float32, device=dev)
        self.cache_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in self.caches)

    @torch.no_grad()
    def __call__(self):
        tf, B, H, e = self.tf, self.B, self.H, self.e
        x = tf.model.embed_tokens(self.ids)[:, None, :]
        cos, sin = rope_tables(e, self.pos, tf.rope_theta)
        for layer, (kc, vc) in zip(tf.model.layers, self.caches):
            a = layer.attn
            h = layer.attn_norm(x)
            q, k, v = (p(h).view(B, 1, H, e).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            kc.index_copy_(2, self.pos, k)
            vc.index_copy_(2, self.pos, v)
            o = F.scaled_dot_product_attention(q, kc, vc)
            x = x + a.o_proj(o.transpose(1, 2).reshape(B, 1, H * e))
            x = x + layer.mlp(layer.mlp_norm(x))
        self.logits.copy_(tf.head(x)[:, 0])


def graph_of(fn, dev, warmup: int = 2):
    """Capture ``fn`` in a CUDA graph (returns graph.replay), or ``fn`` itself off CUDA."""
    if dev.type != "cuda":
        return fn
    s = torch.cuda.Stream(dev)
    s.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(dev).wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


# -- sections --------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        self.a = args
        self.dev = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()
        self.res = {"meta": {"torch": torch.__version__, "device": _device_name(self.dev), "preset": args.preset,
                             "dtype": args.dtype, "python": platform.python_version(), "argv": sys.argv[1:]},
                    "rows": [], "errors": []}
        cfg = TransNormerConfig.from_preset(args.preset)
        with torch.device(self.dev):
            self.tnl = TransNormerLLM(cfg).to(self.dtype).eval()
            self.tf = TransformerLM(matched_config(cfg)).to(self.dtype).eval()
        self.res["meta"]["params"] = {"tnl": self.tnl.num_params(), "transformer": self.tf.num_params()}
        self.weight_bytes = {"tnl": _param_bytes(self.tnl), "transformer": _param_bytes(self.tf)}

    def left(self) -> float:
        return self.a.budget - (time.perf_counter() - self.t0)

    def save(self):
        (self.out / self.a.json_name).write_text(json.dumps(self.res, indent=1) + "\n")

    def row(self, **kw):
        kw["t"] = round(time.perf_counter() - self.t0, 1)
        self.res["rows"].append(kw)
        print(json.dumps(kw), flush=True)
        self.save()

    def section(self, name, fn, need: float = 0.0):
        if self.left() < need:
            self.res["errors"].append({"section": name, "error": f"skipped: {self.left():.0f}s of budget left"})
            self.save()
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a failed section must not lose the others' results
            self.res["errors"].append({"section": name, "error": f"{type(e).__name__}: {e}",
                                       "trace": traceback.format_exc()[-3000:]})
            print(f"[{name}] failed: {e}", flush=True)
            self.save()
        finally:
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()

    def mem_reset(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)

    def peak_gib(self):
        return round(torch.cuda.max_memory_allocated(self.dev) / GiB, 3) if self.dev.type == "cuda" else None

    # -- sections --
    def bandwidth(self):
        if self.dev.type != "cuda":
            return
        bw = copy_bandwidth(self.dev)
        self.res["meta"]["copy_bandwidth_TBps"] = round(bw / 1e12, 3)
        for name, wb in self.weight_bytes.items():
            self.res["meta"][f"{name}_weight_GB"] = round(wb / 1e9, 3)
        self.save()

    def check(self):
        """Graph decode == eager model.step on the benchmark model: greedy tokens (batch 1, 8 prompt
        tokens stepped, 16 generated). Stepping only, so no prefill kernel is involved."""
        m, n = self.tnl, 16
        ids = torch.randint(1, m.config.vocab_size, (1, 8), device=self.dev)
        st = m.zero_state(1, self.dev)

        def eager(tok):
            nonlocal st
            with torch.no_grad():
                lg, st = m.step(tok, st)
            return lg
        self.ref = (ids, _greedy_by_steps(eager, ids, n))
        self.agreement(CudaGraphDecoder(m, 1), False)

    def agreement(self, dec, compiled):
        ids, want = self.ref
        dec.reset()
        got = _greedy_by_steps(dec.step, ids, want.shape[1])
        self.row(section="check", policy=_policy(self.dev, compiled), batch=1, steps=want.shape[1],
                 greedy_agreement=float((got == want).float().mean()))

    def tnl_decode(self, batch: int, compiled: bool):
        m, dev = self.tnl, self.dev
        self.mem_reset()
        t = time.perf_counter()
        dec = CudaGraphDecoder(m, batch, compile=compiled)
        g = torch.Generator(device=dev).manual_seed(0)
        st = [torch.randn(s.shape, generator=g, device=dev) * 0.05 for s in dec.states]
        dec.reset(st, position=0)
        dec.step(torch.ones(batch, dtype=torch.int64, device=dev))       # capture (and compile)
        setup = time.perf_counter() - t
        run = dec.graph.replay if dec.graph is not None else dec.replay     # the bare replay on CUDA
        state_bytes = sum(s.numel() * 4 for s in dec.states)
        for ctx in self.a.contexts:
            dec.reset(st, position=ctx)
            sec = time_loop(run, self.a.steps, 3, dev)
            self.row(section="decode", model="tnl", policy=_policy(dev, compiled), batch=batch, context=ctx,
                     ms_per_token=round(sec * 1e3, 4), tokens_per_s=round(batch / sec, 1), peak_gib=self.peak_gib(),
                     state_mib=round(state_bytes / 2**20, 2), setup_s=round(setup, 1),
                     roofline_ms=self._roofline("tnl", state_bytes * 2))
        if compiled and batch == 1 and getattr(self, "ref", None) is not None:
            self.agreement(dec, True)
        del dec

    def tf_decode(self, batch: int):
        tf, dev, cfg = self.tf, self.dev, self.tf.config
        for ctx in self.a.contexts:
            need = 2 * cfg.decoder_layers * batch * ctx * cfg.hidden_dim * torch.finfo(self.dtype).bits // 8
            free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else need * 4
            if need > 0.8 * free:
                self.row(section="decode", model="transformer", policy=_policy(dev, False), batch=batch, context=ctx,
                         ms_per_token=None, oom=f"KV cache needs {need / GiB:.1f} GiB, {free / GiB:.1f} GiB free")
                continue
            self.mem_reset()
            step = StaticKV(tf, batch, ctx, self.dtype, dev)
            run = graph_of(step, dev)
            sec = time_loop(run, self.a.steps, 3, dev)
            self.row(section="decode", model="transformer", policy=_policy(dev, False), batch=batch, context=ctx,
                     ms_per_token=round(sec * 1e3, 4), tokens_per_s=round(batch / sec, 1), peak_gib=self.peak_gib(),
                     kv_gib=round(step.cache_bytes / GiB, 3), roofline_ms=self._roofline("transformer", step.cache_bytes))
            del step, run

    def prefill(self):
        dev = self.dev
        for T in self.a.prefill_lengths:
            for name, m in (("transformer", self.tf), ("tnl", self.tnl)):
                if self.left() < 20:
                    raise TimeoutError(f"budget spent before prefill T={T}")
                ids = torch.randint(1, m.config.vocab_size, (1, T), device=dev)

                def fn(m=m, ids=ids):
                    return m.prefill(ids, last_only=True)
                self.mem_reset()
                with torch.no_grad():
                    sec = time_loop(fn, 2, 1, dev)
                    out = fn()
                self.row(section="prefill", model=name, batch=1, length=T, seconds=round(sec, 4),
                         tokens_per_s=round(T / sec, 1), peak_gib=self.peak_gib())
                if name == "tnl":     # decode from the real state of a T-token prefill
                    dec = CudaGraphDecoder(m, 1)
                    dec.reset(out[1], position=T)
                    dec.step(torch.ones(1, dtype=torch.int64, device=dev))
                    run = dec.graph.replay if dec.graph is not None else dec.replay
                    sec = time_loop(run, self.a.steps, 3, dev)
                    self.row(section="decode_after_prefill", model="tnl", policy=_policy(dev, False), batch=1,
                             context=T, ms_per_token=round(sec * 1e3, 4))
                    del dec
                del out

    def _roofline(self, name, extra_bytes) -> float | None:
        bw = self.res["meta"].get("copy_bandwidth_TBps")
        if not bw:
            return None
        return round((self.weight_bytes[name] + extra_bytes) / (bw * 1e12) * 1e3, 4)


def _greedy_by_steps(step, ids, n):
    """Feed the prompt ids [B, T] through ``step(tok [B]) -> logits``, then n greedy tokens [B, n]."""
    for t in range(ids.shape[1]):
        lg = step(ids[:, t])
    out = []
    for _ in range(n):
        tok = lg.argmax(-1)
        out.append(tok)
        lg = step(tok)
    return torch.stack(out, 1)


def _param_bytes(m) -> int:
    seen, n = set(), 0
    for p in m.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel() * p.element_size()
    return n


def _policy(dev, compiled) -> str:
    return ("compiled+graph" if compiled else "graph") if dev.type == "cuda" else ("compiled" if compiled else "eager")


def _device_name(dev) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"


# -- report ----------------------------------------------------------------------------------------
def write_report(res: dict, out: Path) -> str:
    rows = [r for r in res["rows"] if r["section"] == "decode"]
    lines = [f"Device: {res['meta']['device']}, torch {res['meta']['torch']}, preset {res['meta']['preset']} "
             f"({res['meta']['dtype']}), params TNL {res['meta']['params']['tnl'] / 1e6:.1f}M / Transformer "
             f"{res['meta']['params']['transformer'] / 1e6:.1f}M"]
    if "copy_bandwidth_TBps" in res["meta"]:
        lines[0] += f"; measured copy bandwidth {res['meta']['copy_bandwidth_TBps']} TB/s"
    lines += ["", "| model | policy | batch | context | ms/token | tokens/s | peak GiB | state/KV MiB | roofline ms | % of roofline |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r.get("ms_per_token")
        kv = (round(r["kv_gib"] * 1024, 1) if r.get("kv_gib") is not None
              else r.get("state_mib") if r["model"] == "tnl" else None)
        roof = r.get("roofline_ms")
        pct = f"{100 * roof / ms:.0f}%" if (roof and ms) else ""
        lines.append(f"| {r['model']} | {r['policy']} | {r['batch']} | {r['context']} | "
                     f"{ms if ms is not None else r.get('oom', '')} | {r.get('tokens_per_s', '')} | "
                     f"{r.get('peak_gib', '') or ''} | {kv if kv is not None else ''} | {roof or ''} | {pct} |")
    flat = []
    for (model, pol, B) in sorted({(r["model"], r["policy"], r["batch"]) for r in rows}):
        pts = {r["context"]: r["ms_per_token"] for r in rows
               if (r["model"], r["policy"], r["batch"]) == (model, pol, B) and r.get("ms_per_token")}
        if len(pts) >= 2:
            lo, hi = min(pts), max(pts)
            flat.append(f"{model} {pol} B={B}: {pts[lo]} ms at {lo} -> {pts[hi]} ms at {hi} "
                        f"({100 * (pts[hi] / pts[lo] - 1):+.1f}%)")
    if flat:
        lines += ["", "Growth from the shortest to the longest context:", ""] + [f"- {f}" for f in flat]
    pre = [r for r in res["rows"] if r["section"] == "prefill"]
    if pre:
        lines += ["", "| prefill, batch 1 | length | seconds | tokens/s | peak GiB |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['length']} | {r['seconds']} | {r['tokens_per_s']} | {r.get('peak_gib') or ''} |"
                  for r in pre]
    after = [r for r in res["rows"] if r["section"] == "decode_after_prefill"]
    if after:
        lines += ["", "TNL decode from the real state of a prefill (graph, batch 1): "
                  + ", ".join(f"{r['context']}: {r['ms_per_token']} ms" for r in after)]
    chk = [r for r in res["rows"] if r["section"] == "check"]
    if chk:
        lines += ["", "Greedy agreement of the decode policy with eager `model.step`: "
                  + ", ".join(f"{r['policy']} {r['greedy_agreement']:.3f}" for r in chk)]
    if res["errors"]:
        lines += ["", "Not measured: " + "; ".join(f"{e['section']}: {e['error']}" for e in res["errors"])]
    text = "\n".join(lines) + "\n"
    (out / "decode.md").write_text(text)
    return text


def plot(res: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in res["rows"] if r["section"] == "decode" and r.get("ms_per_token")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({(r["model"], r["policy"], r["batch"]) for r in rows}):
        pts = sorted((r["context"], r["ms_per_token"], r.get("peak_gib")) for r in rows
                     if (r["model"], r["policy"], r["batch"]) == key)
        lab = f"{key[0]} {key[1]} B={key[2]}"
        style = "-o" if key[0] == "tnl" else "--s"
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, label=lab)
        if all(p[2] is not None for p in pts):
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], style, label=lab)
    for ax, yl in zip(axes, ("ms per token", "peak GiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[0].set_title(f"decode latency ({res['meta']['device']})", fontsize=9)
    axes[1].set_title("memory", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "decode.png", dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="385M")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--prefill-lengths", type=int, nargs="*", default=[1024, 8192, 32768, 131072])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the inductor-compiled step (compiled+graph)")
    p.add_argument("--budget", type=float, default=1e9, help="seconds; later sections are skipped past it")
    p.add_argument("--sections", nargs="+", default=["decode", "prefill"], choices=["decode", "prefill"],
                   help="run prefill in its own process to keep a failing kernel from poisoning the decode timings")
    p.add_argument("--json-name", default="decode.json", help="file name of the results under --out")
    p.add_argument("--out", default="bench_results")
    p.add_argument("--report", nargs="+", default=None, metavar="JSON",
                   help="only merge these result files into decode.md/decode.png under --out (no device)")
    a = p.parse_args(argv)
    if a.report:
        res = {"meta": {}, "rows": [], "errors": []}
        for f in a.report:
            r = json.loads(Path(f).read_text())
            res["meta"] = {**r["meta"], **res["meta"]} if res["meta"] else r["meta"]
            res["meta"].update({k: v for k, v in r["meta"].items() if k not in res["meta"]})
            res["rows"] += r["rows"]
            res["errors"] += r["errors"]
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        print(write_report(res, out))
        plot(res, out)
        return
    if a.dtype is None:
        a.dtype = "bfloat16" if a.device.startswith("cuda") else "float32"
    torch.manual_seed(0)
    b = Bench(a)
    if "decode" in a.sections:
        b.section("bandwidth", b.bandwidth)
        b.section("check", b.check)
        for B in a.batches:
            b.section(f"tnl_graph_B{B}", lambda B=B: b.tnl_decode(B, False))
        for B in a.batches:
            b.section(f"transformer_B{B}", lambda B=B: b.tf_decode(B))
        if a.compile:
            b.section("tnl_compiled_B1", lambda: b.tnl_decode(a.batches[0], True), need=60)
    if "prefill" in a.sections and a.prefill_lengths:
        b.section("prefill", b.prefill, need=20)
    if "decode" in a.sections and a.compile:
        for B in a.batches[1:]:
            b.section(f"tnl_compiled_B{B}", lambda B=B: b.tnl_decode(B, True), need=45)
    b.save()
    print(write_report(b.res, b.out))
    plot(b.res, b.out)


if __name__ == "__main__":
    main()
