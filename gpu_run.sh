#!/usr/bin/env bash
# ad-hoc GPU session script (not committed)
set -u
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) HYPOTHESIS_PROFILE=ci
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
run() { local name=$1 secs=$2; shift 2; local t0=$(date +%s)
  timeout "$secs" "$@" > "$OUT/$name.txt" 2>&1; echo "### rc=$? wall=$(( $(date +%s) - t0 ))s" >> "$OUT/$name.txt"; }
run install 120 python3 -m pip install --no-deps --no-build-isolation --no-index -e .
for s in "$@"; do
  case $s in
    ltests) run ltests 300 python3 -m pytest -q -x -m gpu tests/gpu/test_decode_layer_gpu.py ;;
    dtests) run dtests 200 python3 -m pytest -q -m gpu tests/gpu/test_decode_paths_gpu.py tests/gpu/test_gla_decode_gpu.py ;;
    d385) run d385 200 python3 -m tnllm bench decode --device cuda --preset 385M --batch 1 2 4 --contexts 1024 131072 \
        --paths graph:fused graph:layer compiled+graph:layer --no-baseline --budget 150 --out "$OUT/d385" ;;
    d1) run d1 100 python3 -m tnllm bench decode --device cuda --preset 385M --batch 1 --contexts 1024 131072 \
        --paths graph:fused graph:layer compiled+graph:layer --no-baseline --budget 70 --out "$OUT/d1" ;;
    dbig) run dbig 150 python3 -m tnllm bench decode --device cuda --preset 1B 7B --batch 1 --contexts 1024 \
        --paths graph:fused graph:layer --no-baseline --budget 120 --out "$OUT/dbig" ;;
    lsweep) run lsweep 200 python3 bench/decode_layer.py --profile --batch 1 2 4 --out "$OUT/lsweep" ;;
    suite) run suite ${SUITE_S:-420} python3 -m pytest -q -n auto --durations=25 ;;
    *) echo "unknown $s" > "$OUT/unknown_$s.txt" ;;
  esac
done
