"""The Triton launchers' Python side: integer helpers (grids, tile widths) and cached launches (``launch``).

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` objects (triton 3.6 and 3.9): called
from Python each costs about 1.5 us, and a Lightning Attention backward computes about 27 of them per call, on the
host's critical path of a training step. These are the same functions in plain Python (about 0.02 us)."""
from __future__ import annotations


def cdiv(x: int, y: int) -> int:
    """ceil(x / y) for ints, as ``triton.cdiv``."""
    return (x + y - 1) // y


def next_pow2(n: int) -> int:
    """The smallest power of 2 >= n for 1 <= n < 2**64, as ``triton.next_power_of_2`` (which gives 0 at n = 0)."""
    n -= 1
    n |= n >> 1
    n |= n >> 2
    n |= n >> 4
    n |= n >> 8
    n |= n >> 16
    n |= n >> 32
    return n + 1


# -- cached launches -------------------------------------------------------------------------------------------
# On every ``kernel[grid](*args, **kw)`` Triton binds and specialises each argument (``native_specialize_impl`` for
# each of the sweep's 36), hashes the cache key, looks up the device and stream, builds the launch metadata and
# calls the (empty) launch hooks; a Lightning Attention forward + backward makes 6 (D64) to 11 (the 385M training
# shape) launches, and the eager op was host-bound below the largest shapes. Skipping that saved 12-18 us per launch on an H100 host (triton 3.6,
# ``bench/op_host.py``: the D128 forward's two launches 96 -> 73 us, the backward's six 496 -> 389). ``launch`` does
# the first launch of each specialisation through Triton and keeps the compiled kernel; later launches with the
# same specialisation call the compiled kernel's launcher directly. The key holds what Triton specialises on, for
# every run-time argument (a tensor's dtype and 16-byte alignment; an int's being 1, its divisibility by 16 and
# its 32-bit range), and every constexpr and launch option (``kw``), so it is never coarser than Triton's own.
# Off (plain ``kernel[grid]``) under the Triton interpreter, for non-CUDA tensors, with Triton launch hooks set
# (profilers), and where this Triton lacks the compiled kernel's ``run`` / ``function`` / ``packed_metadata``
# (checked at the first launch). Triton's debug and instrumentation settings are read at the first launch of each
# specialisation only.
FAST_LAUNCH = True
_CACHE: dict = {}
_CACHE_MAX = 4096
_I32 = (-2 ** 31, 2 ** 31)


def _spec(args) -> tuple:
    out = []
    for a in args:
        if type(a) is int:
            out.append(-1 if a == 1 else (a % 16 == 0) + 2 * (_I32[0] <= a < _I32[1]) + 4 * (a >= 2 ** 63))
        elif a is None or type(a) is bool:
            out.append(a)
        elif type(a) is float:
            out.append(float)
        else:                                   # a tensor (anything else gets its type and value: never coarser)
            out.append((a.dtype, a.data_ptr() % 16 == 0) if hasattr(a, "data_ptr") else (type(a), a))
    return tuple(out)


def _hooks_set() -> bool:
    from triton import knobs
    rt = knobs.runtime
    return any(getattr(h, "calls", h) for h in (rt.launch_enter_hook, rt.launch_exit_hook))


def _interpreting() -> bool:
    from triton import knobs
    return bool(knobs.runtime.interpret)


def _raw_stream(dev: int) -> int:
    import torch
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)       # what Triton's driver uses, where it exists
    return get(dev) if get is not None else torch.cuda.current_stream(dev).cuda_stream


def launch(kernel, grid: int, args: tuple, kw: dict) -> None:
    """``kernel[(grid,)](*args, **kw)`` for a 1-D grid, the binding skipped after the first launch of each
    specialisation (see above). ``args`` are the kernel's run-time parameters in order, ``args[0]`` a tensor; ``kw``
    all the rest by name, each a constexpr (an int, bool or None: its value is part of the key), and the launch
    options (num_warps, num_stages)."""
    if not FAST_LAUNCH or not args[0].is_cuda or _interpreting() or _hooks_set():
        kernel[(grid,)](*args, **kw)
        return
    import torch
    dev = torch.cuda.current_device()
    key = (id(kernel), dev, _spec(args), tuple(kw.items()))
    hit = _CACHE.get(key)
    if hit is not None:
        ck, tail = hit
        ck.run(grid, 1, 1, _raw_stream(dev), ck.function, ck.packed_metadata, None, None, None,
               *args, *[kw[n] for n in tail])
        return
    ck = kernel[(grid,)](*args, **kw)
    names = getattr(kernel, "arg_names", None)
    if names is None or not all(hasattr(ck, a) for a in ("run", "function", "packed_metadata")):
        return                                   # another Triton: every launch goes through kernel[grid]
    tail = tuple(names[len(args):])
    if any(n not in kw for n in tail):           # a parameter left to its default: keep Triton's binding
        return
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
    _CACHE[key] = (ck, tail)
