"""The launchers' integer helpers (ops/_launch.py) equal Triton's own on every value the launchers pass."""
import pytest

from tnllm.ops._launch import cdiv, next_pow2

triton = pytest.importorskip("triton")


def test_cdiv_and_next_pow2_equal_triton():
    for x in list(range(0, 300)) + [2 ** 20 - 1, 2 ** 20, 2 ** 31 + 5, 2 ** 40 + 3]:
        for y in (1, 2, 3, 7, 16, 64, 128, 1000):
            assert cdiv(x, y) == triton.cdiv(x, y), (x, y)
        if x >= 1:
            assert next_pow2(x) == triton.next_power_of_2(x), x


# -- cached launches (launch) ---------------------------------------------------------------------------------
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tnllm.ops import _launch  # noqa: E402


class _Ptr:
    """A CUDA tensor as far as ``launch`` looks: is_cuda, dtype, data_ptr."""
    is_cuda = True

    def __init__(self, ptr, dtype=torch.bfloat16):
        self.ptr, self.dtype = ptr, dtype

    def data_ptr(self):
        return self.ptr


class _Compiled:
    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, "fn", "meta"

    def run(self, *a):
        self.log.append(("fast", a))


class _Kernel:
    """Stands in for a JITFunction: kernel[grid](*args, **kw) logs the launch and returns a compiled kernel."""
    arg_names = ["X", "Y", "n", "stride", "BLOCK", "FLAG"]

    def __init__(self, compiled=True):
        self.log, self.compiled = [], compiled

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.log.append(("triton", grid, args, kw))
            return _Compiled(self.log) if self.compiled else object()
        return run


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(_launch, "_CACHE", {})
    monkeypatch.setattr(_launch, "_interpreting", lambda: False)
    monkeypatch.setattr(_launch, "_raw_stream", lambda dev: 77)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_launch_binds_once_per_specialisation(fake_cuda):
    k = _Kernel()
    X, Y = _Ptr(4096), _Ptr(8192)
    kw = dict(BLOCK=64, FLAG=True, num_warps=4, num_stages=2)
    _launch.launch(k, 10, (X, Y, 100, 32), kw)
    _launch.launch(k, 12, (_Ptr(1024), Y, 36, 48), kw)      # same specialisation: aligned, not 1, %16 / not
    assert [e[0] for e in k.log] == ["triton", "fast"]
    assert k.log[0][1:] == ((10,), (X, Y, 100, 32), kw)
    # the compiled launcher gets the grid, the stream, the handles, no metadata or hooks, then every parameter in
    # the kernel's order (run-time arguments, then the constexprs by name), as Triton's own launch passes them
    assert k.log[1][1][:9] == (12, 1, 1, 77, "fn", "meta", None, None, None)
    assert k.log[1][1][9:11] == (k.log[1][1][9], Y) and k.log[1][1][11:] == (36, 48, 64, True)
    for variant in [(_Ptr(4100), Y, 100, 32),     # misaligned pointer
                    (X, _Ptr(8192, torch.float16), 100, 32),      # another dtype
                    (X, Y, 1, 32), (X, Y, 100, 33), (X, Y, 2 ** 31, 32)]:   # an int that is 1, not %16, not i32
        n = len(k.log)
        _launch.launch(k, 10, variant, kw)
        assert k.log[n][0] == "triton", variant
    n = len(k.log)
    _launch.launch(k, 10, (X, Y, 100, 32), dict(kw, BLOCK=128))            # another constexpr
    _launch.launch(k, 10, (X, Y, 100, 32), dict(kw, num_warps=8))          # another launch option
    assert [e[0] for e in k.log[n:]] == ["triton", "triton"]


def test_launch_falls_back_to_triton(fake_cuda, monkeypatch):
    kw = dict(BLOCK=64, FLAG=False)
    args = (_Ptr(4096), _Ptr(4096), 5, 16)
    k = _Kernel(compiled=False)                  # a Triton whose launch returns no usable compiled kernel
    for _ in range(3):
        _launch.launch(k, 4, args, kw)
    assert [e[0] for e in k.log] == ["triton"] * 3
    k = _Kernel()
    for _ in range(2):
        _launch.launch(k, 4, args, dict(BLOCK=64))              # FLAG left to its default: Triton binds it
    assert [e[0] for e in k.log] == ["triton"] * 2
    k = _Kernel()
    monkeypatch.setattr(_launch, "FAST_LAUNCH", False)
    for _ in range(2):
        _launch.launch(k, 4, args, kw)
    monkeypatch.setattr(_launch, "FAST_LAUNCH", True)
    monkeypatch.setattr(_launch, "_hooks_set", lambda: True)       # a profiler's launch hook
    for _ in range(2):
        _launch.launch(k, 4, args, kw)
    assert [e[0] for e in k.log] == ["triton"] * 4
    k = _Kernel()
    monkeypatch.setattr(_launch, "_hooks_set", lambda: False)
    cpu = torch.empty(4)                         # not a CUDA tensor: Triton's launch (the interpreter, stubs)
    for _ in range(2):
        _launch.launch(k, 4, (cpu, cpu, 5, 16), kw)
    assert [e[0] for e in k.log] == ["triton"] * 2


def test_no_launch_hooks_by_default():
    assert not _launch._hooks_set()


def _triton_binder():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    from tnllm.ops.lightning_attn import triton as tri
    fn = tri._la_sweep_kernel
    return create_function_from_signature(fn.signature, fn.params, make_backend(GPUTarget("cuda", 90, 32)))


_INTS = st.one_of(st.sampled_from([0, 1, 2, 15, 16, 17, 32, 64, 2 ** 31 - 16, 2 ** 31, 2 ** 40]),
                  st.integers(0, 2 ** 33), st.integers(0, 2 ** 12).map(lambda x: 16 * x))


@settings(max_examples=60)
@given(ints=st.lists(st.tuples(_INTS, _INTS), min_size=25, max_size=25), offs=st.lists(st.tuples(
    st.sampled_from([0, 2, 8, 16, 32]), st.sampled_from([0, 2, 8, 16, 32])), min_size=11, max_size=11))
def test_launch_key_is_never_coarser_than_tritons(ints, offs):
    """For the sweep kernel's real signature, argument by argument: where ``launch``'s key gives two values one
    class, Triton's own binder (sm_90 target) gives them one specialisation, so a cached kernel is always the one
    Triton would pick. (Pairs drawn from a pool with many shared classes: the premise holds often.)"""
    try:
        bind = _triton_binder()
    except Exception as e:                      # no CUDA backend in this Triton
        pytest.skip(f"Triton's CUDA binder unavailable: {e}")
    base = torch.empty(64, dtype=torch.bfloat16)
    kw = dict(DA=128, DC=128, BA=128, BC=64, CHUNK=64, REVERSE=False, E0=0, HAS_S0=False, WRITE_SF=True,
              SF_SHIFT=False, IEEE=False, NF=0, WRITE_FLAG=True, REDO=False, VARLEN=False, WT=False, PREFIX=False,
              KDEC_C=True, WHERE0=False, EVEN=False, ST=False, num_warps=4,
              num_stages=2, debug=False, instrumentation_mode="")

    def argset(j):
        ts = tuple(base[o[j] // 2:] for o in offs)            # bf16: an element offset of o/2 is o bytes
        return ts + tuple(i[j] for i in ints)
    a, b = argset(0), argset(1)
    sa, sb = bind(*a, **kw)[1], bind(*b, **kw)[1]
    same = 0
    for i in range(len(a)):
        if _launch._spec(a[i:i + 1]) == _launch._spec(b[i:i + 1]):
            same += 1
            assert sa[i] == sb[i], (i, a[i], b[i], sa[i], sb[i])
    assert same > 0
