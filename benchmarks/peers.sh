#!/bin/bash
# Downloads the peers' wheels for the GPU machine (Python 3.12, manylinux x86_64; it has no network)
# into the git-ignored .whl/. Run it where the package index is reachable, then carry ".whl" in the
# device call; benchmarks/gpu_check.sh installs them into a --target folder on PYTHONPATH.
#   liger-kernel: LigerKLDIVLoss, LigerJSD, LigerFusedLinearJSDLoss (Triton, pure Python)
#   sageattention 1.x: sageattn (Triton-based; 2.x needs a CUDA build)
# Their own needs (torch, triton) are on the GPU machine already.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
rm -f .whl/*.whl  # one version of each: two would stop the install there
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl liger-kernel "sageattention<2"
ls -la .whl
