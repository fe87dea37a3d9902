#!/usr/bin/env bash
# Issue 13 on a lent GPU, in one call of about 3.5 minutes on an H200: kdkit against TRL's
# DistillationTrainer (arithmetic and SmolLM2-size models, off- and on-policy, 2 alternating rounds)
# and the SmolLM2 step profile. SmolLM2 is built from its config.json with random weights.
#
#   KDKIT_CACHE=<folder with teachers/arithmetic-611e448ae332 and models/SmolLM2-135M-Instruct> \
#       bash benchmarks/gpu_issue13.sh "$OUT"          # results: $OUT/lm_policies, $OUT/step_profile
#
# DEVICE=cpu EXTRA=--quick bash benchmarks/gpu_issue13.sh /tmp/x   checks every code path on a CPU.
set -u
out=${1:?usage: gpu_issue13.sh OUT_DIR}
device=${DEVICE:-cuda}
python=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
started=$(date +%s)
# --budget-s: runs that would start later are skipped and recorded as skipped, never cut mid-way
timeout 190 "$python" benchmarks/lm_policies.py --device "$device" --random-weights --skip-policies \
    --throughput-models arithmetic smollm2 --budget-s 165 --out "$out/lm_policies" ${EXTRA:-} \
    2>&1 | grep --line-buffered -v -e "FutureWarning" -e "warnings.warn(" | tee "$out/lm_policies.log"
echo "lm_policies: $(( $(date +%s) - started )) s"
timeout 50 "$python" benchmarks/step_profile.py --device "$device" --random-weights \
    --out "$out/step_profile" ${EXTRA:-} 2>&1 | grep --line-buffered -v -e "FutureWarning" -e "warnings.warn(" \
    | tee "$out/step_profile.log"
echo "total: $(( $(date +%s) - started )) s"
