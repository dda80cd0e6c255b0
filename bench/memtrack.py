"""Peak live tensor memory of a CPU call, measured exactly with a TorchDispatchMode.

Every storage created inside the call is counted from its creation until it is freed (weakref
finalizer), so the peak is the high-water mark of bytes the call itself held, inputs excluded.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakMemory(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.largest = 0
        self._seen: set[int] = set()

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self._seen or st.nbytes() == 0:
            return
        self._seen.add(key)
        n = st.nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        self.largest = max(self.largest, n)

        def free(key=key, n=n):
            self.live -= n
            self._seen.discard(key)
        weakref.finalize(st, free)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._track(t)
        return out


def peak_bytes(fn, *args, **kwargs) -> tuple[int, int]:
    """(peak live bytes, largest single allocation) of ``fn(*args, **kwargs)``."""
    with PeakMemory() as pm:
        out = fn(*args, **kwargs)
    del out
    return pm.peak, pm.largest
