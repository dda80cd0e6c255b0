"""Helpers shared by the GPU benchmark scripts (attention.py, varlen.py): the device they time on (``DEV``,
set from ``--device``), the timer, and the decay rates of the benchmarked shapes; ``GraphTimer``, the
CUDA-graph timer of the small decode kernels (decode_kernel.py, gemv.py)."""
from __future__ import annotations

import time

import torch

DEV = "cuda"          # the scripts set it from --device before timing anything


def log(*a):
    print(*a, flush=True)


def bench(fn, grad_to_none=None, warmup=25, rep=100, cpu_warmup=3, cpu_reps=5) -> float:
    """Milliseconds per call: ``triton.testing.do_bench``'s median on CUDA; on CPU the median of ``cpu_reps``
    wall-clock calls after ``cpu_warmup`` (a smoke-test timing, not a measurement)."""
    if DEV != "cuda":
        ts = []
        for i in range(cpu_warmup + cpu_reps):
            t = time.perf_counter()
            fn()
            if i >= cpu_warmup:
                ts.append((time.perf_counter() - t) * 1e3)
        return sorted(ts)[len(ts) // 2]
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def decay_rates(H: int) -> torch.Tensor:
    """ALiBi slopes of layer 0 (the fastest decay of the model): s_h = 2^(-8(h+1)/H)."""
    return torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], dtype=torch.float32, device=DEV)


class GraphTimer:
    """Seconds per call of a closure over static buffers: on CUDA ``calls`` calls captured in one CUDA graph
    (after ``warmup`` eager runs on a side stream), the graph replayed ``replays`` times between CUDA events;
    elsewhere the wall-clock mean of ``calls`` calls after ``warmup`` (a smoke-test timing)."""

    def __init__(self, dev, calls: int, replays: int, warmup: int):
        self.dev, self.calls, self.replays, self.warmup = dev, calls, replays, warmup

    def __call__(self, fn) -> float:
        """Seconds per call of ``fn`` (a no-argument closure over static buffers)."""
        if self.dev.type != "cuda":
            for _ in range(self.warmup):
                fn()
            t0 = time.perf_counter()
            for _ in range(self.calls):
                fn()
            return (time.perf_counter() - t0) / self.calls
        side = torch.cuda.Stream(self.dev)
        side.wait_stream(torch.cuda.current_stream(self.dev))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream(self.dev).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(self.calls):
                fn()
        g.replay()
        torch.cuda.synchronize(self.dev)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(self.replays):
            g.replay()
        b.record()
        b.synchronize()
        del g
        return a.elapsed_time(b) / 1e3 / (self.replays * self.calls)
