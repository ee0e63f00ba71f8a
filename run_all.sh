#!/usr/bin/env bash
# The whole study end to end: train the eps grid, then Fisher, transfer and inversion on
# every checkpoint, then the report.
#
#   bash run_all.sh                 # preset quick: CPU, Fashion-MNIST 0-4 -> 5-9, minutes
#   SEEDS="0 1 2" bash run_all.sh   # repeat the training-dependent steps per seed
#   bash run_all.sh paper           # CIFAR-10, resnet18, L2 and Linf grids (GPU, internet)
#   bash run_all.sh paper --smoke   # the paper code path on tiny synthetic CIFAR-shaped data
#
# Environment: SEEDS (default "0"), FORCE=1 (redo steps whose output exists),
# OUT (default results/<preset>[-smoke]), PYTHON (default python), DATA_DIR (default ./data).
# A step whose output file exists is skipped, so a killed study started again resumes
# (training itself resumes from its last epoch); every output is written atomically.
set -euo pipefail
cd "$(dirname "$0")"

PRESET=${1:-quick}
SMOKE=${2:-}
SEEDS=${SEEDS:-0}
FORCE=${FORCE:-0}
PY=${PYTHON:-python}
DATA=(--data-dir "${DATA_DIR:-./data}")
T0=$SECONDS

case "$PRESET" in
  quick)
    GRID=("l2 0" "l2 0.25" "l2 0.5" "l2 1.0" "l2 2.0")
    TRAIN=(--dataset fashion-mnist --classes 0-4 --arch cnn --train-size 10000 --test-size 1000
           --epochs 4 --steps 3 --eval-eps 0.5 1.0 --eval-steps 20)
    JUDGE=(--norm l2 --eps 0.5)
    TARGETS=(--target fashion-mnist:5-9)
    FISHER=(--n 512)
    INVERT=(--n-images 16)
    ;;
  paper)
    GRID=("l2 0" "l2 0.25" "l2 0.5" "l2 1.0" "linf 2/255" "linf 4/255" "linf 8/255")
    TRAIN=(--dataset cifar10 --arch resnet18 --epochs 30 --steps 7 --batch-size 128 --lr 0.1
           --augment --eval-steps 20 --eval-restarts 1)
    JUDGE=(--norm l2 --eps 0.5)
    TARGETS=(--target cifar100 --target svhn --target fashion-mnist --target mnist)
    FISHER=(--n 512)
    INVERT=(--n-images 16)
    if [[ "$SMOKE" == "--smoke" ]]; then  # same code path, tiny synthetic data, CPU
      GRID=("l2 0" "l2 0.5" "linf 8/255")
      TRAIN=(--dataset synthetic --arch resnet18 --width 8 --train-size 64 --test-size 32 --epochs 1
             --steps 1 --batch-size 32 --augment --eval-steps 2 --device cpu)
      TARGETS=(--target synthetic:0-4 --target fashion-mnist:5-9 --train-size 64 --test-size 32)
      FISHER=(--n 4 --chunk 4 --power-iters 5 --device cpu)
      INVERT=(--n-images 4 --steps 5 --device cpu)
    fi
    ;;
  *) echo "error: unknown preset '$PRESET' (quick or paper)" >&2; exit 2 ;;
esac
OUT=${OUT:-results/$PRESET${SMOKE:+-smoke}}
mkdir -p "$OUT"

# step OUTPUT LOG command...: run unless OUTPUT exists; one line with elapsed time; on
# failure, the step's last lines and a non-zero exit.
step() {
  local output=$1 log=$2; shift 2
  if [[ -f "$output" && "$FORCE" != 1 ]]; then
    echo "[$((SECONDS - T0))s] skip  $output (exists)"
    return
  fi
  local t=$SECONDS
  if ! "$@" > "$log" 2>&1; then
    echo "[$((SECONDS - T0))s] FAILED: $*" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi
  echo "[$((SECONDS - T0))s] done  $output ($((SECONDS - t))s)"
}

train() {  # train DIR args...: resumable, so a killed run continues from its last epoch
  local dir=$1; shift
  [[ "$FORCE" == 1 ]] && rm -f "$dir/metrics.json" "$dir/model.pt"
  mkdir -p "$dir"
  step "$dir/metrics.json" "$dir/train.log" "$PY" advtrain.py "${TRAIN[@]}" "${DATA[@]}" "$@" --out "$dir" --resume
}

JUDGE_DIR="$OUT/judge"
train "$JUDGE_DIR" "${JUDGE[@]}" --seed 100
for seed in $SEEDS; do
  for cell in "${GRID[@]}"; do
    read -r norm eps <<< "$cell"
    dir="$OUT/${norm}_eps${eps//\//_}_seed${seed}"
    train "$dir" --norm "$norm" --eps "$eps" --seed "$seed"
    ckpt="$dir/model.pt"
    step "$dir/fisher.json" "$dir/fisher.log" "$PY" fisher.py --ckpt "$ckpt" "${FISHER[@]}" "${DATA[@]}" --out "$dir"
    step "$dir/transfer.json" "$dir/transfer.log" "$PY" transfer.py --ckpt "$ckpt" "${TARGETS[@]}" "${DATA[@]}" --out "$dir"
    step "$dir/invert.json" "$dir/invert.log" "$PY" invert.py --ckpt "$ckpt" --judge "$JUDGE_DIR/model.pt" "${INVERT[@]}" "${DATA[@]}" --out "$dir"
  done
done
rm -f "$OUT/report.md"  # the report always reflects every run present
step "$OUT/report.md" "$OUT/report.log" "$PY" report.py "$OUT"
echo "[$((SECONDS - T0))s] study done: $OUT/report.md"
