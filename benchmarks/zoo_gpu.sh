#!/usr/bin/env bash
# Train the offline Fashion-MNIST zoo (src/distillpp/zoo) on one GPU in about 8 minutes wall-clock.
#
#   benchmarks/zoo_gpu.sh MODELS_DIR LOGS_DIR [BUNDLE_DIR]
#
# Stage 1, three processes at once: teacher, flow-teacher, classifier      (ZOO_STAGE1_MINUTES, default 3.75;
#                                   the classifier also stops at ZOO_CLASSIFIER_STEPS, default 6000)
# Stage 2, three processes at once: lcm, pd (from MODELS_DIR/teacher),
#                                   flow-student (from MODELS_DIR/flow-teacher) (ZOO_STAGE2_MINUTES, default 3)
# Then `python -m distillpp.zoo.check`: classifier test accuracy, and per model the class accuracy
# and a classifier-feature Frechet distance of 1000 samples (ZOO_CHECK_ARGS appended).
#
# ZOO_MODELS (default: all six) limits the run to the models it names, e.g. ZOO_MODELS="lcm pd" retrains
# the two VP students from the teacher already in MODELS_DIR (copy the shipped models there first).
#
# Budgets count from each process's start and every process saves as it goes, so a stage never
# overruns by more than a final save; a hard `timeout` backs that up. Each process logs to
# LOGS_DIR/<name>.log and a failure in one does not stop the others (stage-2 students of a failed
# teacher fail on their own). Exit status: the number of failed steps (0 = all fine).
#
# Needs python3 with torch and diffusers and this repo's src on PYTHONPATH (or distillpp installed),
# and Fashion-MNIST in $DISTILLPP_FASHION_MNIST (default: .data/fashion-mnist when present).
# ZOO_TRAIN_ARGS is appended to every training command, ZOO_ARGS_<NAME> to one (e.g.
# ZOO_ARGS_TEACHER="--prediction-type v_prediction", ZOO_ARGS_PD="--batch-size 256"); a CPU dry run:
#   ZOO_TRAIN_ARGS="--tiny --device cpu" ZOO_CLASSIFIER_STEPS=2 ZOO_STAGE1_MINUTES=1 ZOO_STAGE2_MINUTES=1 \
#   ZOO_CHECK_ARGS="--device cpu --samples 20 --steps 2" benchmarks/zoo_gpu.sh /tmp/zoo/models /tmp/zoo/logs
#
# With BUNDLE_DIR, also writes there (each file under 16 MiB): zoo-models-1.tar.gz (teacher,
# flow-teacher, classifier), zoo-models-2.tar.gz (lcm, pd, flow-student), zoo-logs.tar.gz and
# zoo-samples.png. Unpack into the package with: tar xzf zoo-models-N.tar.gz -C src/distillpp/zoo/models
set -u

if [ $# -lt 2 ]; then
  echo "usage: $0 MODELS_DIR LOGS_DIR [BUNDLE_DIR]" >&2
  exit 2
fi
models=$1
logs=$2
bundle=${3:-}
py=${PYTHON:-python3}
stage1=${ZOO_STAGE1_MINUTES:-3.75}
stage2=${ZOO_STAGE2_MINUTES:-3}
train_args=${ZOO_TRAIN_ARGS:-}
check_args=${ZOO_CHECK_ARGS:-}
if [ -z "${DISTILLPP_FASHION_MNIST:-}" ] && [ -d .data/fashion-mnist ]; then
  export DISTILLPP_FASHION_MNIST=.data/fashion-mnist
fi
export PYTHONUNBUFFERED=1
mkdir -p "$models" "$logs" || exit 2
[ -n "$bundle" ] && { mkdir -p "$bundle" || exit 2; }

t0=$(date +%s)
say() { echo "[zoo_gpu $(( $(date +%s) - t0 ))s] $*"; }
declare -A pid=()
failed=0

only=" ${ZOO_MODELS:-teacher flow-teacher classifier lcm pd flow-student} "
wanted() { [[ "$only" == *" $1 "* ]]; }

# start WHAT MINUTES [extra args]: one training process in the background (if ZOO_MODELS names it).
start() {
  local what=$1 minutes=$2
  shift 2
  wanted "$what" || { say "skipping $what (not in ZOO_MODELS)"; return 0; }
  local hard own_var own_args
  hard=$(awk -v m="$minutes" 'BEGIN { printf "%d", m * 60 + 90 }')
  own_var="ZOO_ARGS_$(echo "$what" | tr 'a-z-' 'A-Z_')"  # e.g. ZOO_ARGS_FLOW_STUDENT
  own_args=${!own_var:-}
  # shellcheck disable=SC2086  # the *_args are lists of words
  timeout -k 20 "$hard" "$py" -m distillpp.zoo.train "$what" --out "$models" --minutes "$minutes" \
    $train_args "$@" $own_args >"$logs/$what.log" 2>&1 &
  pid[$what]=$!
  say "started $what (pid ${pid[$what]}, ${minutes} min${own_args:+, $own_args}) -> $logs/$what.log"
}

# finish WHAT...: wait for each, report, count failures.
finish() {
  local what rc
  for what in "$@"; do
    wanted "$what" || continue
    wait "${pid[$what]}"
    rc=$?
    if [ "$rc" -eq 0 ]; then
      say "$what done: $(grep -E 'step [0-9]+ loss' "$logs/$what.log" | tail -n 1)"
    else
      failed=$((failed + 1))
      say "$what FAILED (exit $rc); last lines of $logs/$what.log:"
      tail -n 15 "$logs/$what.log" | sed 's/^/    /'
    fi
  done
}

gpu_snapshot() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    (sleep "$1"; nvidia-smi --query-gpu=name,utilization.gpu,memory.used,memory.total --format=csv) \
      >>"$logs/gpu.log" 2>&1 &
  fi
}

say "python: $($py -c 'import sys, torch, diffusers; print(sys.version.split()[0], "torch", torch.__version__, "diffusers", diffusers.__version__, "cuda", torch.cuda.is_available())' 2>&1)"
say "data: ${DISTILLPP_FASHION_MNIST:-default}; models -> $models; logs -> $logs"

say "stage 1: teacher, flow-teacher, classifier (${stage1} min each, concurrently)"
start teacher "$stage1"
start flow-teacher "$stage1"
start classifier "$stage1" --max-steps "${ZOO_CLASSIFIER_STEPS:-6000}"  # ~50 epochs, then the GPU is the teachers'
gpu_snapshot 90
finish teacher flow-teacher classifier

say "stage 2: lcm, pd, flow-student (${stage2} min each, concurrently)"
start lcm "$stage2"
start pd "$stage2"
start flow-student "$stage2"
gpu_snapshot 60
finish lcm pd flow-student

say "check: classifier accuracy and sample quality"
png_args=()
[ -n "$bundle" ] && png_args=(--png "$bundle/zoo-samples.png")
# shellcheck disable=SC2086
"$py" -m distillpp.zoo.check "$models" --cfg-sweep 1,1.5,3,4 "${png_args[@]}" $check_args 2>&1 | tee "$logs/check.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=$((failed + 1))
[ -f "$logs/gpu.log" ] && { say "GPU snapshots:"; sed 's/^/    /' "$logs/gpu.log"; }

if [ -n "$bundle" ]; then
  one=() two=()
  for m in teacher flow-teacher classifier; do [ -d "$models/$m" ] && one+=("$m"); done
  for m in lcm pd flow-student; do [ -d "$models/$m" ] && two+=("$m"); done
  [ ${#one[@]} -gt 0 ] && tar czf "$bundle/zoo-models-1.tar.gz" -C "$models" "${one[@]}"
  [ ${#two[@]} -gt 0 ] && tar czf "$bundle/zoo-models-2.tar.gz" -C "$models" "${two[@]}"
  tar czf "$bundle/zoo-logs.tar.gz" -C "$logs" .
  say "bundle: $(cd "$bundle" && ls -l | awk 'NR > 1 { printf "%s (%d KiB) ", $NF, $5 / 1024 }')"
fi

say "total $(( $(date +%s) - t0 ))s, $failed failed step(s)"
du -sh "$models"/* 2>/dev/null | sed 's/^/    /'
exit "$failed"
