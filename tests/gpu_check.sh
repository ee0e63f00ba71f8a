#!/usr/bin/env bash
# The GPU check in one command: the CUDA code paths tested against the CPU, the paper preset's
# code path, the GPU benchmark with the projected hours of `bash run_all.sh paper`, and the
# quick study on CUDA. Every stage runs under a time limit, so one failure cannot eat the
# others' time; each writes its log into one folder, and OUT/summary.tsv records every stage's
# status (ok, failed (exit N), timeout, stopped as planned, skipped), seconds and command. It
# exits 1 when a stage failed or timed out (the study's planned stop is neither), else 0.
# Nothing is downloaded.
#
#   bash tests/gpu_check.sh              # one NVIDIA GPU: within 10 minutes (BUDGET 560 s)
#   DEVICE=cpu bash tests/gpu_check.sh   # its CPU form: the same stages, smaller (below)
#
# Stages on CUDA, with their limits in seconds. Beside the tests, in the background:
#   study    SEEDS="0 1 2" bash run_all.sh (the quick preset) into OUT/study, STUDY_JOBS
#            (default 6) jobs sharing the GPU, stopped as planned in time for the bench; it
#            resumes where it stopped when the check runs again (run_all.sh skips done steps)
#   smoke    bash run_all.sh paper --smoke into OUT/paper-smoke (150), SMOKE_JOBS (default 4)
#            jobs: its preset pins --device cpu, so it runs on the CPU; summary.tsv records the
#            device its training reported
# then, one after another:
#   tests    DEVICE=cuda bash tests/run.sh -m "not slow" (160): the suite's fast part, with
#            tests/test_device.py's comparisons on the GPU
#   device   DEVICE=cuda pytest tests/test_device.py -m slow (100): bf16 and compiled training
#            against float32 eager, torchrun, the paper preset's scripts with --device cuda
#   bench    python tests/bench.py --device cuda --device-only --compile skip (120), the GPU
#            to itself: images/s and the fraction of the dense bf16 peak of the PGD-7 training
#            step, alone and as JOBS_PER_GPU processes at once, the other stages' rates, the
#            projected hours of the paper preset
#   compile  the same with --compile only (60): the training step under torch.compile
#   attacks  python tests/bench.py --bf16-attacks --device cuda (140): PGD-7 and APGD computed
#            in float32, bf16 and TF32 at every radius of the paper grid, and each lower
#            precision's verdict against the 0.5-point bound (DESIGN.md, Precision)
#   memory   python tests/bench.py --memory --device cuda (100): each stage's peak memory at
#            the paper preset's shapes, and the weights' Fisher trace's per-example slope
# OUT/bench.md collects the bench's tables.
# CPU form (DEVICE=cpu; no BUDGET unless given), one stage after another: tests runs
# tests/test_device.py's fast tests only (the whole suite is `bash tests/run.sh`), device's
# tests skip (on the CPU they are other tests of the suite), bench runs its device code on
# a tiny model (--quick), compile is not tried, attacks and memory are skipped (on the CPU
# they are bench.py's own --bf16-attacks and --memory, minutes each), and the study is
# skipped (`SEEDS=0 bash run_all.sh` is its one-seed look).
#
# Environment: DEVICE (default cuda), OUT (default gpu_check, ignored by git), BUDGET (seconds
# for the whole check), STUDY_JOBS, SMOKE_JOBS, PYTHON (a Python with torch, torchvision,
# numpy and pytest; default the first of python3 and .venv/bin/python that has them),
# DATA_DIR (the study's, default ./data). Fashion-MNIST must be in ./data, where the tests read
# it, as its four IDX .gz files (e.g. `mkdir -p data/fashion-mnist && cp
# /usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/`), or installed as the Debian
# package dataset-fashion-mnist.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-gpu_check}
DATA_DIR=${DATA_DIR:-./data}
CUDA=0
[[ "$DEVICE" == cuda* ]] && CUDA=1
BUDGET=${BUDGET:-$( ((CUDA)) && echo 560 || echo 100000)}
DEADLINE=$((T0 + BUDGET))
die() { echo "gpu_check: $*" >&2; exit 2; }

PY=""
needs="import torch, torchvision, numpy, pytest"
for candidate in "${PYTHON:-}" python3 .venv/bin/python; do
  if [[ -n "$candidate" ]] && "$candidate" -c "$needs" &> /dev/null; then
    PY=$candidate
    break
  fi
done
[[ -n "$PY" ]] || die "no Python with torch, torchvision, numpy and pytest (tried ${PYTHON:-}" \
                      "python3 .venv/bin/python): set PYTHON to one; this check installs nothing"
export PYTHON=$PY  # tests/run.sh and run_all.sh use it as it is
why=$("$PY" -c "import torch, sys; torch.zeros(1, device=sys.argv[1])" "$DEVICE" 2>&1) ||
  die "DEVICE=$DEVICE cannot be used by $PY: $(tail -n 1 <<< "$why")"
for dir in ./data "$DATA_DIR"; do
  [[ "$("$PY" data.py present fashion-mnist --data-dir "$dir" 2> /dev/null)" == fashion-mnist ]] ||
    die "Fashion-MNIST not found in $dir: copy its four IDX .gz files into data/fashion-mnist/" \
        "(e.g. from /usr/share/datasets/fashion-mnist), or set DATA_DIR"
done

mkdir -p "$OUT"
SUMMARY=$OUT/summary.tsv
printf 'stage\tstatus\tseconds\tcommand\n' > "$SUMMARY"
{
  echo "started $(date -u +%FT%TZ); DEVICE=$DEVICE BUDGET=$BUDGET s; python $PY"
  echo "revision $(git rev-parse HEAD 2> /dev/null || echo unknown)" \
       "$(git status --porcelain 2> /dev/null | grep -q . && echo '(with local changes)')"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn',
torch.backends.cudnn.version(), 'devices', [torch.cuda.get_device_name(i) for i in
range(torch.cuda.device_count())], 'cpus', __import__('os').cpu_count())"
  command -v nvidia-smi > /dev/null && nvidia-smi
} > "$OUT/environment.txt" 2>&1

# stage NAME LIMIT command...: run command with a time limit of LIMIT seconds (less if the
# budget, minus the RESERVE kept for the bench, ends sooner; under 10 s left, skipped), output
# to OUT/NAME.log; one line in summary.tsv and on stdout with its status: ok, failed (exit N),
# timeout or skipped. PLANNED=1 stage ...: the limit is the plan (the study stops in time for
# the bench and resumes next time), so reaching it is "stopped as planned", not a timeout.
RESERVE=0
stage() {
  local name=$1 limit=$2 t=$SECONDS rc=0 ran="" status
  shift 2
  local left=$((DEADLINE - RESERVE - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    status="skipped (budget spent)"
  else
    ran=1
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    case $rc in
      0) status=ok ;;
      124 | 137) status="timeout (${limit} s)"
                 [[ -z "${PLANNED:-}" ]] || status="stopped as planned (${limit} s; resumes)" ;;
      *) status="failed (exit $rc)" ;;
    esac
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t))" "$*" >> "$SUMMARY"
  echo "[$((SECONDS - T0))s] $name: $status, $((SECONDS - t)) s${ran:+, log $OUT/$name.log}"
}

skip() {  # skip NAME REASON
  printf '%s\tskipped (%s)\t0\t\n' "$1" "$2" >> "$SUMMARY"
  echo "[$((SECONDS - T0))s] $1: skipped ($2)"
}

echo "[0s] gpu_check on $DEVICE into $OUT (budget $BUDGET s)"
smoke=(env OUT="$OUT/paper-smoke" bash run_all.sh paper --smoke)
bench=("$PY" tests/bench.py --device "$DEVICE" --device-only)
fast=(-q -p no:cacheprovider tests/test_device.py)
if ((CUDA)); then
  # The study (its jobs sharing the GPU) and the smoke (on the CPU: its preset pins --device
  # cpu) run beside the tests and stop in time for the bench, which has the GPU to itself.
  RESERVE=420  # the bench, compile, attacks and memory stages
  PLANNED=1 stage study $((BUDGET - RESERVE - 15)) env SEEDS="0 1 2" OUT="$OUT/study" \
    JOBS="${STUDY_JOBS:-6}" DATA_DIR="$DATA_DIR" bash run_all.sh quick &
  pids=($!)
  stage smoke 150 env JOBS="${SMOKE_JOBS:-4}" "${smoke[@]}" &
  pids+=($!)
  stage tests 160 env DEVICE="$DEVICE" WORKERS=4 bash tests/run.sh -m "not slow"
  stage device 100 env DEVICE="$DEVICE" "$PY" -m pytest "${fast[@]}" -m slow
  wait "${pids[@]}"
  RESERVE=0
  stage bench 120 "${bench[@]}" --compile skip
  stage compile 60 "${bench[@]}" --compile only
  stage attacks 140 "$PY" tests/bench.py --bf16-attacks --device "$DEVICE"
  stage memory 100 "$PY" tests/bench.py --memory --device "$DEVICE"
else
  stage tests 600 env DEVICE="$DEVICE" "$PY" -m pytest "${fast[@]}" -m "not slow"
  stage device 600 env DEVICE="$DEVICE" "$PY" -m pytest "${fast[@]}" -m slow
  stage smoke 600 "${smoke[@]}"
  skip study "CPU form"
  stage bench 600 "${bench[@]}" --quick
  skip attacks "CPU form: python tests/bench.py --bf16-attacks"
  skip memory "CPU form: python tests/bench.py --memory"
fi
# the device the smoke's training ran on, from advtrain.py's "train N test N on DEVICE" line
smoke_device=$(grep -rhoE "train [0-9]+ test [0-9]+ on [a-z0-9:]+" "$OUT/paper-smoke" 2> /dev/null |
               head -n 1 | awk '{print $NF}')
printf 'smoke device\t%s\t0\trun_all.sh paper --smoke trained on %s (its preset: --device cpu)\n' \
  "${smoke_device:-unknown}" "${smoke_device:-unknown}" >> "$SUMMARY"
cat "$OUT"/{bench,compile,attacks,memory}.log 2> /dev/null | grep '^|' > "$OUT/bench.md"

echo "[$((SECONDS - T0))s] gpu_check done: $SUMMARY"
column -t -s $'\t' "$SUMMARY" 2> /dev/null || cat "$SUMMARY"
bad=$(cut -f2 "$SUMMARY" | grep -cE '^(failed|timeout)')
exit $((bad > 0))
