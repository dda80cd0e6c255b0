"""Test-session setup: a fresh inductor cache (AOTAutogradCache keys miss custom-op Python bodies),
hypothesis profiles, skipping of GPU tests on machines without CUDA, the Triton-interpreter suite's child
process (started right after collection on machines with >= 8 cores, its test run last; under pytest-xdist
its test runs first), a thread share per xdist worker, and a per-test log (TNLLM_TEST_LOG)."""
import os
import tempfile

# AOTAutogradCache keys miss Python bodies of custom-op backwards: never reuse a cache across runs.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="tnllm-inductor-"))

import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=10, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
# mutation checks: the ci examples, a failure reported as found (no shrinking, which under the interpreter takes
# minutes)
settings.register_profile("noshrink", parent=settings.get_profile("ci"),
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.register_profile("thorough", max_examples=300, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The Triton-interpreter suite runs in a child process of its own (tests/ops/test_triton.py): the
# interpreter is chosen when kernels are decorated, so in this process it would leak into the CUDA tests.
collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["interpret"]


_INTERP_TEST = "test_triton_kernels_under_the_interpreter"


_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)   # set in pytest-xdist workers
if _XDIST_WORKERS:
    # -n N: the workers share the cores (torch would give each worker a thread per core)
    import torch  # noqa: E402
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _XDIST_WORKERS))


def pytest_addoption(parser):
    parser.addoption("--sweep-wide", default="", metavar="BCxCHUNKwWARPS",
                     help="run the session with the Lightning Attention sweeps' WIDE_CONFIG set (16-bit tiles wider "
                          "than 64 columns), e.g. 128x32w8; 'none' unsets it")
    parser.addoption("--triton-setting", action="append", default=[], metavar="NAME=VALUE",
                     help="run the session with a setting of tnllm.ops.lightning_attn.triton changed (an upper-case "
                          "module attribute, VALUE a Python literal; for a *_CONFIG setting a tile spec "
                          "BCxCHUNKwWARPS or 'none'), e.g. STATE_T=True, WIDE_DA_CONFIG=64x32w8; repeatable")


def _set_tile_config(tri, name: str, spec: str, option: str) -> None:
    """Set the SweepConfig setting ``name`` from a tile spec BCxCHUNKwWARPS ('none': None), a usage error naming
    ``option`` otherwise."""
    try:
        setattr(tri, name, None if spec == "none" else tri.SweepConfig.from_spec(spec))
    except ValueError as e:
        raise pytest.UsageError(f"{option} (or 'none'): {e}")


def _triton_settings(config):
    import ast
    from tnllm.ops.lightning_attn import triton as tri
    for item in config.getoption("--triton-setting"):
        name, sep, value = item.partition("=")
        if not sep or not name.isupper() or not hasattr(tri, name):
            raise pytest.UsageError(f"--triton-setting: expected NAME=VALUE with NAME an upper-case setting of "
                                    f"tnllm.ops.lightning_attn.triton, got {item!r}")
        if name.endswith("_CONFIG"):          # a tile configuration (SweepConfig) or None
            _set_tile_config(tri, name, value, f"--triton-setting {name}")
            continue
        try:
            setattr(tri, name, ast.literal_eval(value))
        except (ValueError, SyntaxError) as e:
            raise pytest.UsageError(f"--triton-setting {name}: VALUE must be a Python literal, got {value!r} ({e})")


def pytest_configure(config):
    if config.getoption("--triton-setting"):
        _triton_settings(config)
    spec = config.getoption("--sweep-wide")
    if not spec:
        return
    from tnllm.ops.lightning_attn import triton as tri
    _set_tile_config(tri, "WIDE_CONFIG", spec, "--sweep-wide")


def pytest_collection_finish(session):
    """On a machine with >= 8 cores (e.g. a GPU host), start the interpreter suite's child process now, so that
    it runs beside the rest of the suite (it keeps one core busy for minutes); its test collects the result.
    Under pytest-xdist the test itself starts the child, and it is scheduled first, so one worker waits on it
    while the others run the rest."""
    if (os.cpu_count() or 1) < 8 or _XDIST_WORKERS:
        return
    for item in session.items:
        if item.name == _INTERP_TEST:
            item.module.start_child()
            return


def pytest_sessionfinish(session, exitstatus):
    for item in getattr(session, "items", []):
        if item.name == _INTERP_TEST:
            item.module.stop_child()
            return


def pytest_collection_modifyitems(config, items):
    import torch
    # the interpreter suite's test last: where its child started at collection, the rest of the suite ran beside
    # it; under xdist first, so that a worker starts the child at once
    items.sort(key=lambda it: (it.name == _INTERP_TEST) != bool(_XDIST_WORKERS))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """With ``TNLLM_TEST_LOG=FILE``, one line per test phase that took time or failed, appended and flushed
    at once (outcome, seconds, test id; a failure's report follows), so a run cut off by a time limit still
    says what ran, how long each test took and why one failed."""
    path = os.environ.get("TNLLM_TEST_LOG")
    if not path or (report.when != "call" and report.passed) or getattr(report, "node", None) is not None:
        return          # (under xdist the controller sees each worker's reports again, with .node set)
    with open(path, "a") as f:
        f.write(f"{report.outcome} {report.duration:.2f}s {report.when} {report.nodeid}\n")
        if report.failed:
            f.write(str(report.longrepr)[-6000:] + "\n")
