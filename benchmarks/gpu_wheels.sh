#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels of the pinned versions (constraints.txt) of the libraries whose
# versions on the GPU machine differ from ours (its image has transformers 5.17, which lacks the `cache` API the
# reranker uses). Run here, where PyPI is reachable; gpu_check.sh installs them there. Python 3.12, x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
for name in transformers huggingface_hub tokenizers; do
  pin=$(grep -i "^${name}==" constraints.txt)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pin"
done
ls .whl
