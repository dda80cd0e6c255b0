"""Property-based numerics testing for Lightning Attention implementations.

Any function with the signature of ``tnllm.ops.lightning_attn``::

    fn(q, k, v, s, initial_state=None, output_final_state=False) -> o | (o, S)

    q, k [B, H, T, Dk], v [B, H, T, Dv], s [H] decay rate (lam = exp(-s), s = inf: lam = 0),
    initial_state / S [B, H, Dk, Dv] (fp32, fp64 for fp64 inputs), o [B, H, T, Dv] in q's dtype

can be checked against the oracles here on any device: the outputs, the final state and the
gradients with respect to q, k, v and the initial state (``dq, dk, dv, dS0``), over hypothesis-drawn
shapes (T = 1 and block edges, Dk != Dv), dtypes, memory layouts, decay rates (0, small, large,
inf) and initial states::

    import tnllm.testing as tt
    tt.assert_forms_agree(my_kernel, device="cuda", dtypes=(torch.bfloat16,))   # AssertionError on a mismatch
    tt.assert_edge_semantics(my_kernel, device="cuda")                           # non-finite inputs, s = inf, bad s

Packed variable-length kernels (``lightning_attn_varlen``'s signature, ``cu_seqlens`` after ``s``) have the
same checks with one dense oracle call per sequence as the reference: ``tt.assert_varlen_agrees(fn)`` and
``tt.assert_varlen_isolated(fn)`` (a non-finite input stays in its own sequence, causally).

``tnllm check`` runs the same suite from the command line and prints a table. The errors are one
relative error (``rel_err``: ||got - ref|| / ||ref|| over the whole tensor, fp64) against an fp64
oracle computed from the same (rounded) inputs, held to one tolerance per input dtype (``TOL``); for
fp16 / bf16 an error above it still passes when it is within ``COND_FACTOR`` (4) times the oracle's own change
under a unit-roundoff perturbation of the inputs (``perturbation_errors``: an ill-conditioned case, such as a
single dot product that cancels, cannot be more exact at that precision).

hypothesis is a dependency of tnllm (installed with it); this module imports it on first use.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["TOL", "QUANTITIES", "DTYPES", "rel_err", "Case", "cases", "make_inputs", "evaluate", "oracle",
           "fp64_loop", "case_errors", "check_case", "perturbation_errors", "beyond_tolerance", "COND_FACTOR",
           "assert_forms_agree", "assert_edge_semantics", "assert_nonfinite_causal", "nonfinite_cases",
           "poisoned_allocations", "run_check"]

# One tolerance per input dtype: the largest relative error (rel_err) allowed against the fp64 oracle
# for every quantity (the state and its gradient are fp32 for low-precision inputs, and held to the
# same bound).
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
QUANTITIES = ("o", "S", "dq", "dk", "dv", "dS0")
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = ("contiguous", "bthd", "padded")
EDGE_T = (1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257)
RATES = ("zero", "small", "medium", "large", "inf")


def _hypothesis():
    try:
        import hypothesis
        from hypothesis import strategies
    except ImportError as e:       # pragma: no cover - hypothesis is a dependency of tnllm
        raise ImportError("tnllm.testing needs hypothesis: pip install hypothesis") from e
    return hypothesis, strategies


ABS_FLOOR = 1e-20   # RMS below which a reference counts as zero (an fp32 state underflows there)


def rel_err(got: Tensor, ref: Tensor) -> float:
    """||got - ref|| / max(||ref||, ABS_FLOOR sqrt(n)) (Frobenius, fp64, over the entries where ``ref``
    is finite); inf when ``got`` has a non-finite entry where ``ref`` is finite, or the shapes differ."""
    got, ref = got.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    if got.shape != ref.shape:
        return math.inf
    fin = torch.isfinite(ref)
    if not bool(torch.isfinite(got[fin]).all()):
        return math.inf
    num = float((got[fin] - ref[fin]).norm())
    den = max(float(ref[fin].norm()), ABS_FLOOR * math.sqrt(max(int(fin.sum()), 1)))
    return num / den


# -- cases ----------------------------------------------------------------------------------------

def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass(frozen=True)
class Case:
    """One drawn input: shapes, dtype, device, memory layout, per-head rates, with/without a state, seed.

    ``layout``: "contiguous"; "bthd" ([B, T, H, D] storage seen as [B, H, T, D], as a model produces);
    "padded" (a slice of a wider last dim: unit last stride, larger row stride).
    """
    B: int
    H: int
    T: int
    Dk: int
    Dv: int
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    layout: str = "contiguous"
    rates: tuple = ()
    state: bool = True
    seed: int = 0

    def __str__(self) -> str:
        dt = {v: k for k, v in DTYPES.items()}.get(self.dtype, str(self.dtype))
        return (f"Case(B={self.B}, H={self.H}, T={self.T}, Dk={self.Dk}, Dv={self.Dv}, dtype={dt}, "
                f"device={self.device!r}, layout={self.layout!r}, rates={self.rates}, state={self.state}, "
                f"seed={self.seed})")


_RATE_VALUE = {"zero": lambda u: 0.0, "small": lambda u: 1e-4 * 10 ** (3 * u), "medium": lambda u: 0.1 + 2.9 * u,
               "large": lambda u: 10.0 + 1e4 * u ** 4, "inf": lambda u: math.inf}


def make_inputs(case: Case):
    """The tensors of ``case``: (q, k, v, s, S0, do, dS), deterministic in ``case.seed``.

    q, k, v in ``case.dtype`` with ``case.layout``, leaves requiring grad; s fp32 [H]; S0 the
    acc-dtype state (fp32, fp64 for fp64) or None; do, dS fp64 cotangents of o and the final state.
    Drawn on the CPU and moved to ``case.device``."""
    B, H, T, Dk, Dv = case.B, case.H, case.T, case.Dk, case.Dv
    g = torch.Generator().manual_seed(case.seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    dev = torch.device(case.device)

    def x(D: int, scale: float) -> Tensor:
        if case.layout == "bthd":
            t = (r(B, T, H, D) * scale).to(dev, case.dtype).transpose(1, 2)
        elif case.layout == "padded":
            t = (r(B, H, T, D + 3) * scale).to(dev, case.dtype)[..., 1:D + 1]
        elif case.layout == "contiguous":
            t = (r(B, H, T, D) * scale).to(dev, case.dtype)
        else:
            raise ValueError(f"`layout` must be one of {LAYOUTS}, got {case.layout!r}")
        return t.requires_grad_()

    q, k, v = x(Dk, 1 / math.sqrt(Dk)), x(Dk, 1 / math.sqrt(Dk)), x(Dv, 1.0)
    rates = case.rates or tuple([0.5] * H)
    s = torch.tensor([float(a) for a in rates], dtype=torch.float32, device=dev)
    S0 = r(B, H, Dk, Dv).to(dev, _acc(case.dtype)).requires_grad_() if case.state else None
    do = r(B, H, T, Dv).to(dev)
    dS = r(B, H, Dk, Dv).to(dev)
    return q, k, v, s, S0, do, dS


def cases(*, devices: Sequence[str] = ("cpu",), dtypes: Sequence[torch.dtype] = (torch.float32,),
          max_B: int = 2, max_H: int = 3, max_T: int = 200, dims: Sequence[int] = (1, 4, 8, 16, 24, 32),
          layouts: Sequence[str] = LAYOUTS, rates: Sequence[str] = RATES, states: Sequence[bool] = (False, True)):
    """A hypothesis strategy of ``Case``: B in 1..max_B, H in 1..max_H, T from the block edges or
    1..max_T, Dk and Dv drawn independently from ``dims``, a dtype, device and layout, one rate per
    head from the kinds in ``rates`` ("zero", "small" 1e-4..0.1, "medium" 0.1..3, "large" 10..1e4,
    "inf"), with or without an initial state."""
    _, st = _hypothesis()
    for name, kinds, allowed in (("rates", rates, RATES), ("layouts", layouts, LAYOUTS)):
        bad = [x for x in kinds if x not in allowed]
        if bad or not kinds:
            raise ValueError(f"`{name}` must be a non-empty subset of {allowed}, got {tuple(kinds)}")
    if max_T < 1:
        raise ValueError(f"`max_T` must be >= 1, got {max_T}")
    edges = [t for t in EDGE_T if t <= max_T]
    rate = st.tuples(st.sampled_from(list(rates)), st.floats(0, 1)).map(lambda ku: _RATE_VALUE[ku[0]](ku[1]))

    @st.composite
    def draw(dr):
        H = dr(st.integers(1, max_H))
        return Case(B=dr(st.integers(1, max_B)), H=H,
                    T=dr(st.one_of(st.sampled_from(edges), st.integers(1, max_T))),
                    Dk=dr(st.sampled_from(list(dims))), Dv=dr(st.sampled_from(list(dims))),
                    dtype=dr(st.sampled_from(list(dtypes))), device=dr(st.sampled_from(list(devices))),
                    layout=dr(st.sampled_from(list(layouts))), rates=tuple(dr(st.lists(rate, min_size=H, max_size=H))),
                    state=dr(st.sampled_from(list(states))), seed=dr(st.integers(0, 2 ** 31 - 1)))
    return draw()


# -- running a form and the oracles ---------------------------------------------------------------

def evaluate(fn: Callable, q, k, v, s, S0, do, dS) -> dict:
    """Run ``fn`` with the final state and differentiate ``sum(o * do) + sum(S * dS)``; returns
    {"o", "S", "dq", "dk", "dv"} and "dS0" when there is an initial state."""
    res = fn(q, k, v, s, initial_state=S0, output_final_state=True)
    if not (isinstance(res, (tuple, list)) and len(res) == 2):
        raise TypeError(f"the function under test must return (o, S) with output_final_state=True, got "
                        f"{type(res).__name__}")
    o, S = res
    loss = (o.double() * do).sum() + (S.double() * dS).sum()
    ins = [q, k, v] + ([S0] if S0 is not None else [])
    grads = torch.autograd.grad(loss, ins, allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(ins, grads)]
    out = dict(o=o, S=S, dq=grads[0], dk=grads[1], dv=grads[2])
    if S0 is not None:
        out["dS0"] = grads[3]
    return out


def fp64_loop(q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor | None = None,
              output_final_state: bool = False):
    """The definition as a plain fp64 loop over positions (independent of the library's forms):
    S_t = lam S_{t-1} + k_t^T v_t, o_t = q_t S_t, lam = exp(-s) (0 for s = inf). Differentiable."""
    B, H, T, Dk = q.shape
    lam = torch.exp(-s.double())[:, None, None]
    S = (initial_state.double() if initial_state is not None
         else torch.zeros(B, H, Dk, v.shape[-1], dtype=torch.float64, device=q.device))
    outs = []
    for t in range(T):
        S = lam * S + k[:, :, t, :, None].double() * v[:, :, t, None, :].double()
        outs.append((q[:, :, t, :, None].double() * S).sum(-2))
    o = torch.stack(outs, 2) if outs else torch.zeros(B, H, 0, v.shape[-1], dtype=torch.float64, device=q.device)
    return (o, S) if output_final_state else o


def _oracle_fn(name: str) -> Callable:
    from tnllm.ops import lightning_attn_naive, lightning_attn_recurrent
    fns = {"naive": lightning_attn_naive, "recurrent": lightning_attn_recurrent, "loop": fp64_loop}
    if name not in fns:
        raise ValueError(f"`oracle` must be one of {tuple(fns)}, got {name!r}")
    return fns[name]


def oracle(q, k, v, s, S0, do, dS, which: str = "naive") -> dict:
    """The reference quantities in fp64 from the same (rounded) inputs: ``which`` is "naive" (the
    quadratic form), "recurrent" (the token loop of tnllm.ops) or "loop" (``fp64_loop``)."""
    d = lambda x: None if x is None else x.detach().double().requires_grad_()  # noqa: E731
    return evaluate(_oracle_fn(which), d(q), d(k), d(v), s.double(), d(S0), do, dS)


def case_errors(fn: Callable, case: Case, which: str = "oracle") -> dict:
    """rel_err of every quantity of ``fn`` on ``case`` against the fp64 oracle ``which`` ("naive",
    "recurrent", "loop"; "oracle" means "naive")."""
    ins = make_inputs(case)
    got = evaluate(fn, *ins)
    ref = oracle(*ins, which="naive" if which == "oracle" else which)
    errs = {n: rel_err(got[n], ref[n]) for n in QUANTITIES if n in ref}
    acc = _acc(case.dtype)
    if got["o"].dtype != case.dtype or tuple(got["o"].shape) != tuple(ref["o"].shape):
        errs["o"] = math.inf
    if got["S"].dtype != acc:
        errs["S"] = math.inf
    return errs


# Low precision (fp16, bf16): a quantity beyond TOL still passes when it is within COND_FACTOR times how far
# the fp64 oracle itself moves when q, k, v and the output gradient are perturbed by the dtype's unit
# roundoff (the worst of two draws): a sum that cancels (e.g. T = 1, where dq is one dot product do . v
# times k) is ill-conditioned, and no kernel that rounds its inputs to the dtype can be more exact there.
COND_FACTOR = 4.0
_UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def perturbation_errors(case: Case, which: str = "naive", draws: int = 2) -> dict:
    """rel_err of the fp64 oracle on ``case`` when q, k, v and the output gradient are each multiplied by
    (1 + u r), r uniform in [-1, 1], u the unit roundoff of ``case.dtype``: the error that rounding the inputs
    alone causes (the conditioning of the case at that precision); the worst of ``draws`` draws per quantity."""
    u = _UNIT_ROUNDOFF.get(case.dtype)
    if u is None:
        raise ValueError(f"perturbation_errors is for fp16 / bf16 cases, got {case.dtype}")
    q, k, v, s, S0, do, dS = make_inputs(case)
    which = "naive" if which == "oracle" else which
    ref = oracle(q, k, v, s, S0, do, dS, which=which)
    g = torch.Generator().manual_seed(case.seed ^ 0x5EED)
    worst: dict = {}
    for _ in range(draws):
        def jitter(x: Tensor) -> Tensor:
            r = torch.rand(x.shape, generator=g, dtype=torch.float64).mul_(2).sub_(1).to(x.device)
            return x.detach().double() * (1 + u * r)
        got = oracle(jitter(q), jitter(k), jitter(v), s, S0, jitter(do), dS, which=which)
        for n in QUANTITIES:
            if n in ref:
                worst[n] = max(worst.get(n, 0.0), rel_err(got[n], ref[n]))
    return worst


def beyond_tolerance(case: Case, errs: dict, tol: float, which: str = "naive") -> tuple[dict, dict]:
    """The quantities of ``errs`` that fail: above ``tol`` and, for fp16 / bf16, also above ``COND_FACTOR``
    times the case's ``perturbation_errors`` (computed only when something is above ``tol``). Returns
    (failing {name: error}, perturbation errors or {})."""
    bad = {n: e for n, e in errs.items() if not e <= tol}
    if not bad or case.dtype not in _UNIT_ROUNDOFF or not all(math.isfinite(e) for e in bad.values()):
        return bad, {}
    cond = perturbation_errors(case, which)
    return {n: e for n, e in bad.items() if not e <= COND_FACTOR * cond.get(n, 0.0)}, cond


def check_case(fn: Callable, case: Case, which: str = "naive", tol_scale: float = 1.0) -> dict:
    """Raise AssertionError (naming the quantities, errors, tolerance and the case) unless every
    quantity of ``fn`` on ``case`` is within ``TOL[dtype] * tol_scale`` of the oracle (for fp16 / bf16, or
    within ``COND_FACTOR`` times the case's ``perturbation_errors``); returns the errors."""
    errs = case_errors(fn, case, which)
    tol = TOL[case.dtype] * tol_scale
    bad, cond = beyond_tolerance(case, errs, tol, which)
    if bad:
        detail = ", ".join(f"{n} {e:.3e}" for n, e in bad.items())
        extra = ("; input-rounding errors of the oracle: " + ", ".join(f"{n} {e:.2e}" for n, e in cond.items())
                 if cond else "")
        raise AssertionError(f"{_name(fn)} disagrees with the {which} oracle (relative error > {tol:.1e}): {detail}; "
                             f"{case}; all errors: " + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()) + extra)
    return errs


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def _settings(max_examples: int | None, **kw):
    hyp, _ = _hypothesis()
    args = dict(deadline=None, suppress_health_check=list(hyp.HealthCheck))
    if max_examples is not None:
        args["max_examples"] = max_examples
    args.update(kw)
    return hyp.settings(**args)


def assert_forms_agree(fn: Callable, *, device: str = "cpu", dtypes: Iterable[torch.dtype] = (torch.float32,),
                       oracle: str = "naive", max_examples: int | None = None, tol_scale: float = 1.0,
                       **strategy) -> None:
    """Hypothesis-driven check that ``fn`` (lightning_attn's signature) agrees with an fp64 oracle
    ("naive", "recurrent" or "loop") in o, the final S, dq, dk, dv and dS0, within ``TOL`` per dtype.

    ``strategy`` goes to ``cases`` (max_T, max_B, max_H, dims, layouts, rates, states).
    ``max_examples`` defaults to the active hypothesis profile's. Raises AssertionError with the
    smallest failing case hypothesis finds."""
    hyp, _ = _hypothesis()
    _oracle_fn(oracle)
    strat = cases(devices=(device,), dtypes=tuple(dtypes), **strategy)

    @_settings(max_examples)
    @hyp.given(case=strat)
    def run(case):
        check_case(fn, case, oracle, tol_scale)
    run()


# -- edge semantics -------------------------------------------------------------------------------

def nonfinite_cases(*, devices=("cpu",), dtypes=(torch.float32,), max_T: int = 150, names=("q", "k", "v"), **kw):
    """A strategy of (Case, tensor name in ``names`` ("q", "k", "v", or "do": the output gradient), position t,
    (b, h, d) element, value nan/inf/-inf). Plain autograd through a masked matmul does not keep a non-finite
    do causal (0 * inf in the transposed product), so "do" is for forms with their own backward."""
    _, st = _hypothesis()
    base = cases(devices=devices, dtypes=dtypes, max_T=max_T, **kw)

    @st.composite
    def draw(dr):
        c = dr(base)
        name = dr(st.sampled_from(list(names)))
        D = c.Dk if name in ("q", "k") else c.Dv
        where = (dr(st.integers(0, c.B - 1)), dr(st.integers(0, c.H - 1)), dr(st.integers(0, c.T - 1)),
                 dr(st.integers(0, D - 1)))
        return c, name, where, dr(st.sampled_from([math.nan, math.inf, -math.inf]))
    return draw()


def copy_in_layout(x: Tensor) -> Tensor:
    """A copy of ``x`` with its strides and storage offset, over a bit-identical copy of its whole storage: a clone
    would be contiguous, and a kernel (or a BLAS call) may then sum in another order, so a run over the copy would
    differ from the original by rounding where it should be bit-identical."""
    src = x.detach()
    n = src.untyped_storage().nbytes() // src.element_size()
    buf = torch.as_strided(src, (n,), (1,), 0).clone()
    return buf.as_strided(src.shape, src.stride(), src.storage_offset())


def _poison(ins, name: str, where, value: float):
    q, k, v, s, S0, do, dS = ins
    xs = {"q": q, "k": k, "v": v, "do": do}
    with torch.no_grad():
        t = copy_in_layout(xs[name])
        t[where] = value
    xs[name] = t.requires_grad_() if name != "do" else t
    return xs["q"], xs["k"], xs["v"], s, S0, xs["do"], dS


def _same(a: Tensor, b: Tensor, exact: bool, dtype: torch.dtype) -> bool:
    if not bool(torch.isfinite(a).all()):
        return False
    if exact:
        return bool(torch.equal(a, b))
    return rel_err(a, b) <= TOL[dtype]


def check_nonfinite_causal(fn: Callable, case: Case, name: str, where, value: float, exact: bool = True) -> None:
    """A non-finite ``value`` in ``name`` (q, k, v, or the output gradient do) at position t = where[2] of
    head (b, h) leaves every output before t, dq before t and dk, dv after t unchanged (bit-equal with
    ``exact``) and finite, compared with the same run without it (the final state and dS0 see every
    position)."""
    ins = make_inputs(case)
    clean = evaluate(fn, *ins)
    bad = evaluate(fn, *_poison(ins, name, where, value))
    t = where[2]
    parts = {"o": (slice(0, t)), "dq": slice(0, t), "dk": slice(t + 1, None), "dv": slice(t + 1, None)}
    for n, sl in parts.items():
        a, b = bad[n][:, :, sl], clean[n][:, :, sl]
        if not _same(a, b, exact, case.dtype):
            raise AssertionError(f"{_name(fn)}: {value} in `{name}` at [b, h, t, d] = {list(where)} reached `{n}` at "
                                 f"positions {'before' if n in ('o', 'dq') else 'after'} t = {t} "
                                 f"({'not finite' if not bool(torch.isfinite(a).all()) else 'changed'}); {case}")


def assert_nonfinite_causal(fn: Callable, *, device: str = "cpu", dtypes=(torch.float32,), max_examples=None,
                            exact: bool = True, **strategy) -> None:
    """Hypothesis-driven ``check_nonfinite_causal`` over drawn cases, positions and values."""
    hyp, _ = _hypothesis()

    @_settings(max_examples)
    @hyp.given(draw=nonfinite_cases(devices=(device,), dtypes=tuple(dtypes), **strategy))
    def run(draw):
        check_nonfinite_causal(fn, *draw, exact=exact)
    run()


def check_lambda_zero(fn: Callable, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """s = inf means lambda = 0: o_t = (q_t . k_t) v_t (no initial-state term), final S = k_T^T v_T."""
    case = Case(B=2, H=2, T=70, Dk=8, Dv=5, dtype=dtype, device=device, rates=(math.inf, math.inf), state=True, seed=1)
    q, k, v, s, S0, _, _ = make_inputs(case)
    o, S = fn(q, k, v, s, initial_state=S0, output_final_state=True)
    qd, kd, vd = q.double(), k.double(), v.double()
    o_ref = (qd * kd).sum(-1, keepdim=True) * vd
    S_ref = kd[:, :, -1, :, None] * vd[:, :, -1, None, :]
    tol = TOL[dtype]
    for n, a, b in (("o", o, o_ref), ("S", S, S_ref)):
        e = rel_err(a, b)
        if not e <= tol:
            raise AssertionError(f"{_name(fn)} with s = inf (lambda = 0): {n} relative error {e:.3e} > {tol:.1e}")


def check_bad_rates_raise(fn: Callable, device: str = "cpu") -> None:
    """s with a NaN or a negative entry raises ValueError naming `s`."""
    q = torch.randn(1, 2, 5, 4, device=device)
    for bad in ([math.nan, 0.5], [0.5, -1e-3], [-math.inf, 0.0]):
        s = torch.tensor(bad, device=device)
        try:
            fn(q, q, q, s)
        except ValueError as e:
            if "`s`" not in str(e):
                raise AssertionError(f"{_name(fn)}: the error for s = {bad} does not name `s`: {e}") from e
        else:
            raise AssertionError(f"{_name(fn)} accepted s = {bad} (want ValueError)")


def assert_edge_semantics(fn: Callable, *, device: str = "cpu", dtypes=(torch.float32,), max_examples=None,
                          exact: bool = True, bad_rates: bool = True, **strategy) -> None:
    """The edge contract: non-finite inputs stay causal (``assert_nonfinite_causal``), s = inf is
    lambda = 0 (``check_lambda_zero``), and a NaN or negative s raises ValueError (``bad_rates``)."""
    for dt in dtypes:
        check_lambda_zero(fn, device, dt)
    if bad_rates:
        check_bad_rates_raise(fn, device)
    assert_nonfinite_causal(fn, device=device, dtypes=dtypes, max_examples=max_examples, exact=exact, **strategy)


@contextlib.contextmanager
def poisoned_allocations():
    """Inside the block, ``torch.empty`` returns NaN-filled floating tensors, so an output element a
    kernel never writes (launchers allocate with torch.empty) shows up as NaN in the checks."""
    empty = torch.empty

    def nan_empty(*a, **kw):
        t = empty(*a, **kw)
        if t.is_floating_point():
            t.fill_(math.nan)
        return t
    torch.empty = nan_empty
    try:
        yield
    finally:
        torch.empty = empty


@torch.no_grad()
def decode_against_step(decoder, model, ids: Tensor, steps: int):
    """Prefill ``ids`` [B, T] into ``decoder`` (a ``CudaGraphDecoder``) and into ``model.prefill``, then step both
    ``steps`` tokens, each fed the aten ``model.step``'s greedy token (teacher-forced, so one differing argmax does
    not derail the comparison). Returns ([(decoder logits, model logits) per step], decoder states, model states):
    what the decode-path tests compare, each to its own tolerance."""
    _, st = model.prefill(ids)
    tok = decoder.prefill(ids).argmax(-1)
    pairs = []
    for _ in range(steps):
        got = decoder.step(tok)
        want, st = model.step(tok, st, decode_kernel=False)
        pairs.append((got, want))
        tok = want.argmax(-1)
    return pairs, list(decoder.state()), list(st)


__all__ += ["decode_against_step"]

from ._check import run_check  # noqa: E402
from .varlen import (VarlenCase, assert_varlen_agrees, assert_varlen_isolated, check_varlen_case,  # noqa: E402
                     check_varlen_isolated, evaluate_varlen, make_varlen_inputs, varlen_case_errors, varlen_cases,
                     varlen_oracle)

__all__ += ["VarlenCase", "varlen_cases", "make_varlen_inputs", "evaluate_varlen", "varlen_oracle",
            "varlen_case_errors", "check_varlen_case", "assert_varlen_agrees", "check_varlen_isolated",
            "assert_varlen_isolated"]
