#!/usr/bin/env bash
# kdkit's GPU checks and benchmarks in one short run (CI has no GPU; this is what a lent GPU runs).
#
#   bash benchmarks/gpu_suite.sh OUT_DIR [PART ...]     # parts: env tests sampling loss
#                                                      #        policies profile e2e suite (default: all)
#
# Each part runs under its own time limit; one failing part never stops the others. Logs and
# result JSON go to a work folder that is packed into OUT_DIR/results.tar.gz after every part, so a
# run cut short still returns what it finished. Environment: a machine without a network, its own
# Python with torch (CUDA); Python packages it lacks can travel as wheels in .whl/ (installed into
# /tmp/site; WHEELS names another folder), and KDKIT_CACHE defaults to .devcache/ (the cached arithmetic teacher and the
# SmolLM2-135M config + tokenizer, no weights: SmolLM2-size runs there use random weights).
set -u
OUT_DIR=${1:?usage: gpu_suite.sh OUT_DIR [PART ...]}
shift
PARTS=${*:-env tests sampling loss policies profile e2e suite}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
WORK=${WORK:-/tmp/kdkit_gpu}
WHEELS=${WHEELS:-$ROOT/.whl}
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT_DIR"
if [ ! -d /tmp/site ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl >"$WORK/wheels.log" 2>&1 || echo "wheel install failed (see wheels.log)"
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site
export PYTHONPATH="$ROOT/src:$ROOT:${PYTHONPATH:-}"
export KDKIT_CACHE=${KDKIT_CACHE:-$ROOT/.devcache}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MPLBACKEND=Agg
START=$(date +%s)

pack() { tar -czf "$OUT_DIR/${PACK:-results}.tar.gz" -C "$WORK" . 2>/dev/null; }
part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name: start at +$(($(date +%s) - START)) s (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc at +$(($(date +%s) - START)) s"
  tail -n 8 "$WORK/$name.log" | cut -c1-300
  pack
}

part env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv;
  python3 -c "import sys, torch, transformers, accelerate, pydantic; print(sys.version.split()[0], torch.__version__,
  torch.version.cuda, transformers.__version__, accelerate.__version__, pydantic.__version__, torch.cuda.get_device_name(0))";
  python3 -c "import trl, datasets; print(\"trl\", trl.__version__, \"datasets\", datasets.__version__)"'
# kdkit's tests that name a CUDA case (parametrised over devices; skipped on CPU-only machines)
part tests 80 python3 -m pytest -q -p no:cacheprovider -k cuda -rs tests/lm tests/losses tests/engine tests/methods tests/signals
part sampling 70 python3 benchmarks/sampling.py --device cuda --out "$WORK/sampling"
part loss 100 python3 benchmarks/loss_memory.py --device cuda --budget-s 80 --out "$WORK/loss"
# kdkit against TRL's DistillationTrainer, arithmetic and SmolLM2-size (random weights), off- and
# on-policy, alternating rounds; runs that would start after --budget-s are recorded as skipped
part policies 175 python3 benchmarks/lm_policies.py --device cuda --random-weights --skip-policies \
  --throughput-models arithmetic smollm2 --budget-s 150 --out "$WORK/policies"
part profile 55 python3 benchmarks/step_profile.py --device cuda --random-weights --out "$WORK/profile"
# a real run end to end on the GPU (accelerate picks CUDA; bf16 autocast): two students, a report
part e2e 60 python3 -m kdkit.cli run recipes/arithmetic-policies.yaml \
  train.steps=30 train.mixed_precision=bf16 eval.exact_match_problems=64 \
  'students=[{name: offpolicy_fkl, method: supervised_kd}, {name: onpolicy_jsd, method: gkd, lmbda: 1.0, max_new_tokens: 48}]' \
  --output-dir "$WORK/e2e"
# the whole suite with a GPU present (engine paths pick CUDA): differences from CI show here
# (-v: one line per finished test, so a run cut at its limit still says what failed)
part suite 240 python3 -m pytest -v -p no:cacheprovider -n 12 --maxfail=25 -m "not slow" tests
echo "== done in $(($(date +%s) - START)) s"
pack
