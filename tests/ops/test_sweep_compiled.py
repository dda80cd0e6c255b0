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


@pytest.mark.parametrize("DA,reverse", [(128, False), (128, True), (64, False)], ids=["d128-fwd", "d128-rev", "d64"])
def test_transposed_state_takes_register_operands(DA, reverse):
    """STATE_T at even lengths: the state and the decayed C^T feed their products from registers, so the chunk loop
    makes fewer shared-memory loads / stores and fewer instructions than the default loop, without spilling (sm_90;
    D128 forward 26 -> 14 shared-memory ops, 676 -> 587 instructions on triton 3.6)."""
    kw = dict(DA=DA, DC=DA, BC=64, CHUNK=64, num_warps=4, reverse=reverse, even=True)
    base, st = compiled.sweep_resources(st=False, **kw), compiled.sweep_resources(st=True, **kw)
    assert st.loop_spill_ops == 0, (st.stack, st.spill_ops, st.loop_spill_ops)
    assert st.loop_shared_ops < base.loop_shared_ops, (st.loop_shared_ops, base.loop_shared_ops)
    assert st.loop_instructions < base.loop_instructions, (st.loop_instructions, base.loop_instructions)


@pytest.mark.parametrize("kernel", ["prepass", "dkdv"])
def test_diag_decay_takes_register_operands(kernel):
    """DIAG_DECAY: the split pre-pass's decayed Bm^T ([128, 128] tile, 8 warps) and the fused dk/dv sweep's decayed
    q^T (D64, even lengths) as products with diag(kdec): fewer instructions per chunk, no spills (sm_90; triton 3.6:
    285 -> 221 and 713 -> 670)."""
    get = compiled.local_state_resources if kernel == "prepass" else compiled.dkdv_resources
    base, diag = get(diag=False), get(diag=True)
    assert diag.loop_spill_ops == 0 and diag.spill_ops == 0, (diag.stack, diag.spill_ops)
    assert diag.loop_instructions < base.loop_instructions, (diag.loop_instructions, base.loop_instructions)
