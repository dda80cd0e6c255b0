"""The Triton kernels under TRITON_INTERPRET=1, in a child process of their own (spread over pytest-xdist workers
of its own on a machine with many cores: ``child_workers``).

Triton picks the interpreter when a kernel is decorated, so setting the variable here (and reloading
the kernel module) would make every CUDA test of this process run interpreted. The interpreter
suite lives in tests/interpret/ (not collected by the main run); this test runs it with
``python -m pytest`` in a fresh interpreter, TRITON_INTERPRET=1 and no visible GPU (the interpreter
runs the kernels on CPU tensors on any machine), and fails with the child's failures.
"""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("triton")

SUITE = Path(__file__).resolve().parents[1] / "interpret"
_CHILD: dict = {}


def child_workers() -> int:
    """pytest-xdist workers of the interpreter suite's child: a quarter of the cores, 1 to 4 (one on a 2-core CI
    machine, whose cores the main run's workers use; 4 on a 16-core GPU host, where the serial child was the
    suite's longest test)."""
    try:
        import xdist  # noqa: F401
    except ImportError:
        return 1
    return max(1, min(4, (os.cpu_count() or 1) // 4))


def start_child() -> None:
    """Start the interpreter suite in its child process (once). tests/conftest.py calls this right after
    collection on machines with >= 8 cores, so that the child (one busy core) runs beside the rest of the
    suite; otherwise the test below starts it and waits."""
    if _CHILD:
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}   # the child is no worker
    env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env.setdefault("HYPOTHESIS_PROFILE", "ci")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", str(SUITE)]
    workers = child_workers()
    if workers > 1:
        cmd += ["-n", str(workers)]
    log = tempfile.TemporaryFile(mode="w+")
    _CHILD.update(proc=subprocess.Popen(cmd, cwd=SUITE.parents[1], env=env, stdout=log, stderr=subprocess.STDOUT,
                                        text=True), log=log, t0=time.monotonic())


def stop_child() -> None:
    """Kill the child if it still runs (the session ended before its test collected it, e.g. under -x)."""
    proc = _CHILD.get("proc")
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def test_triton_kernels_under_the_interpreter():
    start_child()
    proc, log = _CHILD["proc"], _CHILD["log"]
    try:
        proc.wait(timeout=max(1.0, 900 - (time.monotonic() - _CHILD["t0"])))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.seek(0)
    out = log.read()
    summary = [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR")) or " passed" in ln or " failed" in ln]
    assert proc.returncode == 0, (f"the interpreter suite failed (exit {proc.returncode}):\n" + "\n".join(summary)
                                  + "\n---- last output ----\n" + out[-6000:])
    assert " passed" in out and "skipped" not in out.strip().split("\n")[-1], out[-2000:]
