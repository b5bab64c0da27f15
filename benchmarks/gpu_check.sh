#!/bin/bash
# The GPU check: one call on a GPU machine (an H200 with torch 2.11 + triton 3.6, no network), at most
# ~6 minutes wall. Builds pykd, runs the GPU test selection (every Triton kernel variant at least once
# at real tile sizes, each op's reference tests on CUDA, opcheck and torch.compile, the Hugging Face
# equality tests), then the headline benchmarks against their peers and the floors measured in the
# same run. A failing stage does not stop the next; each prints a timestamp.
#
# Writes to $OUT (default ./gpu_out), at most 8 files and no subfolders:
#   tests.log, bench.log, summary.md (pykd against every peer and floor, as ratios),
#   results.tgz (the CSVs and PNGs, for benchmarks/results/<device>/).
# Usage (the device tool; carry ".whl" for Liger-Kernel and SageAttention, see benchmarks/peers.sh):
#   PYKD_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh
# SMALL=1 shrinks every size (a dry run of the plumbing on any machine, CPU included).
set -u -o pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RES="$OUT/results"  # CSVs and PNGs, packed into results.tgz at the end
mkdir -p "$RES"
export PYKD_PARTIAL_DIR="$RES"  # a benchmark stopped by its time limit keeps its rows (*.partial.csv)
SMALL=${SMALL:-0}
T_TESTS=${T_TESTS:-180}  # seconds for the whole test selection
T_BENCH=${T_BENCH:-200}  # seconds for all benchmarks
stage() { echo "=== $(date -u +%H:%M:%S) +${SECONDS}s $*" | tee -a "$OUT/bench.log"; }
budgeted() {  # budgeted LOG END SHARE_PERCENT LABEL CMD...: CMD gets SHARE% of the seconds left to END
  local log=$1 end=$2 share=$3 label=$4
  shift 4
  local left=$((end - SECONDS))
  [ "$left" -le 5 ] && { echo "--- $label: no time left" | tee -a "$log"; return; }
  local t=$((left * share / 100))
  echo "--- $label (${t}s) $(date -u +%H:%M:%S)" | tee -a "$log"
  timeout "$t" "$@" >>"$log" 2>&1
  echo "--- $label: exit $? at +${SECONDS}s" | tee -a "$log"
}

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$OUT/bench.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/bench.log"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .whl/*.whl \
    && export PYTHONPATH=/tmp/peers${PYTHONPATH:+:$PYTHONPATH} && echo "peers: $(ls .whl)" | tee -a "$OUT/bench.log"
else
  echo "peers: none carried (.whl/ is empty): liger_* and sage are skipped" | tee -a "$OUT/bench.log"
fi

stage "build"
if ! python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.txt" 2>&1; then
  tail -40 "$OUT/build.txt" | tee -a "$OUT/bench.log"
  echo "build failed: nothing else can run" | tee "$OUT/summary.md"
  exit 1
fi
rm -f "$OUT/build.txt"
python3 -m pykd info | tee -a "$OUT/bench.log"

stage "tests (budget ${T_TESTS}s)"
t_end=$((SECONDS + T_TESTS))
run_tests() {  # run_tests LABEL SHARE_PERCENT PYTEST_ARGS...
  local label=$1 share=$2
  shift 2
  budgeted "$OUT/tests.log" "$t_end" "$share" "$label" python3 -m pytest -q -p no:cacheprovider -rfE \
    --durations=10 "$@"
  tail -3 "$OUT/tests.log" | grep -E "passed|failed|error" | tail -1
}
# every Triton kernel variant at real tile sizes (the gpu-marked tests, the atomic-dq backward
# included), then each op on the CUDA backend against the reference, opcheck and compile (not again
# with atomic dq: each variant would compile anew), then Hugging Face equality
run_tests "gpu-marked" 40 -m gpu tests/
run_tests "reference, opcheck, compile on CUDA" 70 tests/ -m "not gpu" \
  -k "triton and not atomic_dq and (matches_reference or opcheck or compile_fullgraph or compile_triton or test_nan or half or low_precision or poison)"
run_tests "Hugging Face equality" 100 tests/test_transformers.py -k "sdpa or eager_maps or set_attention_spec"

stage "benchmarks (budget ${T_BENCH}s)"
b_end=$((SECONDS + T_BENCH))
bench() {  # bench SHARE_PERCENT SCRIPT ARGS...
  local share=$1 script=$2
  shift 2
  budgeted "$OUT/bench.log" "$b_end" "$share" "$script $*" python3 "benchmarks/$script" --out-dir "$RES" "$@"
}
if [ "$SMALL" = 1 ]; then
  KD="--rows 64 --vocab 512 --reps 2"; FL="--rows 64 --hidden 64 --vocab 512 --reps 2"
  AT="--seq 256 --reps 2"; BERT="--batch 2 --heads 2 --seq 128 --reps 2"; SQ="--seq 256 --reps 2"
else
  KD="--rows 4096 16384"; FL="--rows 4096 8192"; AT="--seq 4096 16384"
  BERT="--batch 32 --heads 12 --seq 128 512"; SQ="--seq 4096 16384 --head-dim 128"
fi
# shellcheck disable=SC2086  # the size options are word lists
{
  bench 8 bench_host_overhead.py --quick  # launch-bound time of every op next to SDPA (issue 17)
  bench 20 bench_kd_loss.py $KD --providers pykd eager compile liger_kl liger_jsd copy_floor
  bench 25 bench_fused_linear_kd.py $FL --providers pykd eager liger gemm_floor
  bench 30 bench_attention_kd.py $AT --head-dims 64 128 --providers pykd pykd_atomic_dq pykd_tma eager sdpa sdpa_chunked
  bench 30 bench_attention_kd.py $BERT --head-dims 64 --tag bert --providers pykd pykd_atomic_dq pykd_tma eager sdpa \
    sdpa_chunked
  bench 100 bench_sparse_quant.py $SQ --providers dense sparse quant quant_qk sdpa flex sage
}

stage "summary"
find "$RES" -mindepth 2 -type f \( -name '*.csv' -o -name '*.png' \) -exec mv {} "$RES"/ \;
find "$RES" -mindepth 1 -type d -empty -delete
python3 benchmarks/summarize.py --summary "$RES" \
  --header "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), commit ${PYKD_COMMIT:-unknown}, $(date -u +%Y-%m-%d); $(python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')"
mv "$RES/summary.md" "$OUT/summary.md"
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40 >>"$OUT/summary.md"
tar czf "$OUT/results.tgz" -C "$RES" . && rm -rf "$RES"
stage "done"
ls -la "$OUT"
