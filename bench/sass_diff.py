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
import subprocess
import sys
import tempfile


def load_copy(path: str, name: str = "tnllm.ops.lightning_attn._sass_diff_other"):
    """Import another copy of ops/lightning_attn/triton.py as a module of the same package (relative imports)."""
    import tnllm.ops  # noqa: F401
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def cases():
    """(label, builder, keyword arguments) for each default kernel: a ``tnllm.testing.compiled`` kernel builder
    that takes the module to compile from as ``la``."""
    from tnllm.testing import compiled
    for rev in (False, True):
        for even in (False, True):
            for nf in (0, 1):
                yield (f"sweep D128 {'reverse' if rev else 'forward'} {'even' if even else 'masked'} "
                       f"{'redo' if nf else 'unmasked'}", compiled.sweep_kernel,
                       dict(reverse=rev, even=even, nf=nf, prefix=True, kdec_c=True, where0=False, st=False))
    for even in (False, True):
        for nf in (0, 1):
            yield (f"fused dk/dv D64 {'even' if even else 'masked'} {'redo' if nf else 'unmasked'}",
                   compiled.dkdv_kernel, dict(even=even, nf=nf, prefix=True, diag=False))
    yield "split pre-pass [128, 128]", compiled.local_state_kernel, dict(diag=False)


def compare(other, only: int | None = None) -> list[tuple[str, bool, int, int]]:
    """(label, identical, instructions here, instructions in ``other``) for each case (the first ``only``)."""
    from tnllm.ops.lightning_attn import triton as here
    from tnllm.testing.compiled import sass_instructions
    out = []
    for i, (label, build, kw) in enumerate(cases()):
        if only is not None and i >= only:
            break
        a = sass_instructions(**build(la=here, **kw))
        b = sass_instructions(**build(la=other, **kw))
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
