#!/bin/bash
# One call on a GPU machine: build pykd, run the given tests, then the given benchmarks; logs and
# results land under $OUT (or ./gpu_out). Usage:
#   PYKD_COMMIT=<sha> bash benchmarks/gpu_run.sh "<pytest args>" "<bench command>;<bench command>"
# Peers the machine can't download (it has no network) come as wheels in ./wheels (git-ignored): on
# the dev machine `pip download liger-kernel --no-deps -d wheels`, then carry "wheels".
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "built in ${SECONDS}s"
if compgen -G "wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-deps wheels/*.whl && echo "installed: $(ls wheels)"
fi
if [ -n "$1" ]; then
  eval "timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider $1" 2>&1 | tee "$OUT/tests.log" | tail -25
  echo "tests done at ${SECONDS}s"
fi
IFS=';' read -ra BENCH <<<"$2"
for b in "${BENCH[@]}"; do
  [ -z "$b" ] && continue
  echo "== $b"
  eval "timeout ${BENCH_TIMEOUT:-400} python3 $b --out-dir $OUT" 2>&1 | tee -a "$OUT/bench.log" | grep -v '^  ' | tail -5
  echo "bench done at ${SECONDS}s"
done
# bring results up to two folders down
find "$OUT" -mindepth 2 -type f \( -name '*.csv' -o -name '*.png' \) -exec mv {} "$OUT"/ \;
