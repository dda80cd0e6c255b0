"""The host's share of a Lightning Attention call, measured on any machine (no GPU): the launchers' Python (tile
and split choice, allocations, argument lists) with the Triton kernel launches stubbed out, and the argument
binder that Triton's JIT runs on every launch of the sweep kernel (its specialisation and cache key).

    python bench/launch_host.py                      # the 385M training shape: B2 H8 T8192 D128, bf16
    python bench/launch_host.py --shape 8,16,8192,64

Also the public call, ``lightning_attn(q, k, v, s).backward(do)``, with the same stubs (its checks, the eager fast
path's autograd.Function and the autograd engine on top of the launchers).

The tensors are CPU tensors of the given shape in the layout the model passes (token-major head slices); the
grids are sized for 132 SMs (an H200), as on the GPU. Prints microseconds per call (the median of ``--rounds``
rounds of ``--calls`` calls). What a real launch adds on top of the binder (the CUDA driver call) needs a GPU:
bench/op_host.py times the whole stack there, with and without the cached launches of ops/_launch.py.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


class _Stub:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kw)`` does nothing but count the launch."""
    launches = 0

    def __getitem__(self, grid):
        def run(*args, **kw):
            _Stub.launches += 1
        return run


def _per_call_us(fn, calls: int, rounds: int) -> float:
    for _ in range(calls):
        fn()
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        ts.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(ts)


def launchers(B, H, T, D, calls, rounds) -> dict:
    """Host us per call of the forward and backward launchers, and of the public ``lightning_attn(q, k, v,
    s).backward(do)`` (its input checks, the eager fast path's autograd.Function, the autograd engine) routed to
    the same stubbed launchers; with the launches each makes."""
    from tnllm.ops.lightning_attn import op
    from tnllm.ops.lightning_attn import triton as tri
    kernels = ("_la_sweep_kernel", "_la_local_state_kernel", "_la_prefix_kernel", "_la_dkdv_kernel")
    saved = {n: getattr(tri, n) for n in kernels + ("_num_sms",)}
    saved_op = {n: getattr(op, n) for n in ("_fwd_kernel", "_bwd_kernel")}
    try:
        for n in kernels:
            setattr(tri, n, _Stub())
        tri._num_sms = lambda device: 132
        # the eager fast path takes the CUDA kernels' route (CPU tensors would take the blocked form)
        op._fwd_kernel, op._bwd_kernel = op._fwd_cuda, op._bwd_cuda
        mk = lambda: torch.randn(B, T, H, D, dtype=torch.bfloat16).transpose(1, 2)
        q, k, v, do = mk(), mk(), mk(), mk()
        s = torch.linspace(0.1, 1.0, H)
        out = {}
        for name, fn in (("fwd", lambda: tri.lightning_attn_fwd_triton(q, k, v, s, None)),
                         ("bwd", lambda: tri.lightning_attn_bwd_triton(do, None, q, k, v, s, None))):
            out[f"{name}_us"] = _per_call_us(fn, calls, rounds)
            _Stub.launches = 0
            fn()
            out[f"{name}_launches"] = _Stub.launches
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        dc = do.contiguous()            # the output's own layout: no copy in the backward
        from tnllm.ops import lightning_attn

        def public():
            qg.grad = kg.grad = vg.grad = None      # no gradient accumulation (a CPU add of the whole tensor)
            lightning_attn(qg, kg, vg, s).backward(dc)
        out["public_fwdbwd_us"] = _per_call_us(public, max(1, calls // 4), rounds)
        _Stub.launches = 0
        public()
        out["public_launches"] = _Stub.launches
        return out
    finally:
        for n, f in saved.items():
            setattr(tri, n, f)
        for n, f in saved_op.items():
            setattr(op, n, f)


def binder(B, H, T, D, calls, rounds) -> dict:
    """Triton's per-launch argument binding + cache key of the forward sweep kernel (a CUDA sm_90 target)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    from tnllm.ops.lightning_attn import triton as tri
    fn = tri._la_sweep_kernel
    bind = create_function_from_signature(fn.signature, fn.params, make_backend(GPUTarget("cuda", 90, 32)))
    x = torch.empty(B, H, T, D, dtype=torch.bfloat16)
    f32, i32 = torch.empty(16), torch.empty(16, dtype=torch.int32)
    st = x.stride()[:3]
    args = (x, x, x, x, f32, f32, f32, f32, i32, f32, f32, T, H, 2, 1, T // 64, *st, *st, *st, *st,
            0, 0, 0, 0, H * D * D, D * D, D, 1)
    kw = dict(DA=D, DC=D, BA=D, BC=64, CHUNK=64, REVERSE=False, E0=0, HAS_S0=False, WRITE_SF=True, SF_SHIFT=False,
              IEEE=False, NF=0, WRITE_FLAG=True, REDO=False, VARLEN=False, WT=False, PREFIX=False,
              KDEC_C=True, WHERE0=False, EVEN=False, ST=False, num_warps=4, num_stages=2,
              debug=False, instrumentation_mode="")
    memo: dict = {}
    _, spec, opts = bind(*args, **kw)
    return dict(triton=triton.__version__, runtime_args=len(args),
                binder_us=_per_call_us(lambda: bind(*args, **kw), calls, rounds),
                cache_key_us=_per_call_us(lambda: compute_cache_key(memo, spec, opts), calls, rounds))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="2,8,8192,128", help="B,H,T,D (Dk = Dv = D)")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    try:
        B, H, T, D = (int(x) for x in a.shape.split(","))
    except ValueError:
        ap.error(f"--shape: expected B,H,T,D (four integers), got {a.shape!r}")
    print(f"B{B} H{H} T{T} D{D} bf16, launchers with the kernels stubbed out:", launchers(B, H, T, D, a.calls, a.rounds))
    try:
        print("Triton's binder for one sweep launch:", binder(B, H, T, D, a.calls, a.rounds))
    except Exception as e:       # a Triton without the CUDA backend, or another binder API
        print(f"Triton's binder: not measured here ({type(e).__name__}: {e})")


if __name__ == "__main__":
    main()
