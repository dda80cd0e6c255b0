"""One decoder layer's decode step (``tnllm.ops.decode_layer``) at a preset's layer shape, at each launch
configuration: the persistent launch (grid barriers) per layer, all the layers as one persistent stack launch
(``decode_stack_triton``: a barrier between two layers, the next layer's first tiles loaded ahead), and the staged
launches (five per layer, one per stage), against the fused step's six operations per layer (``FusedDecodeStep``'s layer: cuBLAS qkvu, ``gla_decode``,
``residual_gemv``, the l1|l2 GEMM, ``sglu_gate``, cuBLAS ``addmm_``).

On CUDA the layers' weights are ``--layers`` distinct copies (more bytes than the L2 cache, as in a real step:
the 385M preset's 24 layers are 0.67 GB), the step over all of them captured in one CUDA graph and replayed;
us per layer = elapsed / (replays * layers); TB/s = the layer's weight and state bytes over that time.

    python bench/decode_layer.py --device cuda --preset 385M --profile --out $OUT      # H200, ~60 s

``--profile`` also runs the default launch (per layer, and as one stack) with each program recording its SM's
cycle counter at every stage boundary, and prints the mean cycles of each stage and barrier wait.

Writes ``decode_layer.json`` under ``--out`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from benchutil import GraphTimer  # bench/ is on sys.path: the scripts run from it
from tnllm import TransNormerConfig
from tnllm.ops.decode_layer import triton as tri
from tnllm.ops.gemv import residual_gemv
from tnllm.ops.gla_decode import gla_decode_step
from tnllm.ops.sglu import sglu_gate

SWEEP = [tri.LayerConfig(prefetch=pf, num_warps=w, spin=sp) for pf in (False, True) for w in (4, 8, 16) for sp in (0, 1)]
SEGMENTS = ("qkvu", "barrier 1", "mixer", "barrier 2", "out", "barrier 3", "l1 l2 sglu", "barrier 4", "l3")
STACK_SEGMENTS = SEGMENTS + ("to barrier 5", "barrier 5")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="385M")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--lrpe", action="store_true", help="every layer with LRPE (else none: most released layers)")
    p.add_argument("--profile", action="store_true",
                   help="also time each stage inside the default launch (the SMs' cycle counters)")
    p.add_argument("--out", default="/tmp/decode_layer")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type != "cuda":
        p.error(f"--device {a.device}: the persistent launch needs a CUDA device (its grid barriers spin)")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = TransNormerConfig.from_preset(a.preset)
    d, H, e, g, L = cfg.decoder_embed_dim, cfg.decoder_attention_heads, cfg.head_dim, cfg.glu_dim, a.layers
    h = H * e
    gen = torch.Generator(device=dev).manual_seed(0)

    def w(n, k):
        return (torch.randn(n, k, device=dev, generator=gen) * k ** -0.5).to(dt)

    layers = [dict(wq=w(4 * h, d), wo=w(d, h), w1=w(g, d), w2=w(g, d), w3=w(d, g)) for _ in range(L)]
    for lay in layers:
        lay["w12"] = torch.cat([lay["w1"], lay["w2"]])
    s = torch.rand(H, device=dev, generator=gen)
    theta = (10000 ** (-2 / h * torch.arange(h, device=dev))).reshape(H, 1, e) if a.lrpe else None
    Dk = 2 * e if a.lrpe else e
    wbytes = (4 * h * d + d * h + 3 * g * d) * torch.finfo(dt).bits // 8
    timer = GraphTimer(dev, calls=1, replays=a.replays, warmup=2)
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for B in a.batch:
        x = (torch.randn(B, d, device=dev, generator=gen)).to(dt)
        states = [torch.randn(B, H, Dk, e, device=dev, generator=gen) * 0.1 for _ in range(L)]
        pos = torch.full((B,), 1000, device=dev, dtype=torch.int64) if a.lrpe else None
        sbytes = 2 * B * H * Dk * e * 4

        def fused():
            xx = x
            for lay, S in zip(layers, states):
                qkvu = F.linear(xx, lay["wq"])
                y, _ = gla_decode_step(qkvu, S, s, theta, pos, "silu", inplace=True, norm_input=xx)
                xx = residual_gemv(xx, y, lay["wo"])
                g12 = sglu_gate(F.linear(xx, lay["w12"]), xx, "none")
                xx = xx.addmm_(g12, lay["w3"].t())

        def layer_fn(cfgk, persistent):
            def run():
                for lay, S in zip(layers, states):
                    tri.decode_layer_triton(x, S, lay["wq"], lay["wo"], lay["w1"], lay["w2"], lay["w3"], s, theta,
                                            pos, "silu", "none", persistent=persistent, cfg=cfgk)
            return run

        cands = [("fused (6 ops)", None, fused)]
        cands += [(f"persistent prefetch={c.prefetch} spin={c.spin} warps={c.num_warps}", c, layer_fn(c, True))
                  for c in SWEEP]
        cands += [("staged (5 launches) default", tri.LayerConfig(), layer_fn(tri.LayerConfig(), False))]
        stacked = torch.stack(states)
        stack_w = [[lay[k] for lay in layers] for k in ("wq", "wo", "w1", "w2", "w3")]
        rates, thetas = [s] * L, ([theta] * L if a.lrpe else None)

        def stack_fn(cfgk, profile=None):
            def run():
                tri.decode_stack_triton(x, stacked, *stack_w, rates, thetas, pos, "silu", "none", persistent=True,
                                        cfg=cfgk, profile=profile)
            return run

        cands += [(f"stack of {L}, prefetch={pf}", tri.LayerConfig(prefetch=pf), stack_fn(tri.LayerConfig(prefetch=pf)))
                  for pf in (True, False)]
        for name, c, fn in cands:
            try:
                sec = timer(fn) / L
            except Exception as ex:                      # a configuration that fails to compile or run
                rows.append(dict(batch=B, impl=name, error=repr(ex)[:300]))
                print(f"B{B} {name}: ERROR {ex!r}"[:300], flush=True)
                continue
            r = dict(batch=B, impl=name, us_per_layer=sec * 1e6, tbps=(wbytes + sbytes) / sec / 1e12,
                     cfg=None if c is None else c.__dict__)
            rows.append(r)
            print(f"B{B} {name:40s} {r['us_per_layer']:8.2f} us/layer  {r['tbps']:.2f} TB/s", flush=True)
            with open(os.path.join(a.out, "decode_layer.json"), "w") as f:
                json.dump(dict(preset=a.preset, layers=L, lrpe=a.lrpe, dtype=str(dt), rows=rows), f, indent=1)
        if a.profile:
            nprog = tri._num_sms(dev)
            ts = torch.zeros(L, nprog, 16, dtype=torch.int64, device=dev)

            def prof():
                for i, (lay, S) in enumerate(zip(layers, states)):
                    tri.decode_layer_triton(x, S, lay["wq"], lay["wo"], lay["w1"], lay["w2"], lay["w3"], s, theta,
                                            pos, "silu", "none", persistent=True, profile=ts[i])
            sec = timer(prof) / L
            cyc = (ts[:, :, 1:10] - ts[:, :, 0:9]).double()          # [L, nprog, 9] cycles per segment
            mean, mx = cyc.mean((0, 1)).tolist(), cyc.amax(1).mean(0).tolist()
            total = (ts[:, :, 9] - ts[:, :, 0]).double().mean().item()
            seg = {n: dict(mean_cycles=m, max_cycles=x_) for n, m, x_ in zip(SEGMENTS, mean, mx)}
            rows.append(dict(batch=B, impl="profile (default config)", us_per_layer=sec * 1e6, total_cycles=total,
                             segments=seg))
            print(f"B{B} profile: {sec * 1e6:.2f} us/layer with the marks, {total:.0f} cycles in the kernel "
                  f"({total / 1.98e3:.2f} us at 1.98 GHz)", flush=True)
            for n, m, x_ in zip(SEGMENTS, mean, mx):
                print(f"    {n:12s} mean {m:8.0f} cycles ({m / 1.98e3:6.2f} us)   slowest program {x_:8.0f}", flush=True)
            tss = torch.zeros(L, nprog, 16, dtype=torch.int64, device=dev)
            sec = timer(stack_fn(tri.LayerConfig(), tss)) / L
            ends = torch.cat([tss[:-1, :, 11], tss[-1:, :, 9]])           # the last layer has no barrier 5
            # the stages of every layer; the barrier between layers of all but the last
            mean = ((tss[:, :, 1:10] - tss[:, :, 0:9]).double().mean((0, 1)).tolist()
                    + (tss[:-1, :, 10:12] - tss[:-1, :, 9:11]).double().mean((0, 1)).tolist())
            per_layer = (ends - tss[:, :, 0]).double().mean().item()
            seg = {n: dict(mean_cycles=m) for n, m in zip(STACK_SEGMENTS, mean)}
            rows.append(dict(batch=B, impl=f"profile (stack of {L})", us_per_layer=sec * 1e6,
                             cycles_per_layer=per_layer, segments=seg))
            print(f"B{B} stack profile: {sec * 1e6:.2f} us/layer with the marks, {per_layer:.0f} cycles per layer "
                  f"({per_layer / 1.98e3:.2f} us at 1.98 GHz)", flush=True)
            for n, m in zip(STACK_SEGMENTS, mean):
                print(f"    {n:12s} mean {m:8.0f} cycles ({m / 1.98e3:6.2f} us)", flush=True)
            with open(os.path.join(a.out, "decode_layer.json"), "w") as f:
                json.dump(dict(preset=a.preset, layers=L, lrpe=a.lrpe, dtype=str(dt), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
