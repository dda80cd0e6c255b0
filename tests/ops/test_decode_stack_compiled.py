"""The decode-stack kernel as compiled for an H200 (sm_90), checked on any machine (``tnllm.testing.compiled``:
``triton.compile`` for the target, the cubin's resources and SASS by Triton's cuobjdump): at the 385M layer shape on
132 programs, in bf16 with 8 warps, one row, as the decoder launches it (the LRPE layer alone, the other 23 as one
stack), no register spills, and the weight tiles load as 128-bit vectors through the pointer table's alignment hint
(without the hint the same loads are 16-bit: several hundred of them, and they spill)."""
import pytest

pytest.importorskip("triton")

from tnllm.testing import compiled  # noqa: E402

if compiled.cuobjdump() is None:
    pytest.skip("Triton's NVIDIA backend has no cuobjdump here", allow_module_level=True)


@pytest.mark.parametrize("lrpe", [False, True])
def test_385m_stack_kernel_no_spills_and_vector_loads(lrpe):
    r = compiled.decode_stack_resources(lrpe=lrpe)
    assert not r.spills, f"registers spill: {r.stack} B stack, {r.spill_ops} local loads / stores ({r.regs} registers)"
    assert r.regs <= 255
    # the tiles of one layer, qkvu + out_proj + l1 + l2 + l3 (+ the next layer's qkvu and out_proj in a stack), at
    # 16 bytes per load: (32*1024 + 8*1024 + 2*32*1024 + 8*4096) * 2 B / 16 B / 256 threads = 68 loads per thread, 88
    # with the next layer's tiles
    assert r.vector_loads >= (68 if lrpe else 88), r.loads


def test_the_alignment_hint_gives_the_vector_loads():
    r = compiled.decode_stack_resources(aligned=False)
    assert r.vector_loads < 10 and sum(r.loads.values()) > 500, r.loads
