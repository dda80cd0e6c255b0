"""``tnllm check``: the property suite of tnllm.testing on the user's device, as a table."""
from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from typing import Callable, Sequence

import torch

DEFAULT_OP = "tnllm.ops:lightning_attn"


def load_op(spec: str) -> Callable:
    """'module:function' (or 'module.function') -> the callable."""
    mod, sep, attr = spec.partition(":")
    if not sep:
        mod, _, attr = spec.rpartition(".")
    if not mod or not attr:
        raise ValueError(f"`--op` must be 'module:function', got {spec!r}")
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise ValueError(f"`--op` {spec!r}: cannot import module {mod!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"`--op` {spec!r}: module {mod!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"`--op` {spec!r} is not callable")
    return obj


def _fmt(e: float) -> str:
    return "-" if e is None else ("inf" if e == math.inf else f"{e:.2e}")


def run_check(fn: Callable | None = None, *, op: str | None = None, device: str = "cpu", examples: int = 100,
              dtypes: Sequence[torch.dtype] | None = None, oracle: str = "naive", seed: int | None = None,
              edges: bool = True, rates: Sequence[str] | None = None, max_T: int = 256,
              dims: Sequence[int] | None = None, file=None) -> int:
    """Run the agreement suite (``examples`` drawn cases per dtype, o/S/dq/dk/dv/dS0 against the fp64
    ``oracle``) and, with ``edges``, the edge contract; print a table to ``file``. Returns 0 when
    every case passes, 1 otherwise."""
    import hypothesis
    from hypothesis import Phase

    import tnllm.testing as tt

    file = file or sys.stdout
    if fn is None:
        fn = load_op(op or DEFAULT_OP)
    name = op or getattr(fn, "__module__", "?") + ":" + getattr(fn, "__qualname__", "?")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("`--device cuda` asked for, but torch.cuda.is_available() is False")
    if not isinstance(examples, int) or examples < 1:
        raise ValueError(f"`examples` must be a positive int, got {examples!r}")
    if dtypes is None:
        dtypes = (torch.bfloat16, torch.float16, torch.float32) if dev.type == "cuda" else (torch.float32, torch.float64)
    rates = tuple(rates) if rates else tt.RATES
    # on CUDA every new (Dk, Dv) is a new Triton specialisation (a compile), so fewer widths by default
    dims = tuple(dims) if dims else ((16, 128) if dev.type == "cuda" else (1, 4, 8, 16, 24, 32))
    if not all(isinstance(d, int) and d >= 1 for d in dims):
        raise ValueError(f"`dims` must be positive ints, got {dims}")
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"tnllm check: {name} on {device} ({where}), fp64 {oracle} oracle, {examples} drawn cases per dtype, "
          f"torch {torch.__version__}", file=file)
    head = ["dtype", "cases", "tol"] + list(tt.QUANTITIES) + ["result"]
    rows, failures = [], []
    t0 = time.perf_counter()
    for dt in dtypes:
        worst = {n: 0.0 for n in tt.QUANTITIES}
        seen = {n: False for n in tt.QUANTITIES}
        stats = {"n": 0, "bad": 0}
        tol = tt.TOL[dt]
        strat = tt.cases(devices=(device,), dtypes=(dt,), max_T=max_T, rates=rates, dims=dims)

        @hypothesis.settings(max_examples=examples, deadline=None, database=None, phases=(Phase.explicit, Phase.generate),
                             suppress_health_check=list(hypothesis.HealthCheck), derandomize=seed is None)
        @hypothesis.given(case=strat)
        def body(case):
            stats["n"] += 1
            try:
                errs = tt.case_errors(fn, case, oracle)
            except Exception as e:  # noqa: BLE001 - a crash of the function under test is a failed case
                stats["bad"] += 1
                failures.append(f"{case}: {type(e).__name__}: {e}")
                return
            for n, e in errs.items():
                seen[n] = True
                worst[n] = max(worst[n], e)
            if tt.beyond_tolerance(case, errs, tol, oracle)[0]:
                stats["bad"] += 1
                if len(failures) < 5:
                    failures.append(f"{case}: " + ", ".join(f"{n} {_fmt(e)}" for n, e in errs.items()))
        if seed is not None:
            body = hypothesis.seed(seed)(body)
        body()
        ok = stats["bad"] == 0
        dname = {v: k for k, v in tt.DTYPES.items()}[dt]
        print(f"  {dname}: {stats['n']} cases, {stats['bad']} failing ({time.perf_counter() - t0:.0f} s so far)",
              file=sys.stderr, flush=True)
        rows.append([dname, str(stats["n"]), f"{tol:.0e}"] + [_fmt(worst[n]) if seen[n] else "-" for n in tt.QUANTITIES]
                    + ["pass" if ok else f"FAIL ({stats['bad']})"])
    if edges:
        n_edge = min(examples, 50)
        edge_ok = True
        for dt in dtypes:
            dname = {v: k for k, v in tt.DTYPES.items()}[dt]
            try:
                tt.assert_edge_semantics(fn, device=device, dtypes=(dt,), max_examples=n_edge,
                                         bad_rates=(dt == dtypes[0]), dims=dims, max_T=min(max_T, 150))
            except Exception as e:  # noqa: BLE001
                edge_ok = False
                failures.append(f"edges {dname}: {type(e).__name__}: {str(e).splitlines()[0]}")
        rows.append(["edges", str(n_edge * len(dtypes)), "exact"] + ["-"] * len(tt.QUANTITIES)
                    + ["pass" if edge_ok else "FAIL"])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=file)
    note = ("; edges: a NaN/inf in q, k or v at t leaves o and dq before t and dk, dv after t bit-identical; "
            "s = inf is lambda = 0; a NaN or negative s raises") if edges else ""
    if any(dt in (torch.float16, torch.bfloat16) for dt in dtypes):
        note += (f"; fp16/bf16: a case above tol passes within {tt.COND_FACTOR:g}x the oracle's own change under a "
                 "unit-roundoff perturbation of the inputs")
    print(f"({time.perf_counter() - t0:.1f} s; worst relative error per quantity over the cases{note})", file=file)
    for f in failures:
        print("failed:", f, file=file)
    return 0 if not failures else 1


def add_parser(sub) -> None:
    """Register ``tnllm check`` on an argparse sub-parsers object."""
    c = sub.add_parser("check", help="property-test a Lightning Attention implementation on a device (a table)")
    c.add_argument("--device", default="cpu", help="the device the implementation runs on: cpu or cuda")
    c.add_argument("--op", default=None, help=f"module:function with lightning_attn's signature (None: {DEFAULT_OP})")
    c.add_argument("--examples", type=int, default=100, help="hypothesis-drawn cases per dtype")
    c.add_argument("--dtype", action="append", choices=("fp64", "fp32", "fp16", "bf16"), default=None,
                   help="input dtype, repeat for several (None: bf16, fp16, fp32 on cuda; fp32, fp64 on cpu)")
    c.add_argument("--oracle", choices=("naive", "recurrent", "loop"), default="naive",
                   help="the fp64 reference form the implementation is compared with")
    c.add_argument("--rates", default=None, help="comma list of decay kinds from zero,small,medium,large,inf (None: all)")
    c.add_argument("--max-T", type=int, default=256, help="longest drawn sequence")
    c.add_argument("--dims", default=None, help="comma list of head widths drawn for Dk and Dv "
                                                "(None: 16,128 on cuda; 1,4,8,16,24,32 on cpu)")
    c.add_argument("--seed", type=int, default=None, help="hypothesis seed (None: derandomized, the same cases every run)")
    c.add_argument("--no-edges", action="store_true", help="skip the edge contract (non-finite inputs, s = inf, bad s)")
    c.set_defaults(fn=cmd_check)


def cmd_check(a: argparse.Namespace) -> int:
    import tnllm.testing as tt
    dtypes = None if not a.dtype else tuple(tt.DTYPES[d] for d in dict.fromkeys(a.dtype))
    rates = None if not a.rates else tuple(x.strip() for x in a.rates.split(","))
    try:
        dims = None if not a.dims else tuple(int(x) for x in a.dims.split(","))
    except ValueError as e:
        raise ValueError(f"`--dims` must be a comma list of ints, got {a.dims!r}") from e
    return run_check(op=a.op, device=a.device, examples=a.examples, dtypes=dtypes, oracle=a.oracle, seed=a.seed,
                     edges=not a.no_edges, rates=rates, max_T=a.max_T, dims=dims)
