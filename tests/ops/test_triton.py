"""The Triton kernels under TRITON_INTERPRET=1, in a child process of their own.

Triton picks the interpreter when a kernel is decorated, so setting the variable here (and reloading
the kernel module) would make every CUDA test of this process run interpreted. The interpreter
suite lives in tests/interpret/ (not collected by the main run); this test runs it with
``python -m pytest`` in a fresh interpreter, TRITON_INTERPRET=1 and no visible GPU (the interpreter
runs the kernels on CPU tensors on any machine), and fails with the child's failures.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SUITE = Path(__file__).resolve().parents[1] / "interpret"


def test_triton_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env.setdefault("HYPOTHESIS_PROFILE", "ci")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", str(SUITE)]
    proc = subprocess.run(cmd, cwd=SUITE.parents[1], env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    summary = [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR")) or " passed" in ln or " failed" in ln]
    assert proc.returncode == 0, (f"the interpreter suite failed (exit {proc.returncode}):\n" + "\n".join(summary)
                                  + "\n---- last output ----\n" + out[-6000:])
    assert " passed" in out and "skipped" not in out.split("\n")[-2], out[-2000:]
