"""``tnllm bench decode``: per-token decode latency and throughput, TNL against a Llama-style Transformer.

TNL decodes from a fixed-size state, so a context of c tokens only sets the LRPE position (over a random
non-zero state: the work does not depend on c); the Transformer attends over a static KV cache of c keys
(``StaticKV``: the new key written at slot c - 1, SDPA over all c). TNL runs each ``--paths`` entry
``POLICY:PATH``: the policy is ``graph`` (the step captured in one CUDA graph), ``compiled+graph``
(inductor first, then captured), ``eager`` or ``compiled`` (no graph: the CPU ones); the path is
``CudaGraphDecoder``'s ``decode_path`` (``aten``, ``kernel``, ``fused``, ``layer``, ``stack``). The Transformer runs ``graph``
(``eager`` on CPU) at the same batch sizes and contexts.

The roofline is the time to move a step's bytes once at ``--bandwidth`` (4.8 TB/s, the H200's nominal
HBM3e bandwidth, unless given): the weights a step reads (every parameter once; an untied embedding
table only by its rows), plus the state read and written (TNL) or the KV cache read (Transformer);
``% roofline`` = roofline / measured. The device's copy bandwidth (a device-to-device copy, read and write
counted) is measured in the same run, and ``% copy floor`` puts the same bytes at that measured bandwidth: the
floor of a step that reads its weights as fast as this machine copies memory.

``--int8``: the same TNL with its layers' Linear weights in torchao int8 weight-only
(``tnllm.compile.quantize_int8``), timed on ``--int8-paths``, with its greedy agreement against the
model-dtype weights (teacher-forced: both fed the same tokens) and its validation loss next to theirs,
on the validation split of the embedded corpus (or ``--data``), byte tokens, unless ``--ckpt`` gives a
trained model and its tokenizer.

Writes under ``--out``: ``decode.json`` (every measurement, saved as it is made), ``decode.md`` (the
table) and ``decode.png`` (tokens/s against batch, and ms/token against context).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

GiB = 1 << 30
NOMINAL_TBPS = 4.8                       # H200 HBM3e, nominal
CUDA_POLICIES = ("graph", "compiled+graph", "eager")
CPU_POLICIES = ("eager", "compiled")
PATHS = ("aten", "kernel", "fused", "layer", "stack")


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

    def __init__(self, tf, B: int, ctx: int, dtype, dev):
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
        from tnllm.baseline import apply_rope, rope_tables
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


def parse_paths(specs, dev) -> list[tuple[str, str]]:
    """``POLICY:PATH`` strings -> (policy, path); ValueError naming the bad one."""
    policies = CUDA_POLICIES if dev.type == "cuda" else CPU_POLICIES
    out = []
    for s in specs:
        pol, _, path = s.partition(":")
        if pol not in policies or path not in PATHS:
            raise ValueError(f"--paths: {s!r} must be POLICY:PATH with POLICY one of {list(policies)} on "
                             f"{dev.type} and PATH one of {list(PATHS)}")
        out.append((pol, path))
    return out


def default_paths(dev) -> list[str]:
    if dev.type == "cuda":
        return ["graph:aten", "graph:kernel", "graph:fused", "graph:layer", "graph:stack", "compiled+graph:aten",
                "compiled+graph:fused"]
    return ["eager:aten", "eager:kernel", "eager:fused"]


# -- the benchmark ---------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, preset: str):
        from tnllm import TransNormerConfig, TransNormerLLM
        from tnllm.baseline import TransformerLM, matched_config
        from tnllm.compile.quant import weight_bytes_read
        self.a, self.preset = args, preset
        self.dev = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = args.t0
        self.res = args.res
        self.paths = parse_paths(args.paths, self.dev)
        self.int8_paths = parse_paths(args.int8_paths, self.dev) if args.int8 else []
        self.tokenizer = None
        if args.ckpt:
            from tnllm.checkpoints import load_model
            self.tnl, self.tokenizer = load_model(args.ckpt, device=self.dev, dtype=self.dtype)
            if not isinstance(self.tnl, TransNormerLLM):
                raise ValueError(f"--ckpt {args.ckpt!r} is not a TransNormerLLM checkpoint")
            cfg = self.tnl.config
        else:
            cfg = TransNormerConfig.from_preset(preset)
            with torch.device(self.dev):
                self.tnl = TransNormerLLM(cfg).to(self.dtype).eval()
        self.cfg = cfg
        self.tf = None
        if args.baseline:
            with torch.device(self.dev):
                self.tf = TransformerLM(matched_config(cfg)).to(self.dtype).eval()
        self.tnl8 = None
        if args.int8:
            from tnllm.compile.quant import quantize_int8
            with torch.device(self.dev):
                self.tnl8 = TransNormerLLM(cfg).to(self.dtype).eval()
            self.tnl8.load_state_dict(self.tnl.state_dict())
            quantize_int8(self.tnl8, option="--int8")
        self.weight_bytes = {"tnl": weight_bytes_read(self.tnl)}
        if self.tf is not None:
            self.weight_bytes["transformer"] = weight_bytes_read(self.tf)
        if self.tnl8 is not None:
            self.weight_bytes["tnl_int8"] = weight_bytes_read(self.tnl8)
        self.state_bytes = sum(4 * math.prod(s) for s in self.tnl.state_shapes())      # per stream, fp32
        self.res["presets"][preset] = {
            "params": {"tnl": self.tnl.num_params(), **({"transformer": self.tf.num_params()} if self.tf else {})},
            "weight_GB": {k: round(v / 1e9, 4) for k, v in self.weight_bytes.items()},
            "weight_bytes": dict(self.weight_bytes), "state_bytes_per_stream": self.state_bytes,
            "state_MiB_per_stream": round(self.state_bytes / 2**20, 3)}

    # -- bookkeeping --
    def left(self) -> float:
        return self.a.budget - (time.perf_counter() - self.t0)

    def save(self):
        (self.out / self.a.json_name).write_text(json.dumps(self.res, indent=1) + "\n")

    def row(self, **kw):
        kw = {"preset": self.preset, **kw, "t": round(time.perf_counter() - self.t0, 1)}
        self.res["rows"].append(kw)
        print(json.dumps(kw), flush=True)
        self.save()

    def section(self, name, fn, need: float = 0.0):
        if self.left() < need:
            self.res["errors"].append({"preset": self.preset, "section": name,
                                       "error": f"skipped: {self.left():.0f}s of budget left"})
            self.save()
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a failed section must not lose the others' results
            self.res["errors"].append({"preset": self.preset, "section": name, "error": f"{type(e).__name__}: {e}",
                                       "trace": traceback.format_exc()[-3000:]})
            print(f"[{self.preset} {name}] failed: {type(e).__name__}: {e}", flush=True)
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

    def roofline_ms(self, name: str, extra_bytes: int, tbps: float | None = None) -> float:
        return (self.weight_bytes[name] + extra_bytes) / ((tbps or self.a.bandwidth) * 1e12) * 1e3

    def rooflines(self, name: str, extra_bytes: int, sec: float) -> dict:
        """The roofline columns of a row: at the assumed bandwidth (with and without ``extra_bytes``, the state
        or KV traffic) and, where this run measured it, at the device's copy bandwidth (``pct_copy_roofline``:
        the floor of a step that moves its bytes as fast as a device-to-device copy does on this machine)."""
        roof, wroof = self.roofline_ms(name, extra_bytes), self.roofline_ms(name, 0)
        cols = dict(roofline_ms=_sig(roof), pct_roofline=_sig(100 * roof / (sec * 1e3)),
                    pct_weight_roofline=_sig(100 * wroof / (sec * 1e3)))
        copy = self.res["meta"].get("copy_bandwidth_TBps")
        if copy:
            croof = self.roofline_ms(name, extra_bytes, copy)
            cols.update(copy_roofline_ms=_sig(croof), pct_copy_roofline=_sig(100 * croof / (sec * 1e3)))
        return cols

    # -- sections --
    def bandwidth(self):
        if "copy_bandwidth_TBps" not in self.res["meta"]:
            nbytes = 2 * GiB if self.dev.type == "cuda" else 256 * 2**20     # a CPU copies 2 GiB slowly
            self.res["meta"]["copy_bandwidth_TBps"] = _sig(copy_bandwidth(self.dev, nbytes) / 1e12)
            self.save()

    def _decoder(self, model, batch, policy, path):
        from tnllm.compile import CudaGraphDecoder
        return CudaGraphDecoder(model, batch, cuda_graph=policy.endswith("graph"), compile=policy.startswith("compiled"),
                                decode_path=path)

    def check(self, model, name, policy, path, int8=False):
        """Teacher-forced greedy agreement of one decode path with eager ``model.step`` (the aten step),
        batch 1: both are fed the reference's tokens (8 prompt tokens, then its greedy ones)."""
        ref_model = self.tnl if int8 else model
        dec = self._decoder(model, 1, policy, path)
        agree, clear, worst = teacher_forced(_eager_stepper(ref_model, 1, self.dev), dec.step,
                                             _prompt(self.cfg.vocab_size, 1, 8, self.dev), self.a.check_tokens)
        self.row(section="check", model=name, policy=policy, path=path, batch=1, tokens=self.a.check_tokens,
                 greedy_agreement=round(agree, 4), agreement_beyond_near_ties=round(clear, 4),
                 max_rel_logit_diff=float(f"{worst:.3g}"),
                 reference="eager model.step (aten), model dtype weights" if int8 else "eager model.step (aten)")
        del dec

    def tnl_decode(self, model, name, batch, policy, path):
        dev = self.dev
        self.mem_reset()
        t = time.perf_counter()
        dec = self._decoder(model, batch, policy, path)
        g = torch.Generator(device=dev).manual_seed(0)
        st = [torch.randn(s.shape, generator=g, device=dev) * 0.05 for s in dec.states]
        dec.reset(st, position=0)
        dec.step(torch.ones(batch, dtype=torch.int64, device=dev))       # capture (and compile)
        setup = time.perf_counter() - t
        run = dec.graph.replay if dec.graph is not None else dec.replay     # the bare replay on CUDA
        for ctx in self.a.contexts:
            dec.reset(st, position=ctx)
            sec = time_loop(run, self.a.steps, 3, dev)
            self.row(section="decode", model=name, policy=policy, path=path, batch=batch, context=ctx,
                     ms_per_token=round(sec * 1e3, 4), tokens_per_s=round(batch / sec, 1),
                     state_mib_per_stream=round(self.state_bytes / 2**20, 3), peak_gib=self.peak_gib(),
                     setup_s=round(setup, 1), **self.rooflines(name, 2 * batch * self.state_bytes, sec),
                     extra_mib=round(dec.fused.extra_bytes / 2**20, 1) if dec.fused is not None else 0.0)
        del dec

    def tf_decode(self, batch):
        tf, dev, cfg = self.tf, self.dev, self.tf.config
        policy = "graph" if dev.type == "cuda" else "eager"
        for ctx in self.a.contexts:
            need = 2 * cfg.decoder_layers * batch * ctx * cfg.hidden_dim * torch.finfo(self.dtype).bits // 8
            free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else need * 4
            if need > 0.8 * free:
                self.row(section="decode", model="transformer", policy=policy, path="sdpa", batch=batch, context=ctx,
                         ms_per_token=None, oom=f"KV cache needs {need / GiB:.1f} GiB, {free / GiB:.1f} GiB free")
                continue
            self.mem_reset()
            step = StaticKV(tf, batch, ctx, self.dtype, dev)
            run = graph_of(step, dev)
            sec = time_loop(run, self.a.steps, 3, dev)
            self.row(section="decode", model="transformer", policy=policy, path="sdpa", batch=batch, context=ctx,
                     ms_per_token=round(sec * 1e3, 4), tokens_per_s=round(batch / sec, 1), peak_gib=self.peak_gib(),
                     kv_mib_per_stream=round(step.cache_bytes / batch / 2**20, 2),
                     **self.rooflines("transformer", step.cache_bytes, sec))
            del step, run

    def int8_quality(self):
        """Greedy agreement of the int8 model with the model-dtype one (eager ``model.step``, teacher-forced,
        batch 4) and both validation losses."""
        B, n = 4, self.a.check_tokens
        agree, clear, worst = teacher_forced(_eager_stepper(self.tnl, B, self.dev, None),
                                             _eager_stepper(self.tnl8, B, self.dev, None),
                                             _prompt(self.cfg.vocab_size, B, 8, self.dev), n)
        base, q = self.val_loss(self.tnl), self.val_loss(self.tnl8)
        self.row(section="int8", model="tnl_int8", batch=B, tokens=n, greedy_agreement=round(agree, 4),
                 agreement_beyond_near_ties=round(clear, 4),
                 max_rel_logit_diff=float(f"{worst:.3g}"), val_loss=round(base, 5), val_loss_int8=round(q, 5),
                 val_loss_change=round(q - base, 5), val_tokens=self.a.val_batches * 4 * self.a.val_seq_len,
                 weights="random init" if not self.a.ckpt else self.a.ckpt,
                 weight_GB=round(self.weight_bytes["tnl"] / 1e9, 4),
                 weight_GB_int8=round(self.weight_bytes["tnl_int8"] / 1e9, 4))

    @torch.no_grad()
    def val_loss(self, model) -> float:
        from tnllm.data import PackedLoader, load_corpus, split_corpus, stdlib_corpus
        from tnllm.tokenizer import ByteTokenizer
        tok = self.tokenizer or ByteTokenizer()
        if tok.vocab_size > self.cfg.vocab_size:
            raise ValueError(f"the tokenizer's vocabulary ({tok.vocab_size}) exceeds the model's ({self.cfg.vocab_size})")
        docs = load_corpus(self.a.data) if self.a.data else stdlib_corpus()
        val = split_corpus(docs)[1] or docs
        enc = tok.encode_bytes if hasattr(tok, "encode_bytes") else (lambda b: tok.encode(b.decode("utf-8", "replace")))
        loader = PackedLoader(val, enc, self.a.val_seq_len, 4, tok.bos_id, tok.eos_id)
        losses = []
        for _ in range(self.a.val_batches):
            b = torch.as_tensor(loader.next_batch()).to(self.dev)
            logits = model(b[:, :-1])
            losses.append(float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1))))
        return sum(losses) / len(losses)

    def prefill(self):
        from tnllm.compile import CudaGraphDecoder
        dev = self.dev
        for T in self.a.prefill_lengths:
            for name, m in (("transformer", self.tf), ("tnl", self.tnl)):
                if m is None:
                    continue
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
                    self.row(section="decode_after_prefill", model="tnl", policy=_policy_of(dec), path=dec.decode_path,
                             batch=1, context=T, ms_per_token=round(sec * 1e3, 4))
                    del dec
                del out

    def run(self):
        a = self.a
        if "decode" in a.sections:
            self.section("bandwidth", self.bandwidth)
            for pol, path in self.paths:
                self.section(f"check {pol}:{path}", lambda p=pol, q=path: self.check(self.tnl, "tnl", p, q),
                             need=30 if pol.startswith("compiled") else 5)
            for pol, path in self.int8_paths:
                self.section(f"check int8 {pol}:{path}",
                             lambda p=pol, q=path: self.check(self.tnl8, "tnl_int8", p, q, int8=True),
                             need=30 if pol.startswith("compiled") else 5)
            if self.tnl8 is not None:
                self.section("int8 quality", self.int8_quality, need=10)
            for B in a.batch:
                for pol, path in self.paths:
                    self.section(f"tnl {pol}:{path} B{B}", lambda B=B, p=pol, q=path: self.tnl_decode(
                        self.tnl, "tnl", B, p, q), need=30 if pol.startswith("compiled") else 5)
                for pol, path in self.int8_paths:
                    self.section(f"tnl int8 {pol}:{path} B{B}", lambda B=B, p=pol, q=path: self.tnl_decode(
                        self.tnl8, "tnl_int8", B, p, q), need=30 if pol.startswith("compiled") else 5)
                if self.tf is not None:
                    self.section(f"transformer B{B}", lambda B=B: self.tf_decode(B), need=5)
        if "prefill" in a.sections and a.prefill_lengths:
            self.section("prefill", self.prefill, need=20)
        self.save()


def _sig(x: float, n: int = 3) -> float:
    return float(f"{x:.{n}g}")


def _policy_of(dec) -> str:
    g = "graph" if dec.cuda_graph else ""
    c = "compiled" if dec.compiled else ""
    return "+".join(x for x in (c, g) if x) or "eager"


def _prompt(V, B, T, dev):
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, V, (B, T), generator=g).to(dev)


def _eager_stepper(model, B, dev, kernel=False):
    st = model.zero_state(B, dev)

    def step(tok):
        nonlocal st
        with torch.no_grad():
            lg, st = model.step(tok, st, decode_kernel=kernel)
        return lg.float()
    return step


def teacher_forced(ref_step, other_step, ids, n) -> tuple[float, float, float]:
    """Feed ids [B, T] and then n of ``ref_step``'s greedy tokens to both ``step(tok [B]) -> logits``;
    returns (the fraction of steps and rows whose argmax agree; the same fraction over the rows that are not
    near-ties; the largest relative logit difference). A near-tie: the reference's top-1 / top-2 gap is at
    most 4x the row's RMS logit difference between the two paths, so rounding noise of that size can swap
    them (random-weight models have nearly flat logits: most of their rows are near-ties). 1.0 when every
    row is a near-tie."""
    agree, clear, worst, lr = [], [], 0.0, None
    for t in range(ids.shape[1] + n):
        tok = ids[:, t] if t < ids.shape[1] else lr.argmax(-1)
        lr, lo = ref_step(tok).float(), other_step(tok).float()
        worst = max(worst, float((lo - lr).norm() / lr.norm().clamp_min(1e-30)))
        if t >= ids.shape[1] - 1:
            same = lr.argmax(-1) == lo.argmax(-1)
            top2 = lr.topk(2, dim=-1).values
            rms = (lo - lr).pow(2).mean(-1).sqrt()
            agree.append(float(same.float().mean()))
            clear += same[(top2[:, 0] - top2[:, 1]) > 4 * rms].float().tolist()
    return sum(agree) / len(agree), (sum(clear) / len(clear) if clear else 1.0), worst


def _clear(r) -> str:
    """The near-tie-aware agreement of a row, as a prefix of its parenthesis (old rows lack it)."""
    c = r.get("agreement_beyond_near_ties")
    return "" if c is None else f"{c:.3f} beyond near-ties, "


def _device_name(dev) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine() or "cpu"


# -- report ----------------------------------------------------------------------------------------
def _label(r) -> str:
    return r["model"] if r["model"] == "transformer" else f"{r['model']} {r['policy']}:{r['path']}"


def write_report(res: dict, out: Path) -> str:
    meta = res["meta"]
    lines = [f"Device: {meta.get('device')}, torch {meta.get('torch')}, {meta.get('dtype')}; bandwidth assumed "
             f"{meta.get('bandwidth_TBps')} TB/s ({meta.get('bandwidth_note', '')})"
             + (f"; measured copy bandwidth {meta['copy_bandwidth_TBps']} TB/s" if "copy_bandwidth_TBps" in meta else ""),
             "roofline = (weights read + TNL state read and written | Transformer KV cache read) / bandwidth; "
             "% weights = the weights alone over the bandwidth, against the measured time; "
             "% copy floor = the same bytes at the measured copy bandwidth, against the measured time"]
    for p, info in res.get("presets", {}).items():
        lines.append(f"- {p}: params {', '.join(f'{k} {v / 1e6:.1f}M' for k, v in info['params'].items())}; "
                     f"weights read per step {', '.join(f'{k} {v} GB' for k, v in info['weight_GB'].items())}; "
                     f"TNL state {info['state_MiB_per_stream']} MiB per stream")
    head = ["preset", "model / policy:path", "batch", "context", "ms/token", "tokens/s", "state MiB/stream",
            "roofline ms", "% roofline", "% weights", "% copy floor"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [r for r in res["rows"] if r["section"] == "decode"]
    keys = []
    for r in rows:
        k = (r["preset"], r["batch"], r["context"])
        if k not in keys:
            keys.append(k)
    for k in keys:                       # TNL rows, then the Transformer beside them at the same point
        group = [r for r in rows if (r["preset"], r["batch"], r["context"]) == k]
        group.sort(key=lambda r: r["model"] == "transformer")
        for r in group:
            ms = r.get("ms_per_token")
            state = r.get("state_mib_per_stream", r.get("kv_mib_per_stream", ""))
            if r["model"] == "transformer" and state != "":
                state = f"KV {state}"
            lines.append("| " + " | ".join(str(c) for c in (
                r["preset"], _label(r), r["batch"], r["context"], ms if ms is not None else r.get("oom", ""),
                r.get("tokens_per_s", ""), state, r.get("roofline_ms", ""),
                f"{r['pct_roofline']}%" if r.get("pct_roofline") is not None else "",
                f"{r['pct_weight_roofline']}%" if r.get("pct_weight_roofline") is not None else "",
                f"{r['pct_copy_roofline']}%" if r.get("pct_copy_roofline") is not None else "")) + " |")
    flat = []
    for key in sorted({(r["preset"], _label(r), r["batch"]) for r in rows}):
        pts = {r["context"]: r["ms_per_token"] for r in rows
               if (r["preset"], _label(r), r["batch"]) == key and r.get("ms_per_token")}
        if len(pts) >= 2:
            lo, hi = min(pts), max(pts)
            flat.append(f"{key[0]} {key[1]} B={key[2]}: {pts[lo]} ms at {lo} -> {pts[hi]} ms at {hi} "
                        f"({100 * (pts[hi] / pts[lo] - 1):+.1f}%)")
    if flat:
        lines += ["", "Growth from the shortest to the longest context:", ""] + [f"- {f}" for f in flat]
    chk = [r for r in res["rows"] if r["section"] == "check"]
    if chk:
        lines += ["", "Greedy agreement (teacher-forced, batch 1) with eager `model.step`: " + ", ".join(
            f"{r['preset']} {r['model']} {r['policy']}:{r['path']} {r['greedy_agreement']:.3f} "
            f"({_clear(r)}max rel. logit diff {r['max_rel_logit_diff']})" for r in chk)]
    for r in (r for r in res["rows"] if r["section"] == "int8"):
        lines += ["", f"int8 ({r['preset']}, {r['weights']}): weights {r['weight_GB']} -> {r['weight_GB_int8']} GB; "
                  f"greedy agreement with the model dtype {r['greedy_agreement']:.3f} ({_clear(r)}teacher-forced, batch "
                  f"{r['batch']}, {r['tokens']} tokens; max rel. logit diff {r['max_rel_logit_diff']}); validation "
                  f"loss {r['val_loss']} -> {r['val_loss_int8']} ({r['val_loss_change']:+.5f}) over "
                  f"{r['val_tokens']} tokens"]
    pre = [r for r in res["rows"] if r["section"] == "prefill"]
    if pre:
        lines += ["", "| preset | prefill, batch 1 | length | seconds | tokens/s | peak GiB |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['preset']} | {r['model']} | {r['length']} | {r['seconds']} | {r['tokens_per_s']} | "
                  f"{r.get('peak_gib') or ''} |" for r in pre]
    if res["errors"]:
        lines += ["", "Not measured: " + "; ".join(f"{e.get('preset', '')} {e['section']}: {e['error']}"
                                                  for e in res["errors"])]
    text = "\n".join(lines) + "\n"
    (out / "decode.md").write_text(text)
    return text


def plot(res: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in res["rows"] if r["section"] == "decode" and r.get("ms_per_token")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in sorted({(r["preset"], _label(r), r["context"]) for r in rows}):
        pts = sorted((r["batch"], r["tokens_per_s"]) for r in rows if (r["preset"], _label(r), r["context"]) == key)
        style = "--s" if key[1] == "transformer" else "-o"
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{key[0]} {key[1]} ctx {key[2]}", ms=4)
    for key in sorted({(r["preset"], _label(r), r["batch"]) for r in rows}):
        pts = sorted((r["context"], r["ms_per_token"]) for r in rows if (r["preset"], _label(r), r["batch"]) == key)
        style = "--s" if key[1] == "transformer" else "-o"
        axes[1].plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{key[0]} {key[1]} B={key[2]}", ms=4)
    for ax, xl, yl in zip(axes, ("batch", "context (tokens)"), ("tokens/s", "ms per token")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=5)
    axes[0].set_title(f"decode throughput ({res['meta'].get('device')})", fontsize=9)
    axes[1].set_title("decode latency against context", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "decode.png", dpi=110)
    plt.close(fig)


# -- command line ------------------------------------------------------------------------------------
def _positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", nargs="+", default=["385M"], help="model preset(s), run one after the other")
    p.add_argument("--ckpt", default=None, help="a trained TNL checkpoint instead of a random-init preset "
                                                "(its tokenizer for the int8 validation loss)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="model dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--batch", "--batches", dest="batch", type=_positive, nargs="+", default=[1, 8, 64, 256],
                   help="batch sizes (rows decoded together)")
    p.add_argument("--contexts", type=_positive, nargs="+", default=[1024, 131072],
                   help="TNL: the LRPE position; Transformer: the KV-cache length")
    p.add_argument("--paths", nargs="+", default=None, metavar="POLICY:PATH",
                   help="TNL decode configurations (default on CUDA: graph:aten graph:kernel graph:fused graph:layer "
                        "graph:stack compiled+graph:aten compiled+graph:fused; on CPU: eager:aten eager:kernel eager:fused)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-compile drops the compiled policies from --paths")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="the parameter-matched Transformer (static KV cache) at the same batches and contexts")
    p.add_argument("--int8", action="store_true", help="also the TNL with torchao int8 weight-only layers "
                                                       "(needs torchao: pip install 'tnllm[int8]')")
    p.add_argument("--int8-paths", nargs="+", default=None, metavar="POLICY:PATH",
                   help="the int8 model's configurations (default on CUDA: compiled+graph:fused "
                        "compiled+graph:kernel, since eager torchao weight-only converts each weight to the "
                        "activation dtype on every call; on CPU: eager:fused)")
    p.add_argument("--coordinate-descent-tuning", action="store_true",
                   help="inductor's coordinate_descent_tuning for the compiled policies: batch-1 matmuls become "
                        "fused reductions (which also fuses torchao's int8 -> activation-dtype conversion)")
    p.add_argument("--bandwidth", type=float, default=NOMINAL_TBPS, help="TB/s assumed for the roofline "
                                                                         "(4.8: the H200's nominal HBM3e)")
    p.add_argument("--steps", type=_positive, default=50, help="timed steps per point (after 3 warm-ups)")
    p.add_argument("--check-tokens", type=_positive, default=16, help="greedy tokens of the agreement checks")
    p.add_argument("--val-batches", type=_positive, default=4, help="int8: validation batches of 4 rows")
    p.add_argument("--val-seq-len", type=_positive, default=512, help="int8: validation sequence length")
    p.add_argument("--data", default=None, help="int8: validation text (default: the embedded corpus)")
    p.add_argument("--prefill-lengths", type=_positive, nargs="*", default=[],
                   help="also time batch-1 prefill at these lengths (and decode from its state)")
    p.add_argument("--sections", nargs="+", default=["decode", "prefill"], choices=["decode", "prefill"],
                   help="what to run (prefill only with --prefill-lengths)")
    p.add_argument("--budget", type=float, default=1e9, help="seconds; later sections are skipped past it")
    p.add_argument("--json-name", default="decode.json", help="file name of the results under --out")
    p.add_argument("--out", default="bench_results", help="folder for decode.json, decode.md, decode.png")
    p.add_argument("--report", nargs="+", default=None, metavar="JSON",
                   help="only merge these result files into decode.md / decode.png under --out (no device)")


def run(a: argparse.Namespace) -> dict:
    """Run the benchmark the parsed arguments describe; returns the results (also written under ``--out``)."""
    out = Path(a.out)
    if a.report:
        res = {"meta": {}, "presets": {}, "rows": [], "errors": []}
        for f in a.report:
            r = json.loads(Path(f).read_text())
            for k, v in r.get("meta", {}).items():
                res["meta"].setdefault(k, v)
            res["presets"].update(r.get("presets", {}))
            res["rows"] += r["rows"]
            res["errors"] += r["errors"]
        out.mkdir(parents=True, exist_ok=True)
        print(write_report(res, out))
        plot(res, out)
        return res
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but CUDA is not available (use --device cpu with a small preset)")
    if a.dtype is None:
        a.dtype = "bfloat16" if dev.type == "cuda" else "float32"
    if a.bandwidth <= 0:
        raise ValueError(f"--bandwidth must be > 0 TB/s, got {a.bandwidth}")
    a.paths = a.paths or default_paths(dev)
    if not a.compile:
        a.paths = [p for p in a.paths if not p.startswith("compiled")]
    parse_paths(a.paths, dev)
    if a.int8:
        from tnllm.compile.quant import require_torchao
        require_torchao("--int8")
        a.int8_paths = a.int8_paths or (["compiled+graph:fused", "compiled+graph:kernel"] if dev.type == "cuda"
                                        else ["eager:fused"])
        if not a.compile:
            a.int8_paths = [p for p in a.int8_paths if not p.startswith("compiled")]
        parse_paths(a.int8_paths, dev)
    if a.ckpt and len(a.preset) > 1:
        raise ValueError("--ckpt measures one model: give no more than one --preset with it")
    for name in ("recompile_limit", "cache_size_limit"):     # one decoder compile per batch size and path
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    if a.coordinate_descent_tuning:
        import torch._inductor.config as inductor_config
        inductor_config.coordinate_descent_tuning = True
    a.t0 = time.perf_counter()
    a.res = {"meta": {"torch": torch.__version__, "device": _device_name(dev), "dtype": a.dtype,
                      "python": platform.python_version(), "argv": sys.argv[1:], "bandwidth_TBps": a.bandwidth,
                      "bandwidth_note": "the H200's nominal HBM3e" if a.bandwidth == NOMINAL_TBPS else "given",
                      "coordinate_descent_tuning": bool(a.coordinate_descent_tuning)},
             "presets": {}, "rows": [], "errors": []}
    print(f"bandwidth assumed for the roofline: {a.bandwidth} TB/s", flush=True)
    for preset in a.preset:
        torch.manual_seed(0)
        b = Bench(a, preset)
        b.run()
        del b
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)
    (out / a.json_name).write_text(json.dumps(a.res, indent=1) + "\n")
    print(write_report(a.res, out))
    plot(a.res, out)
    return a.res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tnllm bench decode", description=__doc__.split("\n\n")[0])
    add_args(p)
    run(p.parse_args(argv))
    return 0
