"""Test-session setup: a fresh inductor cache (AOTAutogradCache keys miss custom-op Python bodies),
hypothesis profiles, and skipping of GPU tests on machines without CUDA."""
import os
import tempfile

# AOTAutogradCache keys miss Python bodies of custom-op backwards: never reuse a cache across runs.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="tnllm-inductor-"))

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=10, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The Triton-interpreter suite runs in a child process of its own (tests/ops/test_triton.py): the
# interpreter is chosen when kernels are decorated, so in this process it would leak into the CUDA tests.
collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["interpret"]


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
