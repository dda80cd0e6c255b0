"""What a Triton kernel compiles to for a CUDA target, on any machine (no GPU needed): registers per thread, spills
(the stack frame and the SASS local loads and stores), shared memory per program, and the widths of its global loads, read from the cubin (``cuobjdump``, shipped
with Triton) and the PTX that ``triton.compile`` produces for the target.

This is how the decode kernels' register budget and 128-bit weight loads are checked in CI, on the CPU:

    python -m tnllm.testing.compiled             # the decode-stack kernel at the 385M layer shape, sm_90, bf16
    python -m tnllm.testing.compiled attention   # the Lightning Attention sweep kernel's tile configurations

``resources(fn, signature, constexprs, num_warps)`` compiles one specialisation; pointer arguments are marked
16-byte aligned, as Triton's launcher marks the aligned tensors it is given.

The answer is the installed Triton's (its code generation and its bundled ptxas), and versions differ: the 385M
decode stack of 23 layers spills nothing with triton 3.9 but 160 bytes with triton 3.6, and a GEMV layout that cut
the layer loop's instructions by a fifth with 3.9 ran six times slower on a GPU with 3.6. Check with the Triton that
the GPU runs (a second one can be installed into a side folder: ``pip install --target DIR triton==X`` and
``PYTHONPATH=DIR``).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Resources:
    """A compiled kernel: ``regs`` per thread, ``stack`` bytes of stack frame per thread (where ptxas spills
    registers), ``local`` bytes of other local memory per thread, ``shared`` bytes of shared memory per program
    (what the launch asks for), ``spill_ops`` (the SASS local loads and stores: LDL, STL), ``loop_instructions`` and
    ``loop_spill_ops`` (the SASS instructions and spill loads / stores of the longest loop body, e.g. a sweep's
    chunk loop: what one thread issues per trip), ``loop_barriers`` (the CTA barriers, ``BAR.SYNC``, in that loop body:
    each a wait for all the program's warps, e.g. a reduction across warps through shared memory),
    ``loop_shared_ops`` (the shared-memory loads and stores, ``LDS`` / ``STS``, in that loop body: layout
    conversions and cross-warp reductions go through shared memory), ``loads``
    (global load instructions by width suffix, e.g. ``".v4.b32"`` for 128 bits) and the PTX."""
    regs: int
    stack: int
    local: int
    shared: int
    spill_ops: int = 0
    loop_instructions: int = 0
    loop_spill_ops: int = 0
    loop_barriers: int = 0
    loop_shared_ops: int = 0
    loads: Counter = field(default_factory=Counter)
    ptx: str = ""

    @property
    def spills(self) -> bool:
        """Whether registers spill to memory (a stack frame, local memory or local loads / stores in the SASS)."""
        return bool(self.stack or self.local or self.spill_ops)

    @property
    def vector_loads(self) -> int:
        """Global loads of 128 bits (``ld.global[.cg].v4.b32``)."""
        return sum(n for k, n in self.loads.items() if k.endswith(".v4.b32"))


def cuobjdump() -> str | None:
    """The ``cuobjdump`` shipped with Triton's NVIDIA backend, or None."""
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def _compile(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int,
             divisible: tuple[str, ...]) -> tuple:
    """(the compiled kernel, its cubin's ``cuobjdump --dump-resource-usage`` and ``-sass`` outputs); see resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("Triton's NVIDIA backend has no cuobjdump here: cannot read a cubin's resources")
    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in signature.items()
             if v.startswith("*") or k in divisible}
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(c.asm["cubin"])
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    return c, usage, sass


def resources(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3, arch: int = 90,
              divisible: tuple[str, ...] = ()) -> Resources:
    """Compile the ``@triton.jit`` function ``fn`` for ``sm_<arch>`` with ``signature`` (argument name -> Triton
    type, e.g. ``"*bf16"``, ``"i32"``; constexprs included as ``"constexpr"``) and ``constexprs`` (name -> value),
    and read its resources. Pointers are marked 16-byte aligned, and the integer arguments named in ``divisible``
    multiples of 16 (what Triton's launcher marks for the values it is given, unless ``do_not_specialize``). Raises
    RuntimeError when Triton's cuobjdump is missing."""
    c, out, sass = _compile(fn, signature, constexprs, num_warps, num_stages, arch, divisible)
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    num = {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", line)}
    ptx = c.asm["ptx"]
    loads = Counter(m.group(1) or "" for m in re.finditer(r"ld\.global((?:\.[a-z0-9]+)*)\s", ptx))
    body = _longest_loop(sass)
    return Resources(regs=num["REG"], stack=num["STACK"], local=num["LOCAL"],
                     shared=max(num["SHARED"], c.metadata.shared),
                     spill_ops=len(re.findall(_SPILL, sass)), loop_instructions=len(body),
                     loop_spill_ops=_matching(body, _SPILL), loop_barriers=_matching(body, r"\bBAR\.SYNC\b"),
                     loop_shared_ops=_matching(body, r"\b(?:LDS|STS)\b"), loads=loads, ptx=ptx)


def sass_instructions(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3,
                      arch: int = 90, divisible: tuple[str, ...] = ()) -> list[str]:
    """The SASS instructions of the same compile as ``resources`` (its arguments), their addresses dropped: two
    sources compile to the same machine code exactly when these lists are equal."""
    sass = _compile(fn, signature, constexprs, num_warps, num_stages, arch, divisible)[2]
    return [_ADDR.sub("", ln).strip() for ln in _instruction_lines(sass)]


_SPILL = r"\b(?:LDL|STL)\b"     # SASS local loads / stores


def _matching(lines: list[str], pattern: str) -> int:
    """How many of the SASS ``lines`` match ``pattern``."""
    return sum(bool(re.search(pattern, ln)) for ln in lines)


_ADDR = re.compile(r"/\*[0-9a-f]{4,6}\*/")


def _instruction_lines(sass: str) -> list[str]:
    """The lines of ``cuobjdump -sass`` output that hold an instruction (each with its address)."""
    return [ln for ln in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,6}\*/\s+[A-Z@{]", ln)]


def _longest_loop(sass: str) -> list[str]:
    """The SASS lines of the longest loop body: from the target of a backward branch to the branch."""
    lines = _instruction_lines(sass)

    def addr(ln):
        return int(re.search(r"/\*([0-9a-f]{4,6})\*/", ln).group(1), 16)
    best = (0, -1)
    for ln in lines:
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", ln)
        if m and m.group(1) and int(m.group(1), 16) < addr(ln) and addr(ln) - int(m.group(1), 16) > best[1] - best[0]:
            best = (int(m.group(1), 16), addr(ln))
    return [ln for ln in lines if best[0] <= addr(ln) <= best[1]]


def decode_stack_resources(B: int = 1, d: int = 1024, H: int = 8, e: int = 128, g: int = 2816, nprog: int = 132,
                           lrpe: bool = False, dtype: str = "bf16", num_warps: int = 8, prefetch: bool = True,
                           aligned: bool = True, layers: int | None = None) -> Resources:
    """The persistent decode-stack kernel (``tnllm.ops.decode_layer.triton``) at a layer shape (default: the 385M
    preset's on an H200's 132 SMs), as its launcher would specialise it for a stack of ``layers`` (default: as the
    385M decoder launches them, 1 with LRPE, 23 without)."""
    import torch

    from tnllm.ops.decode_layer import triton as tri
    ptrs = {"X": dtype, "TAB": "i64", "POS": "i64", "QKVU": dtype, "YB": dtype, "SS": "fp32", "GB": dtype, "CNT": "i32",
            "TS": "i64"}
    sig = {k: "*" + v for k, v in ptrs.items()}
    sig.update(eps="fp32", NL="i32")
    from tnllm.testing import DTYPES
    _, kw = tri._launch_args(torch.empty(B, d, device="meta", dtype=DTYPES[dtype]), H, e, g, nprog)
    kw.update(ONE_LAYER=(layers or (1 if lrpe else 23)) == 1, LRPE=lrpe, ACT=tri.ACT_CODE["silu"], GACT=tri.ACT_CODE["none"],
              PREFETCH=prefetch, SPIN=0, ALIGNED=aligned, PROFILE=False, STAGE=0, SYNC=True)
    return resources(tri.decode_stack_kernel, sig, kw, num_warps=num_warps)


def _kernel(la, name: str, constexprs: dict, pointers: dict, divisible: tuple, num_warps: int,
            num_stages: int) -> dict:
    """The keyword arguments of ``resources`` / ``sass_instructions`` for the kernel ``name`` of the Lightning
    Attention module ``la`` (None: the installed one; another copy for bench/sass_diff.py): its non-pointer
    arguments i32, the constexprs it does not take left out (a flag another copy lacks)."""
    if la is None:
        from tnllm.ops.lightning_attn import triton as la
    fn = getattr(la, name)
    kw = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    sig = {n: "*" + pointers[n] if n in pointers else "i32" for n in fn.arg_names if n not in kw}
    return dict(fn=fn, signature=sig, constexprs=kw, num_warps=num_warps, num_stages=num_stages, divisible=divisible)


def _launcher_st(la, BA: int, even: bool) -> bool:
    """The transposed-state loop as the launcher of the module copy ``la`` picks it for BA tile rows and the even
    variant or not (a copy from before the choice depended on them, e.g. an older revision in bench/sass_diff.py,
    has a plain flag)."""
    pick = getattr(la, "_state_t", None)
    return la.STATE_T if pick is None else pick(BA, even)


def sweep_kernel(DA: int = 128, DC: int = 128, BC: int = 64, CHUNK: int = 64, num_warps: int = 4,
                 num_stages: int = 2, reverse: bool = False, dtype: str = "bf16", wt: bool = False,
                 kdec_c: bool | None = None, where0: bool | None = None, even: bool | None = None,
                 st: bool | None = None, nf: int = 0, prefix: bool = False, la=None) -> dict:
    """One Lightning Attention sweep kernel (``_la_sweep_kernel``) for a [DA, BC] state tile over CHUNK rows, as
    the launcher specialises it (the row strides multiples of 16), as keyword arguments of ``resources``. ``nf``: 0
    the unmasked loop of the default non-finite mode (with its flag), 1 its masked redo; ``prefix``: the split
    sweep's start from a prefix state. ``wt``: the variant that reads the split pre-pass's local states transposed
    (the backward's dk sweep). ``kdec_c``: the state update's decay on the C tile (None: as the launcher picks it,
    ``KDEC_ON_C`` where BC <= BA); ``where0``: the unmasked loop's scores masked by a where (None:
    ``UNMASKED_WHERE``); ``even``: the loop without masks that a length divisible by CHUNK can take (None: as
    ``EVEN_TILES`` picks it for a tile that is exactly the widths); ``st``: the loop on the transposed state (None:
    as the launcher picks it from ``STATE_T`` and the tile rows)."""
    if la is None:
        from tnllm.ops.lightning_attn import triton as la
    BA = la._pow2(DA)                   # the launcher's state tile rows
    kw = dict(DA=DA, DC=DC, BA=BA, BC=BC, CHUNK=CHUNK, REVERSE=reverse, E0=-1 if reverse else 0, HAS_S0=False,
              WRITE_SF=True, SF_SHIFT=reverse, IEEE=dtype == "fp32", NF=nf, WRITE_FLAG=nf == 0, REDO=nf == 1,
              VARLEN=False, WT=wt, PREFIX=prefix,
              KDEC_C=la.KDEC_ON_C and BC <= BA if kdec_c is None else kdec_c,
              WHERE0=la.UNMASKED_WHERE if where0 is None else where0,
              EVEN=la.EVEN_TILES and DA == BA and DC % BC == 0 if even is None else even)
    kw["ST"] = _launcher_st(la, BA, kw["EVEN"]) if st is None else st
    ptrs = dict(A=dtype, Bp=dtype, Cp=dtype, O=dtype, S0="fp32", SF="fp32", W="fp32", s_ptr="fp32", FL="i32",
                CU="fp32", ORD="fp32")
    return _kernel(la, "_la_sweep_kernel", kw, ptrs, tuple(f"s{x}_{y}" for x in "abco" for y in "bht"),
                   num_warps, num_stages)


def sweep_resources(**kw) -> Resources:
    """``resources`` of ``sweep_kernel(**kw)``."""
    return resources(**sweep_kernel(**kw))


def local_state_kernel(DA: int = 128, DC: int = 128, BC: int = 128, CHUNK: int = 64, num_warps: int = 8,
                       num_stages: int = 2, dtype: str = "bf16", diag: bool | None = None, la=None) -> dict:
    """The Lightning Attention split pre-pass (``_la_local_state_kernel``) for a [DA, BC] state tile, as the launcher
    specialises it; ``diag``: its decayed Bm^T as a product with diag(kdec) (None: ``DIAG_DECAY``)."""
    if la is None:
        from tnllm.ops.lightning_attn import triton as la
    kw = dict(DA=DA, DC=DC, BA=la._pow2(DA), BC=BC, CHUNK=CHUNK, REVERSE=False, IEEE=dtype == "fp32",
              DIAG=la.DIAG_DECAY if diag is None else diag)
    return _kernel(la, "_la_local_state_kernel", kw, dict(Bp=dtype, Cp=dtype, W="fp32", s_ptr="fp32"),
                   tuple(f"s{x}_{y}" for x in "bc" for y in "bht"), num_warps, num_stages)


def local_state_resources(**kw) -> Resources:
    """``resources`` of ``local_state_kernel(**kw)``."""
    return resources(**local_state_kernel(**kw))


def dkdv_kernel(D: int = 64, CHUNK: int = 64, num_warps: int = 4, num_stages: int = 2, even: bool = True,
                diag: bool | None = None, nf: int = 0, prefix: bool = False, la=None) -> dict:
    """The fused dk/dv sweep (``_la_dkdv_kernel``; ``nf`` 0 its unmasked loop, 1 its masked redo) at Dk = Dv = D in
    bf16, as the launcher specialises it; ``diag``: its decayed q^T as a product with diag(kdec) at even lengths
    (None: ``DIAG_DECAY``)."""
    if la is None:
        from tnllm.ops.lightning_attn import triton as la
    kw = dict(DKW=D, DVW=D, BK=la._pow2(D), BV=la._pow2(D), CHUNK=CHUNK, HAS_G0=False, IEEE=False, NF=nf,
              WRITE_FLAG=nf == 0, REDO=nf == 1, PREFIX=prefix, WHERE0=la.UNMASKED_WHERE, EVEN=even,
              DIAG=la.DIAG_DECAY if diag is None else diag)
    ptrs = dict(Q="bf16", K="bf16", V="bf16", DO="bf16", DK="bf16", DV="bf16", G0="fp32", SF="fp32", W="fp32",
                s_ptr="fp32", FL="i32")
    return _kernel(la, "_la_dkdv_kernel", kw, ptrs,
                   tuple(f"s{x}_{y}" for x in ("q", "k", "v", "d", "dk", "dv") for y in "bht"), num_warps, num_stages)


def dkdv_resources(**kw) -> Resources:
    """``resources`` of ``dkdv_kernel(**kw)``."""
    return resources(**dkdv_kernel(**kw))


def _print_attention() -> None:
    import triton
    print(f"Lightning Attention sweep kernel (forward direction), bf16, sm_90, triton {triton.__version__}:")
    for DA, BC, CHUNK, warps, stages in ((128, 64, 64, 4, 2), (128, 64, 64, 4, 1), (128, 64, 64, 8, 2),
                                         (128, 32, 64, 4, 2), (128, 64, 32, 4, 2), (128, 128, 32, 8, 2),
                                         (64, 64, 64, 4, 2), (64, 64, 32, 4, 2)):
        r = sweep_resources(DA=DA, DC=max(DA, BC), BC=BC, CHUNK=CHUNK, num_warps=warps, num_stages=stages)
        print(f"  state tile [{DA}, {BC}], CHUNK {CHUNK}, {warps} warps, {stages} stages: {r.regs} registers, "
              f"{r.stack} B stack, {r.spill_ops} spill loads/stores ({r.loop_spill_ops} in the chunk loop), "
              f"{r.shared // 1024} KiB shared, {r.loop_instructions} instructions per chunk and thread", flush=True)


def main(argv=None) -> None:
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kernel", nargs="?", default="decode", choices=("decode", "attention", "all"))
    a = p.parse_args(argv)
    if a.kernel in ("attention", "all"):
        _print_attention()
    if a.kernel == "attention":
        return
    import triton
    print(f"decode-stack kernel, 385M layer (d 1024, 8 heads of 128, g 2816), 132 programs, bf16, sm_90, "
          f"triton {triton.__version__}:")
    for B in (1, 2, 4):
        for lrpe in (False, True):
            for prefetch in (True, False):
                for aligned in ((True, False) if B == 1 else (True,)):
                    r = decode_stack_resources(B=B, lrpe=lrpe, prefetch=prefetch, aligned=aligned)
                    print(f"  rows={B} lrpe={lrpe!s:5} prefetch={prefetch!s:5} aligned={aligned!s:5}: {r.regs} "
                          f"registers, {r.stack} B stack, {r.spill_ops} spill loads/stores, {r.shared} B shared, "
                          f"{r.vector_loads} 128-bit global loads, {sum(r.loads.values())} global loads in all, "
                          + (f"{r.loop_instructions} instructions, {r.loop_barriers} CTA barriers and "
                             f"{r.loop_shared_ops} shared loads/stores per layer and thread" if not lrpe else
                             "one layer alone: its steps are not a loop"), flush=True)


if __name__ == "__main__":
    main()
