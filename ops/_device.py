"""Device facts the Triton launchers size their grids by (torch only, no triton import)."""
from __future__ import annotations

import torch

_SMS: dict = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (read once per device); 132 (an H200) elsewhere, e.g. for
    the Triton interpreter on CPU, so grids are sized as on the GPU. A plain dict memo rather than
    ``functools.lru_cache``, which torch.compile warns about when a traced decode step calls this."""
    if device.type != "cuda":
        return 132
    key = device.index if device.index is not None else torch.cuda.current_device()
    n = _SMS.get(key)
    if n is None:
        n = _SMS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return n
