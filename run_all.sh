#!/usr/bin/env bash
# The whole study end to end: train the eps grid, then Fisher, transfer and inversion on
# every checkpoint, then the report.
#
#   bash run_all.sh                 # preset quick: CPU, Fashion-MNIST 0-4 -> 5-9, 3 seeds
#   SEEDS=0 bash run_all.sh         # one seed: a look at the numbers, no verdicts (needs 3)
#   bash run_all.sh paper           # CIFAR-10, resnet18, L2 and Linf grids (GPU, internet)
#   bash run_all.sh paper --smoke   # the paper code path on tiny synthetic CIFAR-shaped data
#
# Environment: SEEDS (default "0 1 2"), JOBS and THREADS (below), FORCE=1 (redo every
# step), OUT (default results/<preset>[-smoke]), PYTHON (default python3; without torch a
# .venv is made, see setup_python.sh), DATA_DIR (default ./data).
# A step is skipped when its output exists and was made by the same command (recorded in a
# hidden .<output>.cmd file beside it, with the command of the training it depends on); a
# changed setting redoes exactly the steps it affects. Training resumes from its last epoch,
# so a killed study started again finishes; every output is written atomically.
set -euo pipefail
cd "$(dirname "$0")"

PRESET=${1:-quick}
SMOKE=${2:-}
SEEDS=${SEEDS:-0 1 2}
FORCE=${FORCE:-0}
source setup_python.sh torch torchvision numpy  # sets PY: $PYTHON if it has them, else .venv
DATA=(--data-dir "${DATA_DIR:-./data}")
T0=$SECONDS

case "$PRESET" in
  quick)
    GRID=("l2 0" "l2 0.25" "l2 0.5" "l2 1.0" "l2 2.0")
    # every model is attacked at the reference radii of the preset (report.py decides C1 at L2 0.5)
    TRAIN=(--dataset fashion-mnist --classes 0-4 --arch cnn --train-size 10000 --test-size 1000
           --epochs 4 --steps 3 --eval-eps l2:0.5 l2:1.0 --eval-steps 20)
    JUDGE=(--norm l2 --eps 0.5)
    TARGETS=(--target fashion-mnist:5-9)
    FISHER=(--n 512)
    # test images 64-95: the inversion defaults were chosen on images 0-63 (invert.py, TUNED_ON)
    INVERT=(--start 64 --n-images 32 --method baseline,tv,noise,noise-tv)
    ;;
  paper)
    GRID=("l2 0" "l2 0.25" "l2 0.5" "l2 1.0" "linf 2/255" "linf 4/255" "linf 8/255")
    TRAIN=(--dataset cifar10 --arch resnet18 --epochs 30 --steps 7 --batch-size 128 --lr 0.1
           --augment --eval-eps l2:0.5 linf:8/255 --eval-attack apgd --eval-steps 100 --eval-restarts 1)
    JUDGE=(--norm l2 --eps 0.5)
    TARGETS=(--target cifar100 --target svhn --target fashion-mnist --target mnist)
    FISHER=(--n 512)
    INVERT=(--start 0 --n-images 32 --method baseline,tv,noise,noise-tv)
    if [[ "$SMOKE" == "--smoke" ]]; then  # same code path, tiny synthetic data, CPU
      GRID=("l2 0" "l2 0.5" "linf 8/255")
      TRAIN=(--dataset synthetic --arch resnet18 --width 8 --train-size 64 --test-size 32 --epochs 1
             --steps 1 --batch-size 32 --augment --eval-eps l2:0.5 linf:8/255 --eval-attack apgd --eval-steps 2
             --device cpu)
      TARGETS=(--target synthetic:0-4 --target fashion-mnist:5-9 --train-size 64 --test-size 32)
      FISHER=(--n 4 --chunk 4 --power-iters 5 --device cpu)
      INVERT=(--n-images 4 --steps 5 --method baseline,tv,noise,noise-tv --device cpu)
    fi
    ;;
  *) echo "error: unknown preset '$PRESET' (quick or paper)" >&2; exit 2 ;;
esac
OUT=${OUT:-results/$PRESET${SMOKE:+-smoke}}
mkdir -p "$OUT"
# Independent cells run concurrently: JOBS at once (default: one per GPU, else one per CPU
# core), each with THREADS torch threads (default 1). Outputs depend on THREADS (the order of
# float sums), never on JOBS: JOBS=1 and JOBS=4 give identical files.
GPU_LIST=()
if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L > /dev/null 2>&1; then
  IFS=, read -ra GPU_LIST <<< "${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $(($(nvidia-smi -L | grep -c '^GPU') - 1)))}"
fi
if (( ${#GPU_LIST[@]} > 0 )); then JOBS=${JOBS:-${#GPU_LIST[@]}}; else JOBS=${JOBS:-$(nproc 2> /dev/null || echo 1)}; fi
THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

# step OUTPUT LOG UPSTREAM command...: run the command unless OUTPUT exists and was made by
# the same command after the same upstream steps (UPSTREAM: their commands, or "" for none;
# the interpreter's path is not part of a command). One line with the cell, the step and the
# elapsed time; on failure, the step's last lines and a non-zero exit.
step() {
  local output=$1 log=$2 upstream=$3; shift 3
  local stamp cell name t cmd="${*:2}"
  stamp="$(dirname "$output")/.$(basename "$output").cmd"
  cell=$(basename "$(dirname "$output")") name=$(basename "$output")
  [[ -n "$upstream" ]] && cmd+=$'\n'"after: $upstream"
  if [[ -f "$output" && "$FORCE" != 1 && -f "$stamp" && "$(cat "$stamp")" == "$cmd" ]]; then
    echo "[$((SECONDS - T0))s] $cell: skip $name (done with these settings)"
    return
  fi
  rm -f "$output"
  printf '%s' "$cmd" > "$stamp"
  t=$SECONDS
  if ! "$@" > "$log" 2>&1; then
    echo "[$((SECONDS - T0))s] $cell: FAILED $name: $*" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi
  echo "[$((SECONDS - T0))s] $cell: done $name ($((SECONDS - t))s)"
  printf '%s\t%s\t%s\n' "$cell" "${name%.json}" "$((SECONDS - t))" >> "$OUT/steps.tsv"
}

train() {  # train DIR args...: resumable, so a killed run continues from its last epoch
  local dir=$1; shift
  local cmd=("$PY" advtrain.py "${TRAIN[@]}" "${DATA[@]}" "$@" --out "$dir" --resume)
  mkdir -p "$dir"
  # a checkpoint of other settings (or FORCE=1) is not resumed: start that run afresh
  if [[ "$FORCE" == 1 || ! -f "$dir/.metrics.json.cmd" || "$(cat "$dir/.metrics.json.cmd")" != "${cmd[*]:1}" ]]; then
    rm -f "$dir/model.pt" "$dir/log.jsonl"
  fi
  step "$dir/metrics.json" "$dir/train.log" "" "${cmd[@]}"
}

measure() {  # measure DIR: Fisher and transfer of the cell's checkpoint
  local dir=$1 trained
  trained=$(cat "$dir/.metrics.json.cmd")
  step "$dir/fisher.json" "$dir/fisher.log" "$trained" \
    "$PY" fisher.py --ckpt "$dir/model.pt" "${FISHER[@]}" "${DATA[@]}" --out "$dir"
  step "$dir/transfer.json" "$dir/transfer.log" "$trained" \
    "$PY" transfer.py --ckpt "$dir/model.pt" "${TARGETS[@]}" "${DATA[@]}" --out "$dir"
}

invert() {  # invert DIR: inversion of the cell's checkpoint, labelled by the judge
  local dir=$1
  step "$dir/invert.json" "$dir/invert.log" "$(cat "$dir/.metrics.json.cmd" "$JUDGE_DIR/.metrics.json.cmd")" \
    "$PY" invert.py --ckpt "$dir/model.pt" --judge "$JUDGE_DIR/model.pt" "${INVERT[@]}" "${DATA[@]}" --out "$dir"
}

# A pool of at most JOBS background jobs (the shell's own job control). A job that fails
# leaves $FAILED behind; the pool then stops the others and the study. On a GPU machine job k
# runs on GPU k mod (number of GPUs), round-robin over CUDA_VISIBLE_DEVICES.
FAILED="$OUT/.failed"
rm -f "$FAILED"
LAUNCHED=0
launch() {
  while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || true; check_failed; done
  if (( ${#GPU_LIST[@]} > 0 )); then
    ( export CUDA_VISIBLE_DEVICES=${GPU_LIST[$((LAUNCHED % ${#GPU_LIST[@]}))]}; "$@" ) || touch "$FAILED" &
  else
    ( "$@" ) || touch "$FAILED" &
  fi
  LAUNCHED=$((LAUNCHED + 1))
}
check_failed() {
  if [[ -f "$FAILED" ]]; then
    jobs -p | xargs -r kill 2> /dev/null || true
    wait || true
    echo "[$((SECONDS - T0))s] study stopped: a step failed (above)" >&2
    exit 1
  fi
}
wait_all() { wait || true; check_failed; }
train_and_measure() { train "$@" && measure "$1"; }

cells=()
for seed in $SEEDS; do
  for cell in "${GRID[@]}"; do
    read -r norm eps <<< "$cell"
    cells+=("$seed $norm $eps")
  done
done
echo "[0s] $PRESET: ${#cells[@]} cells (seeds $SEEDS) and the judge in $OUT; $JOBS jobs at once," \
     "$THREADS torch thread(s) each"
: > "$OUT/steps.tsv"
JUDGE_DIR="$OUT/judge"
launch train "$JUDGE_DIR" "${JUDGE[@]}" --seed 100
for c in "${cells[@]}"; do
  read -r seed norm eps <<< "$c"
  dir="$OUT/${norm}_eps${eps//\//_}_seed${seed}"
  launch train_and_measure "$dir" --norm "$norm" --eps "$eps" --seed "$seed"
done
wait_all
for c in "${cells[@]}"; do  # every inversion needs the judge
  read -r seed norm eps <<< "$c"
  launch invert "$OUT/${norm}_eps${eps//\//_}_seed${seed}"
done
wait_all
# the report always reflects every run present
if ! "$PY" report.py "$OUT" > "$OUT/report.log" 2>&1; then
  echo "[$((SECONDS - T0))s] FAILED: report.py $OUT" >&2
  tail -n 20 "$OUT/report.log" >&2
  exit 1
fi
cat "$OUT/report.log"
printf 'total\tstudy\t%s\n' "$((SECONDS - T0))" >> "$OUT/steps.tsv"
echo "[$((SECONDS - T0))s] study done: $OUT/report.md"
