"""Property checks for packed variable-length kernels (``tnllm.ops.lightning_attn_varlen``'s signature)::

    fn(q, k, v, s, cu_seqlens, initial_state=None, output_final_state=False) -> o | (o, S)

    q, k [1, H, T, Dk], v [1, H, T, Dv]: N sequences end to end, cu_seqlens [N + 1] their boundaries;
    initial_state / S [N, H, Dk, Dv]

The oracle is one call per sequence of the fp64 dense oracle (``tnllm.testing.oracle``), so the
packed kernel must equal the sequences run one by one: outputs, final states and the gradients of q,
k, v and the initial states. Errors are ``rel_err`` per sequence (a short sequence's error is not
hidden by a long one's norm), the worst over the sequences, held to ``TOL`` of the input dtype::

    import tnllm.testing as tt
    tt.assert_varlen_agrees(lightning_attn_varlen, device="cuda", dtypes=(torch.bfloat16,))
    tt.assert_varlen_isolated(lightning_attn_varlen, device="cuda")    # a NaN stays in its own sequence
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import (LAYOUTS, QUANTITIES, RATES, TOL, _RATE_VALUE, _acc, _hypothesis, _name, _same, _settings,
               copy_in_layout, oracle, rel_err)

__all__ = ["VarlenCase", "varlen_cases", "make_varlen_inputs", "evaluate_varlen", "varlen_oracle",
           "varlen_case_errors", "check_varlen_case", "assert_varlen_agrees", "check_varlen_isolated",
           "assert_varlen_isolated"]

# lengths that hit the block / chunk edges of the kernels, the empty sequence and one token
EDGE_LENGTHS = (0, 1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129)


@dataclasses.dataclass(frozen=True)
class VarlenCase:
    """One drawn packed input: per-head rates, the sequence ``lengths`` (0 allowed), widths, dtype, device,
    layout of q/k/v ("contiguous", "bthd", "padded" as in ``Case``), with/without initial states,
    the boundaries' integer dtype, seed."""
    H: int
    lengths: tuple
    Dk: int
    Dv: int
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    layout: str = "contiguous"
    rates: tuple = ()
    state: bool = True
    cu_dtype: torch.dtype = torch.int64
    seed: int = 0

    @property
    def N(self) -> int:
        return len(self.lengths)

    @property
    def T(self) -> int:
        return sum(self.lengths)

    def bounds(self) -> list[int]:
        c = [0]
        for n in self.lengths:
            c.append(c[-1] + n)
        return c


def make_varlen_inputs(case: VarlenCase):
    """(q, k, v, s, cu, S0, do, dS), deterministic in ``case.seed``: q, k, v leaves [1, H, T, D] in
    ``case.dtype`` and ``case.layout``; cu [N + 1] in ``case.cu_dtype``; S0 [N, H, Dk, Dv] (acc dtype) or
    None; do, dS fp64 cotangents. Drawn on the CPU, moved to ``case.device``."""
    if not case.lengths or any(n < 0 for n in case.lengths):
        raise ValueError(f"`lengths` must be a non-empty sequence of ints >= 0, got {case.lengths}")
    if case.layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}, got {case.layout!r}")
    H, T, N, Dk, Dv = case.H, case.T, case.N, case.Dk, case.Dv
    g = torch.Generator().manual_seed(case.seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    dev = torch.device(case.device)

    def x(D: int, scale: float) -> Tensor:
        if case.layout == "bthd":
            t = (r(1, T, H, D) * scale).to(dev, case.dtype).transpose(1, 2)
        elif case.layout == "padded":
            t = (r(1, H, T, D + 3) * scale).to(dev, case.dtype)[..., 1:D + 1]
        else:
            t = (r(1, H, T, D) * scale).to(dev, case.dtype)
        return t.requires_grad_()

    q, k, v = x(Dk, 1 / math.sqrt(Dk)), x(Dk, 1 / math.sqrt(Dk)), x(Dv, 1.0)
    rates = case.rates or tuple([0.5] * H)
    s = torch.tensor([float(a) for a in rates], dtype=torch.float32, device=dev)
    cu = torch.tensor(case.bounds(), dtype=case.cu_dtype, device=dev)
    S0 = r(N, H, Dk, Dv).to(dev, _acc(case.dtype)).requires_grad_() if case.state else None
    return q, k, v, s, cu, S0, r(1, H, T, Dv).to(dev), r(N, H, Dk, Dv).to(dev)


def evaluate_varlen(fn: Callable, q, k, v, s, cu, S0, do, dS) -> dict:
    """Run ``fn`` with the final states and differentiate ``sum(o * do) + sum(S * dS)``: {"o", "S", "dq",
    "dk", "dv"} and "dS0" when there are initial states (``evaluate`` with ``cu`` bound)."""
    from . import evaluate

    def dense_signature(q, k, v, s, initial_state=None, output_final_state=False):
        return fn(q, k, v, s, cu, initial_state=initial_state, output_final_state=output_final_state)
    return evaluate(dense_signature, q, k, v, s, S0, do, dS)


def varlen_oracle(q, k, v, s, cu, S0, do, dS, which: str = "naive") -> dict:
    """The reference quantities in fp64: the dense ``oracle`` called once per sequence, stitched back
    (positions along T, states along N)."""
    c = [int(x) for x in cu.tolist()]
    parts = []
    for i in range(len(c) - 1):
        a, b = c[i], c[i + 1]
        sl = lambda x: x[:, :, a:b]  # noqa: E731
        parts.append(oracle(sl(q), sl(k), sl(v), s, None if S0 is None else S0[i:i + 1], sl(do), dS[i:i + 1],
                            which=which))
    out = {n: torch.cat([p[n] for p in parts], dim=2).detach() for n in ("o", "dq", "dk", "dv")}
    out["S"] = torch.cat([p["S"] for p in parts], dim=0).detach()
    if S0 is not None:
        out["dS0"] = torch.cat([p["dS0"] for p in parts], dim=0).detach()
    return out


def _per_sequence(name: str, got: Tensor, ref: Tensor, c: list[int]) -> tuple[float, int]:
    """The worst rel_err over the sequences (slices of T for o and the gradients, rows for the states)
    and the sequence where it occurs."""
    if got.shape != ref.shape:
        return math.inf, -1
    worst, at = 0.0, -1
    for i in range(len(c) - 1):
        if name in ("S", "dS0"):
            e = rel_err(got[i], ref[i])
        else:
            e = rel_err(got[:, :, c[i]:c[i + 1]], ref[:, :, c[i]:c[i + 1]])
        if not e <= worst:
            worst, at = e, i
    return worst, at


def varlen_case_errors(fn: Callable, case: VarlenCase, which: str = "naive") -> dict:
    """{quantity: (worst per-sequence rel_err, that sequence)} of ``fn`` on ``case`` against the oracle."""
    ins = make_varlen_inputs(case)
    got = evaluate_varlen(fn, *ins)
    ref = varlen_oracle(*ins, which=which)
    c = case.bounds()
    errs = {n: _per_sequence(n, got[n], ref[n], c) for n in QUANTITIES if n in ref}
    if got["o"].dtype != case.dtype:
        errs["o"] = (math.inf, -1)
    if got["S"].dtype != _acc(case.dtype):
        errs["S"] = (math.inf, -1)
    return errs


def check_varlen_case(fn: Callable, case: VarlenCase, which: str = "naive", tol_scale: float = 1.0) -> dict:
    """AssertionError (quantities, sequences, errors, the case) unless every quantity of every sequence is
    within ``TOL[dtype] * tol_scale`` of the per-sequence oracle; returns the errors."""
    errs = varlen_case_errors(fn, case, which)
    tol = TOL[case.dtype] * tol_scale
    bad = {n: e for n, e in errs.items() if not e[0] <= tol}
    if bad:
        detail = ", ".join(f"{n} {e:.3e} (sequence {i})" for n, (e, i) in bad.items())
        raise AssertionError(f"{_name(fn)} disagrees with the {which} oracle called per sequence (relative error > "
                             f"{tol:.1e}): {detail}; {case}")
    return errs


def varlen_cases(*, devices: Sequence[str] = ("cpu",), dtypes: Sequence[torch.dtype] = (torch.float32,),
                 max_N: int = 5, max_len: int = 150, max_H: int = 3, dims: Sequence[int] = (1, 4, 8, 16, 24, 32),
                 layouts: Sequence[str] = LAYOUTS, rates: Sequence[str] = RATES,
                 states: Sequence[bool] = (False, True)):
    """A hypothesis strategy of ``VarlenCase``: 1..max_N sequences whose lengths come from the edges
    (0, 1, block edges) or 0..max_len, H in 1..max_H, Dk and Dv from ``dims``, one rate per head of the
    kinds in ``rates``, int32 or int64 boundaries."""
    _, st = _hypothesis()
    for name, kinds, allowed in (("rates", rates, RATES), ("layouts", layouts, LAYOUTS)):
        bad = [x for x in kinds if x not in allowed]
        if bad or not kinds:
            raise ValueError(f"`{name}` must be a non-empty subset of {allowed}, got {tuple(kinds)}")
    if max_N < 1 or max_len < 1:
        raise ValueError(f"`max_N` and `max_len` must be >= 1, got {max_N}, {max_len}")
    edges = [n for n in EDGE_LENGTHS if n <= max_len]
    length = st.one_of(st.sampled_from(edges), st.integers(0, max_len))
    rate = st.tuples(st.sampled_from(list(rates)), st.floats(0, 1)).map(lambda ku: _RATE_VALUE[ku[0]](ku[1]))

    @st.composite
    def draw(dr):
        H = dr(st.integers(1, max_H))
        return VarlenCase(H=H, lengths=tuple(dr(st.lists(length, min_size=1, max_size=max_N))),
                          Dk=dr(st.sampled_from(list(dims))), Dv=dr(st.sampled_from(list(dims))),
                          dtype=dr(st.sampled_from(list(dtypes))), device=dr(st.sampled_from(list(devices))),
                          layout=dr(st.sampled_from(list(layouts))),
                          rates=tuple(dr(st.lists(rate, min_size=H, max_size=H))),
                          state=dr(st.sampled_from(list(states))),
                          cu_dtype=dr(st.sampled_from([torch.int32, torch.int64])), seed=dr(st.integers(0, 2 ** 31 - 1)))
    return draw()


def assert_varlen_agrees(fn: Callable, *, device: str = "cpu", dtypes=(torch.float32,), oracle: str = "naive",
                         max_examples: int | None = None, tol_scale: float = 1.0, **strategy) -> None:
    """Hypothesis-driven ``check_varlen_case`` over ``varlen_cases(**strategy)``; AssertionError with the
    smallest failing case."""
    hyp, _ = _hypothesis()

    @_settings(max_examples)
    @hyp.given(case=varlen_cases(devices=(device,), dtypes=tuple(dtypes), **strategy))
    def run(case):
        check_varlen_case(fn, case, oracle, tol_scale)
    run()


def check_varlen_isolated(fn: Callable, case: VarlenCase, seq: int, name: str, where, value: float,
                          exact: bool = True) -> None:
    """A non-finite ``value`` in ``name`` (q, k or v) at element ``where`` = (h, t, d) of sequence ``seq``
    (t counted inside it) leaves every other sequence's o, final state and gradients unchanged and finite,
    and inside ``seq`` o and dq before t and dk, dv after t (compared with the run without it)."""
    ins = list(make_varlen_inputs(case))
    clean = evaluate_varlen(fn, *ins)
    c = case.bounds()
    h, t, d = where
    i = {"q": 0, "k": 1, "v": 2}[name]
    with torch.no_grad():
        x = copy_in_layout(ins[i])
        x[0, h, c[seq] + t, d] = value
    ins[i] = x.requires_grad_()
    bad = evaluate_varlen(fn, *ins)

    def fail(what: str):
        raise AssertionError(f"{_name(fn)}: {value} in `{name}` of sequence {seq} at [h, t, d] = {list(where)} "
                             f"{what}; {case}")

    for j in range(case.N):
        if j == seq:
            continue
        sl = slice(c[j], c[j + 1])
        for n in ("o", "dq", "dk", "dv"):
            if not _same(bad[n][:, :, sl], clean[n][:, :, sl], exact, case.dtype):
                fail(f"reached `{n}` of sequence {j}")
        for n in ("S", "dS0"):
            if n in bad and not _same(bad[n][j], clean[n][j], exact, case.dtype):
                fail(f"reached `{n}` of sequence {j}")
    a0 = c[seq] + t
    for n, sl in (("o", slice(c[seq], a0)), ("dq", slice(c[seq], a0)), ("dk", slice(a0 + 1, c[seq + 1])),
                  ("dv", slice(a0 + 1, c[seq + 1]))):
        if not _same(bad[n][:, :, sl], clean[n][:, :, sl], exact, case.dtype):
            fail(f"reached `{n}` of its own sequence {'before' if n in ('o', 'dq') else 'after'} t = {t}")


def assert_varlen_isolated(fn: Callable, *, device: str = "cpu", dtypes=(torch.float32,),
                           max_examples: int | None = None, exact: bool = True, **strategy) -> None:
    """Hypothesis-driven ``check_varlen_isolated``: drawn cases with a non-empty sequence, position,
    element and value (nan, inf, -inf)."""
    hyp, st = _hypothesis()
    base = varlen_cases(devices=(device,), dtypes=tuple(dtypes), **strategy).filter(lambda cs: cs.T > 0)

    @st.composite
    def draw(dr):
        cs = dr(base)
        seq = dr(st.sampled_from([i for i, n in enumerate(cs.lengths) if n > 0]))
        name = dr(st.sampled_from(["q", "k", "v"]))
        D = cs.Dk if name in ("q", "k") else cs.Dv
        where = (dr(st.integers(0, cs.H - 1)), dr(st.integers(0, cs.lengths[seq] - 1)), dr(st.integers(0, D - 1)))
        return cs, seq, name, where, dr(st.sampled_from([math.nan, math.inf, -math.inf]))

    @_settings(max_examples)
    @hyp.given(d=draw())
    def run(d):
        check_varlen_isolated(fn, *d, exact=exact)
    run()
