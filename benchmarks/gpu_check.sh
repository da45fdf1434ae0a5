#!/usr/bin/env bash
# The GPU checks of release fidelity in one run (under 8 minutes on one H200): parity fixtures on CUDA in float32
# and bfloat16, a 3,500-token bf16 input vs float32, gpu_encode.py (full 8.2B shape, batch 1/8/32) and the
# reranker's cached-vs-naive equality and speed on CUDA. Writes benchmarks/results/gpu_check.json (into $OUT too
# when set, as on the device machine). Needs python3 with torch (CUDA), transformers, accelerate, safetensors,
# tokenizers, pillow, numpy and tqdm; the repository itself is put on PYTHONPATH. Wheels in .whl/ (made here by
# benchmarks/gpu_wheels.sh, carried to the GPU machine) are installed first, into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
if [ -d .whl ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
results=benchmarks/results
mkdir -p "$results"
status=0
"$py" benchmarks/gpu_check.py --out "$results/gpu_check.json" || status=$?
if [ -n "${OUT:-}" ]; then cp "$results/gpu_check.json" "$OUT/"; fi
exit "$status"
