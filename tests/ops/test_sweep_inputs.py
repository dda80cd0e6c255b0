"""The Triton sweep's input preparation (``_last_unit``), on CPU: what reaches a kernel launch is 16-byte
aligned with a unit last stride, for every layout, including views whose only non-unit dimension is the last
(T = 1, B = H = 1), which ``contiguous()`` hands back unchanged. Such a misaligned view gave wrong bf16
outputs and fp16 illegal memory accesses on the H200 (tests/gpu::test_t1_wide_k_narrow_v_cuda)."""
import pytest
import torch

from tnllm.ops.lightning_attn.triton import _last_unit


def layouts(B, H, T, D, dt):
    base = torch.randn(B, H, T, D + 3).to(dt)
    yield "padded", base[..., 1:D + 1]                                    # start 1 element in, row stride D + 3
    yield "bthd", torch.randn(B, T, H, D).to(dt).transpose(1, 2)          # the model's layout: aligned, no copy
    yield "contiguous", torch.randn(B, H, T, D).to(dt)
    yield "strided_last", torch.randn(B, H, T, 2 * D).to(dt)[..., ::2]


@pytest.mark.parametrize("shape", [(1, 1, 1, 128), (1, 1, 1, 16), (2, 3, 1, 64), (1, 1, 5, 48), (2, 2, 7, 128)])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16, torch.float32])
def test_launch_inputs_aligned_with_unit_last_stride(shape, dt):
    for name, x in layouts(*shape, dt):
        y = _last_unit(x)
        es = y.element_size()
        assert torch.equal(y, x), name
        assert y.stride(-1) == 1 or y.shape[-1] == 1, name
        assert y.data_ptr() % 16 == 0, (name, shape, y.data_ptr() % 16)
        assert all((st * es) % 16 == 0 for st in y.stride()[:-1]), (name, y.stride())
        if name == "bthd" and (shape[-1] * es) % 16 == 0:
            assert y.data_ptr() == x.data_ptr(), "an aligned view must not be copied"


def test_auto_split_policy():
    from tnllm.ops.lightning_attn.triton import auto_split
    sms = 132
    assert auto_split(256, 128, sms) == 1            # B8 H16 D128 (2 tiles of 64): the GPU is full
    assert auto_split(132, 4096, sms) == 1
    assert auto_split(128, 128, sms) == 1            # B8 H16 D64 (one tile): 3 splits measured slower
    assert auto_split(67, 512, sms) == 1             # more than half the SMs busy
    assert auto_split(66, 512, sms) == 16            # 1056 programs: 4 whole waves of 2 x 132
    assert auto_split(64, 512, sms) == 16            # B2 H16 T32768 D128
    assert auto_split(32, 128, sms) == 16            # B2 H8 T8192 D128 (the 385M training step): not 9 (3 waves)
    assert auto_split(1, 94, sms) == 16              # one long head: at most 16 splits
    assert auto_split(8, 7, sms) == 1                # under 8 chunks: not worth a pre-pass
    assert auto_split(8, 12, sms) == 3               # every split at least 4 chunks long
    # one resident program per SM (8 warps) instead of two: the waves double, and so does the cost of a split
    assert auto_split(40, 128, sms, per_sm=2) == 13    # 520 programs: 2 waves of 10 chunks
    assert auto_split(40, 128, sms, per_sm=1) == 16    # 13 splits would take 4 waves of 132: 16 take 5 of 8 chunks
    assert auto_split(16, 128, sms, per_sm=1) == 16    # B2 H8 D128 as one [128, 128] tile per head
    for programs in (1, 3, 17, 64, 131):
        for n_chunks in (8, 9, 31, 100, 10_000):
            k = auto_split(programs, n_chunks, sms)
            assert 1 <= k <= 16 and (k == 1 or n_chunks // k >= 4)


def test_sweep_config_from_spec():
    from tnllm.ops.lightning_attn.triton import SweepConfig
    assert SweepConfig.from_spec("128x32w8") == SweepConfig(BC=128, CHUNK=32, num_warps=8, num_stages=2)
    for bad in ("128x32", "x32w8", "128-32w8", "axbwc"):
        with pytest.raises(ValueError, match="from_spec"):
            SweepConfig.from_spec(bad)
