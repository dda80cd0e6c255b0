"""The decode-stack kernel as compiled for an H200 (sm_90), checked on any machine (``tnllm.testing.compiled``:
``triton.compile`` for the target, the cubin's resources and SASS by Triton's cuobjdump): at the 385M layer shape on
132 programs, in bf16 with 8 warps, one row, as the decoder launches it (one layer per launch, or the LRPE layer
alone and the other 23 as one stack), no register spills, and the weight tiles load as 128-bit vectors through the
pointer table's alignment hint (without the hint the same loads are 16-bit: several hundred of them, and they spill).

What the kernel compiles to depends on the Triton version (its code generation and its bundled ptxas). The layer
launches that ``decode_path="layer"`` (the default at batch 1) makes are checked on every version: the 385M layer
without LRPE spills nothing on triton 3.6 (the GPU host's) and 3.9; the LRPE layer has a 32-byte stack frame (10
local loads / stores) on 3.6 and none on 3.9. The 23-layer stack spills on triton 3.6 (160 B, 59 local loads /
stores: its run-time layer loop), not on 3.9; on the H100 with 3.6 it was slower than the per-layer launches (25.0
against 23.5 us per layer, docs/benchmarks.md), so its no-spill check needs 3.9."""
import pytest

pytest.importorskip("triton")

import triton  # noqa: E402

from tnllm.testing import compiled  # noqa: E402

TRITON = tuple(int(x) for x in triton.__version__.split(".")[:2])

if compiled.cuobjdump() is None:
    pytest.skip("Triton's NVIDIA backend has no cuobjdump here", allow_module_level=True)


def _check_vector_loads(r, n):
    # the tiles of one layer, qkvu + out_proj + l1 + l2 + l3 (+ the next layer's qkvu and out_proj in a stack), at
    # 16 bytes per load: (32*1024 + 8*1024 + 2*32*1024 + 8*4096) * 2 B / 16 B / 256 threads = 68 loads per thread, 88
    # with the next layer's tiles
    assert r.vector_loads >= n, r.loads


@pytest.mark.parametrize("lrpe", [False, True])
def test_385m_layer_launch_no_spills_and_vector_loads(lrpe):
    """One layer per launch (the default path at batch 1): no register spills, 128-bit weight loads."""
    r = compiled.decode_stack_resources(lrpe=lrpe, layers=1)
    assert r.regs <= 255
    # the LRPE layer's 32-byte frame (10 local loads / stores) on triton 3.6 is not register pressure (228 of 255)
    stack, ops = (32, 10) if (lrpe and TRITON < (3, 9)) else (0, 0)
    assert r.local == 0 and r.stack <= stack and r.spill_ops <= ops, \
        f"{r.stack} B stack, {r.spill_ops} local loads / stores ({r.regs} registers)"
    _check_vector_loads(r, 68)


@pytest.mark.skipif(TRITON < (3, 9), reason="triton < 3.9 spills the stack's run-time layer loop (160 B on 3.6)")
def test_385m_stack_of_23_no_spills_and_vector_loads():
    r = compiled.decode_stack_resources(lrpe=False, layers=23)
    assert not r.spills, f"registers spill: {r.stack} B stack, {r.spill_ops} local loads / stores ({r.regs} registers)"
    assert r.regs <= 255
    # layout conversions through shared memory stay few (112 per layer; a tile layout that triton 3.6 converted
    # through shared memory, 1786 per layer, ran six times slower on the GPU)
    assert r.loop_shared_ops <= 128, r.loop_shared_ops
    _check_vector_loads(r, 88)


def test_the_alignment_hint_gives_the_vector_loads():
    r = compiled.decode_stack_resources(aligned=False)
    assert r.vector_loads < 10 and sum(r.loads.values()) > 500, r.loads
