"""Tests that need TRITON_INTERPRET=1 from the start of their process (triton reads it when a kernel
is decorated). The main run does not collect them: ``tests/ops/test_gla_decode.py`` runs this
directory in a child ``python -m pytest`` with TRITON_INTERPRET=1 in the child's environment only."""
import os

if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore_glob = ["test_*.py"]
