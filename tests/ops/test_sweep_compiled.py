"""The Lightning Attention sweep kernel as compiled for an H200 (sm_90), checked on any machine
(``tnllm.testing.compiled``): the 16-bit configuration that holds a head's whole [128, 128] state in one program
(``SweepConfig.from_spec("128x32w8")``: the candidate for ``WIDE_CONFIG``) keeps its state in registers, in the forward
frame and in the reverse frame (the dk sweep's variant that reads the dv sweep's local states transposed included);
and the default D128 tile ([128, 64] at 64 chunk rows, 4 warps) no longer spills in its chunk loop since its state
update scales the C tile (KDEC_ON_C) and its unmasked loop masks the scores by the decay matrix alone, where the same
tile as it was before (``kdec_c=False, where0=True, even=False``) spilled: 104 B of stack on triton 3.6, 96 B on
3.9; the variant without masks for lengths divisible by the chunk rows (EVEN_TILES) issues fewer instructions still."""
import pytest

pytest.importorskip("triton")

from tnllm.testing import compiled  # noqa: E402

if compiled.cuobjdump() is None:
    pytest.skip("Triton's NVIDIA backend has no cuobjdump here", allow_module_level=True)


@pytest.mark.parametrize("reverse,wt", [(False, False), (True, False), (True, True)], ids=["fwd", "rev", "rev-wt"])
def test_whole_head_state_in_registers(reverse, wt):
    r = compiled.sweep_resources(DA=128, DC=128, BC=128, CHUNK=32, num_warps=8, reverse=reverse, wt=wt)
    assert not r.spills, f"registers spill: {r.stack} B stack, {r.spill_ops} local loads / stores ({r.regs} registers)"
    assert r.regs <= 255 and r.loop_instructions > 0


@pytest.mark.parametrize("reverse,wt", [(False, False), (True, False), (True, True)], ids=["fwd", "rev", "rev-wt"])
def test_default_d128_tile_in_registers(reverse, wt):
    kw = dict(DA=128, DC=128, BC=64, CHUNK=64, num_warps=4, reverse=reverse, wt=wt)
    masked = compiled.sweep_resources(even=False, **kw)       # any length
    assert not masked.spills, (f"registers spill: {masked.stack} B stack, {masked.spill_ops} local loads / stores "
                               f"({masked.regs} registers)")
    even = compiled.sweep_resources(even=True, **kw)          # a length divisible by the chunk rows
    # no spill in the chunk loop (with triton 3.9 a 16-24 B frame outside it; none with 3.6)
    assert even.loop_spill_ops == 0, (even.stack, even.spill_ops, even.loop_spill_ops)
    before = compiled.sweep_resources(kdec_c=False, where0=True, even=False, **kw)
    # fewer instructions per chunk than the loop as it was: forward 1078 -> 833 (masked) -> 696 (even) on triton 3.9,
    # 1060 -> 810 -> 676 on 3.6
    assert masked.loop_instructions < 0.85 * before.loop_instructions, (masked.loop_instructions,
                                                                         before.loop_instructions)
    assert even.loop_instructions < 0.9 * masked.loop_instructions, (even.loop_instructions, masked.loop_instructions)
