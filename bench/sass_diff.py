"""Whether the Lightning Attention kernels' default paths compile to the same machine code as at another
revision (or another copy of ``ops/lightning_attn/triton.py``), on any machine with Triton's cuobjdump (no GPU).

    python bench/sass_diff.py --rev 2e72186              # against a git revision of ops/lightning_attn/triton.py
    python bench/sass_diff.py --file /path/to/triton.py  # against another copy

Each kernel (the sweep in both frames, at even and masked lengths, its unmasked loop and its redo; the fused dk/dv
sweep; the split pre-pass) is compiled for sm_90 in bf16 from both sources, with the constexprs the launchers pass
by default (a flag one source lacks is left out for it), and its SASS compared instruction by instruction
(addresses dropped). A change that should leave the default kernels alone (a new setting that is off, a
refactor) can be checked this way where no GPU is at hand: identical SASS runs as the GPU run at the other
revision did. Prints one line per kernel, "identical" or "DIFFER (n vs m instructions)"; exits 1 if any differ.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

_ADDR = re.compile(r"/\*[0-9a-f]{4,6}\*/")


def load_copy(path: str, name: str = "tnllm.ops.lightning_attn._sass_diff_other"):
    """Import another copy of ops/lightning_attn/triton.py as a module of the same package (relative imports)."""
    import tnllm.ops  # noqa: F401
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def sass(fn, constexprs: dict, pointers: dict, divisible: tuple, num_warps: int, num_stages: int = 2) -> list[str]:
    """The SASS instructions (addresses dropped) of the ``@triton.jit`` kernel ``fn`` for sm_90; constexprs that
    ``fn`` does not take are left out."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tnllm.testing.compiled import cuobjdump
    kw = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    sig = {n: pointers.get(n, "i32") for n in fn.arg_names if n not in kw}
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items()
             if v.startswith("*") or k in divisible}
    sig.update({k: "constexpr" for k in kw})
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=kw, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(c.asm["cubin"])
        out = subprocess.run([cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    return [_ADDR.sub("", ln).strip() for ln in out.splitlines() if re.search(r"/\*[0-9a-f]{4,6}\*/\s+[A-Z@{]", ln)]


def cases():
    """(label, kernel name, constexprs, pointer types, divisible strides, warps) for each default kernel."""
    bf = "*bf16"
    sweep_ptr = dict(A=bf, Bp=bf, Cp=bf, O=bf, S0="*fp32", SF="*fp32", W="*fp32", s_ptr="*fp32", FL="*i32",
                     CU="*fp32", ORD="*fp32")
    sweep_div = tuple(f"s{x}_{y}" for x in "abco" for y in "bht")
    for rev in (False, True):
        for even in (False, True):
            for nf, flag, redo in ((0, True, False), (1, False, True)):
                kw = dict(DA=128, DC=128, BA=128, BC=64, CHUNK=64, REVERSE=rev, E0=-1 if rev else 0, HAS_S0=False,
                          WRITE_SF=True, SF_SHIFT=rev, IEEE=False, NF=nf, WRITE_FLAG=flag, REDO=redo, VARLEN=False,
                          WT=False, PREFIX=True, KDEC_C=True, WHERE0=False, EVEN=even, ST=False)
                yield (f"sweep D128 {'reverse' if rev else 'forward'} {'even' if even else 'masked'} "
                       f"{'redo' if redo else 'unmasked'}", "_la_sweep_kernel", kw, sweep_ptr, sweep_div, 4)
    dk_ptr = {n: bf for n in ("Q", "K", "V", "DO", "DK", "DV")}
    dk_ptr.update(G0="*fp32", SF="*fp32", W="*fp32", s_ptr="*fp32", FL="*i32")
    dk_div = tuple(f"s{x}_{y}" for x in ("q", "k", "v", "d", "dk", "dv") for y in "bht")
    for even in (False, True):
        for nf, flag, redo in ((0, True, False), (1, False, True)):
            kw = dict(DKW=64, DVW=64, BK=64, BV=64, CHUNK=64, HAS_G0=False, IEEE=False, NF=nf, WRITE_FLAG=flag,
                      REDO=redo, PREFIX=True, WHERE0=False, EVEN=even, DIAG=False)
            yield (f"fused dk/dv D64 {'even' if even else 'masked'} {'redo' if redo else 'unmasked'}",
                   "_la_dkdv_kernel", kw, dk_ptr, dk_div, 4)
    kw = dict(DA=128, DC=128, BA=128, BC=128, CHUNK=64, REVERSE=False, IEEE=False, DIAG=False)
    yield ("split pre-pass [128, 128]", "_la_local_state_kernel", kw,
           dict(Bp=bf, Cp=bf, W="*fp32", s_ptr="*fp32"), tuple(f"s{x}_{y}" for x in "bc" for y in "bht"), 8)


def compare(other, only: int | None = None) -> list[tuple[str, bool, int, int]]:
    """(label, identical, instructions here, instructions in ``other``) for each case (the first ``only``)."""
    from tnllm.ops.lightning_attn import triton as here
    out = []
    for i, (label, name, kw, ptr, div, warps) in enumerate(cases()):
        if only is not None and i >= only:
            break
        a = sass(getattr(here, name), kw, ptr, div, warps)
        b = sass(getattr(other, name), kw, ptr, div, warps)
        out.append((label, a == b, len(a), len(b)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--rev", help="a git revision: its ops/lightning_attn/triton.py")
    src.add_argument("--file", help="another copy of ops/lightning_attn/triton.py")
    ap.add_argument("--only", type=int, default=None, help="compare the first N kernels only")
    a = ap.parse_args(argv)
    from tnllm.testing.compiled import cuobjdump
    if cuobjdump() is None:
        ap.error("Triton's NVIDIA backend has no cuobjdump here: cannot read SASS")
    with tempfile.TemporaryDirectory() as tmp:
        path = a.file
        if a.rev:
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            path = os.path.join(tmp, "triton_other.py")
            try:
                text = subprocess.run(["git", "show", f"{a.rev}:ops/lightning_attn/triton.py"], cwd=root,
                                      capture_output=True, text=True, check=True).stdout
            except subprocess.CalledProcessError as e:
                ap.error(f"--rev {a.rev!r}: git show failed: {e.stderr.strip()}")
            with open(path, "w") as f:
                f.write(text)
        if not os.path.isfile(path):
            ap.error(f"--file: no such file {path!r}")
        import triton
        print(f"triton {triton.__version__}, sm_90, bf16: this tree against {a.rev or a.file}", flush=True)
        rows = compare(load_copy(path), a.only)
    for label, same, n_here, n_other in rows:
        print(f"{label}: {'identical' if same else f'DIFFER ({n_here} vs {n_other} instructions)'}")
    return 0 if all(same for _, same, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
