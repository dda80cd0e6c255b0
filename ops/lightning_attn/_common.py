"""Shared pieces of the Lightning Attention forms: input validation and decay tables.

Legend: B batch, H heads, T length, Dk key/query width, Dv value width,
s [H] the non-negative per-head decay rate, lam = exp(-s), S [B, H, Dk, Dv] the state.
Every form accumulates in ``acc_dtype(q.dtype)``: fp32, or fp64 for fp64 inputs.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and state) dtype for inputs of ``dtype``: fp64 stays fp64, all else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor | None,
                 check_decay: bool = True) -> None:
    """Validate the arguments shared by every form; raise TypeError/ValueError naming the argument.

    Runs on shapes and dtypes only (no data-dependent checks except the sign of ``s`` in eager
    mode, skipped with ``check_decay=False``: on CUDA it is a host sync), so it is safe under
    torch.compile and torch.export.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("s", s)):
        if not isinstance(t, Tensor):
            raise TypeError(f"lightning_attn: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in _FLOATS:
            raise TypeError(f"lightning_attn: `{name}` must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"lightning_attn: `{name}` must have shape [B, H, T, D] (4 dims), got {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"lightning_attn: `q`, `k`, `v` must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    B, H, T, Dk = q.shape
    if tuple(k.shape) != (B, H, T, Dk):
        raise ValueError(f"lightning_attn: `k` must have q's shape [B, H, T, Dk] = {(B, H, T, Dk)}, got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != (B, H, T):
        raise ValueError(f"lightning_attn: `v` must have shape [B, H, T, Dv] with [B, H, T] = {(B, H, T)}, got {tuple(v.shape)}")
    Dv = v.shape[3]
    if s.dtype not in _FLOATS:
        raise TypeError(f"lightning_attn: `s` (decay rate) must be a floating tensor, got {s.dtype}")
    if s.dim() != 1 or s.shape[0] != H:
        raise ValueError(f"lightning_attn: `s` (decay rate) must have shape [H] = [{H}], got {tuple(s.shape)}")
    devices = {"q": q.device, "k": k.device, "v": v.device, "s": s.device}
    if initial_state is not None:
        if not isinstance(initial_state, Tensor):
            raise TypeError(f"lightning_attn: `initial_state` must be a Tensor or None, got {type(initial_state).__name__}")
        if initial_state.dtype not in _FLOATS:
            raise TypeError(f"lightning_attn: `initial_state` must be floating, got {initial_state.dtype}")
        if tuple(initial_state.shape) != (B, H, Dk, Dv):
            raise ValueError(
                f"lightning_attn: `initial_state` must have shape [B, H, Dk, Dv] = {(B, H, Dk, Dv)}, got {tuple(initial_state.shape)}")
        devices["initial_state"] = initial_state.device
    if len(set(devices.values())) > 1:
        where = ", ".join(f"`{n}` on {d}" for n, d in devices.items())
        raise ValueError(f"lightning_attn: all inputs must be on one device, got {where}")
    if check_decay:
        check_decay_values(s)


# -- the value check of s, memoised ---------------------------------------------------------------
# Reading s back to the host costs a device sync on CUDA. A verdict "s is valid" is remembered per
# tensor object and its version counter (bumped by every in-place write, also through views), so
# a fixed rate buffer is read once; a modified one is read again.
_DECAY_OK: dict[int, tuple] = {}
_MEMO_MAX = 1024


def _decay_values_ok(s: Tensor) -> bool:
    """The host read: True iff every entry of s is >= 0 or +inf (no NaN, no negative)."""
    return bool((s >= 0).all())          # NaN >= 0 is False


def check_decay_values(s: Tensor) -> None:
    """Raise ValueError unless every entry of ``s`` is >= 0 (+inf allowed: lambda = 0); NaN is rejected.

    Costs one host read per distinct tensor state: the verdict is memoised on the tensor's identity,
    device and version counter. Under torch.compile / fake tensors the check is a device-side
    assertion in the graph (no host read); while a CUDA stream is capturing a graph it is a
    device-side assertion for a tensor not checked before (``torch._assert_async``: a bad rate then
    aborts the CUDA context with the message below).
    """
    msg = "lightning_attn: `s` (decay rate) must be >= 0 (lambda = exp(-s) <= 1; inf means lambda = 0), got a negative or NaN entry"
    if s.numel() == 0:
        return
    if torch.compiler.is_compiling() or _is_fake(s):
        if s.device.type != "meta":
            torch._assert_async((s >= 0).all(), msg)
        return
    try:
        version = s._version
    except RuntimeError:                  # inference tensors have no version counter: no memo
        version = None
    key = id(s)
    hit = _DECAY_OK.get(key)
    if version is not None and hit is not None and hit[0]() is s and hit[1] == version and hit[2] == s.device:
        return
    if s.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        torch._assert_async((s >= 0).all(), msg)
        return
    if not _decay_values_ok(s):
        raise ValueError(msg)
    if version is not None:
        if len(_DECAY_OK) >= _MEMO_MAX:
            _DECAY_OK.clear()
        _DECAY_OK[key] = (weakref.ref(s, lambda _r, key=key: _DECAY_OK.pop(key, None)), version, s.device)


def token_major(x: Tensor) -> bool:
    """Whether ``x`` [B, H, T, D] steps over heads faster than over positions (``stride(1) < stride(2)``, H and T
    both above 1): a view of [B, T, H, D] memory, as the model's q, k and v are (head slices of the fused qkvu
    projection, or an activation of them)."""
    return x.dim() == 4 and x.shape[1] > 1 and x.shape[2] > 1 and x.stride(1) < x.stride(2)


def empty_grad(x: Tensor) -> Tensor:
    """An uninitialised dense tensor of ``x``'s shape, dtype and device for the gradient of ``x`` [B, H, T, D]:
    token-major ([B, T, H, D] memory, transposed) when ``x`` is, else contiguous. The backward's gradients take
    this layout, so that the gradient of a head-sliced projection flows back into it without a transposing copy
    (the real kernels and the fake kernel apply the same rule to the same strides)."""
    kw = dict(dtype=x.dtype, device=x.device)      # torch.empty, as every launcher allocates (tests poison it)
    if token_major(x):
        B, H, T, D = x.shape
        return torch.empty(B, T, H, D, **kw).transpose(1, 2)
    return torch.empty(x.shape, **kw)


def as_grad_layout(x: Tensor, g: Tensor) -> Tensor:
    """``g`` (the gradient of ``x``) in ``empty_grad(x)``'s layout: ``g`` itself when its strides already are
    (compared on the meta device: nothing is allocated then), else a copy."""
    if g.stride() == empty_grad(torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")).stride():
        return g
    return empty_grad(x).copy_(g)


def grads_in_layout(q: Tensor, k: Tensor, v: Tensor, grads: tuple) -> tuple:
    """(dq, dk, dv, dS0) with dq, dk, dv in ``empty_grad``'s layout of q, k, v: for the blocked form's contiguous
    gradients (the CPU kernel and the Triton path's fallback); the sweeps allocate the layout themselves."""
    dq, dk, dv, dS0 = grads
    return as_grad_layout(q, dq), as_grad_layout(k, dk), as_grad_layout(v, dv), dS0


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t) or t.device.type == "meta"


def decay_pow(s: Tensor, m: Tensor) -> Tensor:
    """lam^m = exp(-s m) for integer-valued m >= 0, exactly 1 at m = 0 for every rate (s = inf
    included, where -s * 0 would be NaN); broadcasts s against m."""
    return torch.where(m == 0, torch.ones((), dtype=m.dtype, device=m.device), torch.exp(-s * m.clamp(min=1)))


def intra_decay(s: Tensor, C: int, dtype: torch.dtype) -> Tensor:
    """D[h, j, i] = lam_h^(j-i) for j >= i else 0, shape [H, C, C]; never forms lam^(-t), exact 1 on the diagonal."""
    idx = torch.arange(C, device=s.device, dtype=dtype)
    diff = idx[:, None] - idx[None, :]
    D = decay_pow(s.to(dtype)[:, None, None], diff.clamp(min=0))
    return torch.where(diff >= 0, D, torch.zeros((), dtype=dtype, device=s.device))


def causal_mask(C: int, device) -> Tensor:
    """[C, C] bool, True where j >= i (row j may see column i)."""
    idx = torch.arange(C, device=device)
    return idx[:, None] >= idx[None, :]


def masked_matmul(P: Tensor, X: Tensor, reverse: bool = False) -> Tensor:
    """P @ X for a causal P (zero above the diagonal; below it when ``reverse``), without letting a
    non-finite row of X reach the rows of the result that P does not connect to it.

    ``0 * NaN = NaN`` inside a matmul would carry a NaN at position i into every output row; here
    X's non-finite entries are zeroed for the product and added back as a running sum over the
    position axis (-2): row j gets the non-finite entries of rows i <= j (i >= j when ``reverse``),
    so it is non-finite exactly where the causal sum includes them and bit-identical to the clean
    product elsewhere."""
    fin = torch.isfinite(X)
    if X.device.type == "cpu" and not torch.compiler.is_compiling() and not _is_fake(X) and bool(fin.all()):
        return P @ X                       # eager CPU fast path (no sync to avoid there): the same values
    zero = torch.zeros((), dtype=X.dtype, device=X.device)
    out = P @ torch.where(fin, X, zero)
    bad = torch.where(fin, zero, X)
    if reverse:
        pois = bad.flip(-2).cumsum(-2).flip(-2)
    else:
        pois = bad.cumsum(-2)
    return out + pois
