"""Decode benchmark (TNL against a Llama-style Transformer): a thin wrapper over ``tnllm bench decode``
(``tnllm/bench_decode.py``; the same arguments, the same files under ``--out``).

    python bench/decode.py --device cuda --preset 385M --out results/          # = tnllm bench decode ...
    python bench/decode.py --device cpu --preset tiny --contexts 16 40 --batch 1 2 --steps 2 --out /tmp/d
"""
import sys

from tnllm.bench_decode import main

if __name__ == "__main__":
    sys.exit(main())
