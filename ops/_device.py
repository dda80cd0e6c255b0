"""Device facts the Triton launchers size their grids by (torch only, no triton import)."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (read once per device); 132 (an H200) elsewhere, e.g. for
    the Triton interpreter on CPU, so grids are sized as on the GPU."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count
