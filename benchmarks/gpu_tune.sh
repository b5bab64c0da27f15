#!/bin/bash
# The tuning experiment of issues 17 and 18: one call on a GPU machine, after gpu_check.sh on the same
# warm machine (its build is reused; a fresh machine builds first). Within T_TUNE seconds (default 420):
#   tune_kd_loss.py       block, warps, programs per SM, reversed sweeps of the kd_loss and topk_kd_loss
#                         row kernels at 16384 x 128256, next to the copy floor measured in the same run;
#   design_fused_linear_kd.py --sizes-only
#                         fused_linear_kd_loss's chunk and gradient-group sizes at BT 8192, H 4096,
#                         V 128256 (fwd+bwd time and peak memory; issue 18 item 2);
#   tune_attention_kd.py  block shapes of the attention kernels (the atomic-dq dk/dv kernel included)
#                         per head dim and N, ending with the winners as CONFIGS entries.
# Writes to $OUT (default ./gpu_out): tune.log and the three CSVs. The winners go into the kernels'
# constants by hand (see docs/development.md).
#   PYKD_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_tune.sh
# SMALL=1 shrinks the sizes (a dry run of the plumbing on a GPU machine).
set -u -o pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/tune.log"
T_TUNE=${T_TUNE:-420}
echo "=== $(date -u +%H:%M:%S) commit ${PYKD_COMMIT:-unknown}" | tee -a "$LOG"
if ! python3 -c "import pykd._C" 2>/dev/null; then
  python3 -m pip install -q --no-build-isolation --no-deps -e . >>"$LOG" 2>&1 || { tail -40 "$LOG"; exit 1; }
fi
end=$((SECONDS + T_TUNE))
step() {  # step SHARE_PERCENT LABEL CMD...: CMD gets SHARE% of the seconds left
  local share=$1 label=$2
  shift 2
  local t=$(((end - SECONDS) * share / 100))
  echo "--- $label (${t}s) $(date -u +%H:%M:%S)" | tee -a "$LOG"
  timeout "$t" "$@" 2>&1 | tee -a "$LOG" | grep -E "fastest|CONFIGS|^    \"|copy floor|_group|Error|needs" || true
  echo "--- $label: done at +${SECONDS}s" | tee -a "$LOG"
}
if [ "${SMALL:-0}" = 1 ]; then
  KD="--rows 256 --vocab 4096 --quick"; AT="--seq 512 --head-dims 64"
  FL="--rows 256 --hidden 256 --vocab 4096 --chunks 64 128 --groups 0 262144 --reps 2"
else
  KD=""; AT="--seq 2048 8192"; FL="--rows 8192"
fi
# shellcheck disable=SC2086  # the size options are word lists
{
  step 30 "tune_kd_loss" python3 benchmarks/tune_kd_loss.py $KD --out-dir "$OUT/results"
  step 20 "fused_linear_kd sizes" python3 benchmarks/design_fused_linear_kd.py $FL --sizes-only \
    --out-dir "$OUT/results"
  step 100 "tune_attention_kd" python3 benchmarks/tune_attention_kd.py $AT --out-dir "$OUT/results"
}
if [ -d "$OUT/results" ]; then
  find "$OUT/results" -type f -name '*.csv' -exec mv {} "$OUT"/ \;
  rm -rf "$OUT/results"
fi
ls -la "$OUT"
