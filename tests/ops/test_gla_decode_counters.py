"""The fused decode kernel's ticket counters (ops/gla_decode/triton.py), on CPU: a counter buffer once handed
out stays alive when a larger batch replaces it, because a CUDA graph captured with it keeps its address
(``SlotBatch`` captures one graph per bucket of rows, ascending: the small buckets' graphs hold the first
buffer). The GPU side: tests/gpu/test_serve_gpu.py::test_graphs_of_small_buckets_survive_a_larger_bucket_capture."""
import gc
import weakref

import torch

from tnllm.ops.gla_decode import triton as tri


def test_a_replaced_counter_buffer_stays_alive_and_zero():
    dev = torch.device("cpu")
    key = (dev.type, dev.index)
    saved, retired = tri._COUNTERS.pop(key, None), list(tri._RETIRED)
    try:
        small = tri._counters(dev, 8)
        assert small.numel() >= 8 and not small.any()
        assert tri._counters(dev, 8) is small                     # reused while large enough
        ref = weakref.ref(small)
        ptr = small.data_ptr()
        del small
        big = tri._counters(dev, 10_000)
        assert big.numel() >= 10_000 and big.data_ptr() != ptr
        gc.collect()
        old = ref()
        assert old is not None, "the replaced buffer was freed: graphs captured with it would use freed memory"
        assert old.data_ptr() == ptr and not old.any()
        assert tri._counters(dev, 100) is big
    finally:
        tri._RETIRED[:] = retired
        if saved is None:
            tri._COUNTERS.pop(key, None)
        else:
            tri._COUNTERS[key] = saved
