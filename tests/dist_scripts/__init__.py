"""Worker functions for tests/test_distributed.py, run in spawned processes (gloo on CPU)."""
