#!/usr/bin/env bash
# The whole study end to end: train the eps grid (or, imagenet, evaluate published
# checkpoints), then Fisher, transfer and inversion on every checkpoint, then the report.
#
#   bash run_all.sh                 # preset quick: CPU, Fashion-MNIST 0-4 -> 5-9, 3 seeds
#   SEEDS=0 bash run_all.sh         # one seed: a look at the numbers, no verdicts (needs 3)
#   bash run_all.sh paper           # CIFAR-10, resnet18, L2 and Linf grids (GPU, internet)
#   bash run_all.sh paper --smoke   # the paper code path on tiny synthetic CIFAR-shaped data
#   CKPT_DIR=dir bash run_all.sh imagenet  # published robust ImageNet models: evaluated, not trained
#   bash run_all.sh imagenet --smoke       # its code path on tiny fake checkpoints and images, CPU
#
# Environment: SEEDS (default "0 1 2"), JOBS and THREADS (below), FORCE=1 (redo every
# step), OUT (default results/<preset>[-smoke]), PYTHON (default python3; without torch a
# .venv is made, see setup_python.sh), DATA_DIR (default ./data; imagenet: DATA_DIR/val in
# ImageFolder layout, beside the transfer targets' torchvision folders).
# imagenet only: CKPT_DIR (read only) holds the checkpoints and manifest.csv, a header line then
# one row `file,norm,eps[,seed]` per checkpoint (file relative to CKPT_DIR; norm l2 or linf;
# eps as 0.5 or 4/255; seed default 0), e.g. `resnet50_l2_eps3.ckpt,l2,3`; each row is a cell,
# whatever SEEDS says. UNSAFE_LOAD=1 lets every script unpickle the checkpoints (robustness
# files need it; only for files you trust). TARGETS_LIST (default: those of "cifar10 cifar100
# svhn fashion-mnist mnist" found in DATA_DIR) names the transfer targets; a target not found
# is downloaded, so offline give those you have.
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
OUT=${OUT:-results/$PRESET${SMOKE:+-smoke}}
T0=$SECONDS
die() { echo "error: $*" >&2; exit 2; }
PUBLISHED=0  # 1: the cells are published checkpoints (imagenet), evaluated instead of trained
ROWS=()      # the cells, "seed norm eps [checkpoint]": SEEDS x GRID, or (imagenet) the manifest rows
UNSAFE=()
[[ "${UNSAFE_LOAD:-0}" == 1 ]] && UNSAFE=(--unsafe-load)

# read_manifest FILE: the rows `file,norm,eps[,seed]` after its header into ROWS, and the judge
# of every inversion into JUDGE_CKPT: the most robust L2 model listed. No helper classifier is
# trained for ImageNet, and robust models label by perceptible features (their gradients are
# perceptually aligned), so it labels reconstructions best; it also judges its own cell (biased
# there: judge_acc is evidence only, C5 and C6 decide on SSIM). A bad manifest is one line and
# exit 2, before any work.
read_manifest() {
  local manifest=$1 n=1 line file norm eps seed extra path name seen=" " judge_eps=-1
  [[ -f "$manifest" ]] || die "manifest not found: $manifest (a header line, then rows file,norm,eps[,seed])"
  { IFS= read -r line || true
    [[ "${line%$'\r'}" == file,norm,eps* ]] || die "$manifest: the first line must be the header file,norm,eps[,seed]"
    while IFS= read -r line || [[ -n "$line" ]]; do
      n=$((n + 1)) line=${line%$'\r'}
      [[ -z "${line//[[:space:]]/}" ]] && continue
      IFS=, read -r file norm eps seed extra <<< "$line"
      norm=${norm//[[:space:]]/} eps=${eps//[[:space:]]/} seed=${seed//[[:space:]]/}
      [[ -n "$file" && -n "$norm" && -n "$eps" && -z "$extra" ]] ||
        die "$manifest line $n: expected file,norm,eps[,seed], got '$line'"
      [[ "$norm" == l2 || "$norm" == linf ]] || die "$manifest line $n: unknown norm '$norm' (l2 or linf)"
      [[ "$eps" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)(/[1-9][0-9]*)?$ ]] ||
        die "$manifest line $n: eps '$eps' is not a number or a fraction like 4/255"
      seed=${seed:-0}
      [[ "$seed" =~ ^[0-9]+$ ]] || die "$manifest line $n: seed '$seed' is not a whole number"
      path=$file
      [[ "$file" == /* ]] || path=$(dirname "$manifest")/$file
      [[ -f "$path" ]] || die "$manifest line $n: checkpoint not found: $path"
      name="${norm}_eps${eps//\//_}_seed${seed}"
      [[ "$seen" == *" $name "* ]] && die "$manifest line $n: a second checkpoint for cell $name"
      seen+="$name "
      ROWS+=("$seed $norm $eps $path")
      if [[ "$norm" == l2 ]] && awk -v a="$eps" -v b="$judge_eps" 'BEGIN {
           split(a, x, "/"); split(b, y, "/"); exit !(x[1] / (x[2] ? x[2] : 1) > y[1] / (y[2] ? y[2] : 1)) }'; then
        JUDGE_CKPT=$path judge_eps=$eps
      fi
    done; } < "$manifest"
  (( ${#ROWS[@]} > 0 )) || die "$manifest lists no checkpoint"
}

# have_data NAME: the dataset's files are in DATA_DIR, in the layout data.py reads (torchvision's)
have_data() {
  local d=${DATA[1]}
  case $1 in
    cifar10) [[ -d "$d/cifar-10-batches-py" ]] ;;
    cifar100) [[ -d "$d/cifar-100-python" ]] ;;
    svhn) [[ -f "$d/train_32x32.mat" && -f "$d/test_32x32.mat" ]] ;;
    mnist) [[ -d "$d/MNIST/raw" || -d "$d/mnist" ]] ;;
    fashion-mnist) [[ -d "$d/FashionMNIST/raw" || -d "$d/fashion-mnist" || -d /usr/share/datasets/fashion-mnist ]] ;;
    *) false ;;
  esac
}

case "$PRESET" in
  quick)
    GRID=("l2 0" "l2 0.25" "l2 0.5" "l2 1.0" "l2 2.0")
    # every model is attacked at the reference radii of the preset (report.py decides C1 at L2 0.5)
    TRAIN=(--dataset fashion-mnist --classes 0-4 --arch cnn --train-size 10000 --test-size 1000
           --epochs 4 --steps 3 --eval-eps l2:0.5 l2:1.0 --eval-steps 20)
    JUDGE=(--norm l2 --eps 0.5)
    # near (the other five classes) and far (the same, contrast-inverted) targets; probes on all
    # labels and on 1, 10 and 100 per class, and fine-tuning. C2 is decided on the far target at
    # 10 shots (report.py, PRIMARY_TARGETS; rule 3 in the README)
    TARGETS=(--target fashion-mnist:5-9 --target fashion-mnist:5-9+invert --shots 1 10 100
             --finetune --finetune-size 1000)
    FISHER=(--n 512)
    # test images 64-95: the inversion defaults were chosen on images 0-63 (invert.py, TUNED_ON)
    INVERT=(--start 64 --n-images 32 --method baseline,tv,noise,noise-tv)
    ;;
  paper)
    GRID=("l2 0" "l2 0.25" "l2 0.5" "l2 1.0" "linf 2/255" "linf 4/255" "linf 8/255")
    TRAIN=(--dataset cifar10 --arch resnet18 --epochs 30 --steps 7 --batch-size 128 --lr 0.1
           --augment --eval-eps l2:0.5 linf:8/255 --eval-attack apgd --eval-steps 100 --eval-restarts 1)
    JUDGE=(--norm l2 --eps 0.5)
    TARGETS=(--target cifar100 --target svhn --target fashion-mnist --target mnist --shots 1 10 100
             --finetune --finetune-size 10000)
    FISHER=(--n 512)
    INVERT=(--start 0 --n-images 32 --method baseline,tv,noise,noise-tv)
    if [[ "$SMOKE" == "--smoke" ]]; then  # same code path, tiny synthetic data, CPU
      GRID=("l2 0" "l2 0.5" "linf 8/255")
      TRAIN=(--dataset synthetic --arch resnet18 --width 8 --train-size 64 --test-size 32 --epochs 1
             --steps 1 --batch-size 32 --augment --eval-eps l2:0.5 linf:8/255 --eval-attack apgd --eval-steps 2
             --device cpu)
      TARGETS=(--target synthetic:0-4 --target fashion-mnist:5-9 --train-size 64 --test-size 32 --shots 1 2
               --finetune --finetune-size 32)
      FISHER=(--n 4 --chunk 4 --power-iters 5 --device cpu)
      INVERT=(--n-images 4 --steps 5 --method baseline,tv,noise,noise-tv --device cpu)
    fi
    ;;
  imagenet)
    # Published robust ImageNet models (the robustness library's, e.g. Salman et al. 2020, and a
    # torchvision state dict for eps 0), listed in $CKPT_DIR/manifest.csv: never trained or
    # resumed. Each is attacked by our evaluation (C1), then measured like a trained cell. The
    # files in CKPT_DIR are only read; every output goes under $OUT. robustness pickles its
    # checkpoints with dill and extra objects: they load only with UNSAFE_LOAD=1.
    if [[ "$SMOKE" == "--smoke" ]]; then  # same code path, tiny fake checkpoints and images, CPU
      [[ -f "$OUT/fake/ckpt/manifest.csv" ]] || "$PY" tests/make_fake_imagenet.py --out "$OUT/fake"
      CKPT_DIR=$OUT/fake/ckpt DATA=(--data-dir "$OUT/fake/data")
    fi
    [[ -n "${CKPT_DIR:-}" ]] || die "the imagenet preset needs CKPT_DIR, a folder of checkpoints with manifest.csv"
    [[ -d "$CKPT_DIR" ]] || die "CKPT_DIR not found: $CKPT_DIR"
    [[ -d "${DATA[1]}/val" ]] || die "the imagenet preset needs DATA_DIR/val (ImageFolder layout): not found: ${DATA[1]}/val"
    PUBLISHED=1 JUDGE_CKPT=""
    read_manifest "$CKPT_DIR/manifest.csv"
    # C1 at report.py's reference radii, on 1000 val images: APGD-CE, 50 steps (2 radii x 50
    # steps x 1000 images: 100k forward-backward passes of the model, minutes on one GPU)
    EVAL=(--dataset imagenet --test-size 1000 --eval-eps l2:0.5 linf:8/255 --eval-attack apgd-ce --eval-steps 50)
    # 1000 classes: the weights' Fisher samples 8 labels per example; --chunk bounds its memory
    # (chunk x labels x parameters floats: 3.3 GB for a ResNet-50), --batch-size the Lanczos'
    FISHER=(--dataset imagenet --n 256 --label-samples 8 --chunk 4 --batch-size 32)
    # the paper's targets whose data is in DATA_DIR, or TARGETS_LIST (absent ones are downloaded)
    TARGETS=()
    for t in ${TARGETS_LIST:-cifar10 cifar100 svhn fashion-mnist mnist}; do
      if [[ -n "${TARGETS_LIST:-}" ]] || have_data "$t"; then TARGETS+=(--target "$t"); fi
    done
    TARGETS+=(--shots 1 10 100)
    INVERT=(--n-images 16 --method baseline,tv,noise,noise-tv)
    if [[ "$SMOKE" == "--smoke" ]]; then
      EVAL=(--dataset imagenet --test-size 8 --eval-eps l2:0.5 linf:8/255 --eval-attack apgd --eval-steps 2
            --device cpu)
      FISHER=(--dataset imagenet --n 2 --chunk 1 --probes 4 --power-iters 5 --device cpu)
      TARGETS=(--target synthetic:0-4 --train-size 64 --test-size 32 --shots 1 2 --device cpu)
      INVERT=(--n-images 2 --steps 5 --method baseline,tv,noise,noise-tv --device cpu)
    fi
    [[ "${TARGETS[*]}" == *--target* ]] || die "no transfer target's data in ${DATA[1]} (cifar10 cifar100 svhn" \
                                               "fashion-mnist mnist): add it, or name targets in TARGETS_LIST"
    ;;
  *) die "unknown preset '$PRESET' (quick, paper or imagenet)" ;;
esac
(( PUBLISHED )) || JUDGE_CKPT=$OUT/judge/model.pt
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

evaluate() {  # evaluate DIR CKPT args...: our evaluation of a published checkpoint (metrics.json)
  local dir=$1 ckpt=$2; shift 2
  mkdir -p "$dir"
  step "$dir/metrics.json" "$dir/eval.log" "" \
    "$PY" advtrain.py --eval-only --ckpt "$ckpt" "${EVAL[@]}" "${DATA[@]}" "$@" "${UNSAFE[@]}" --out "$dir"
}

# made_by CKPT: the training command of a checkpoint trained here, which every step on it
# depends on; nothing for a published one (its path is in the step's own command)
made_by() { (( PUBLISHED )) || cat "$(dirname "$1")/.metrics.json.cmd"; }

measure() {  # measure DIR CKPT: Fisher and transfer of the cell's checkpoint
  local dir=$1 ckpt=$2 trained
  trained=$(made_by "$ckpt")
  step "$dir/fisher.json" "$dir/fisher.log" "$trained" \
    "$PY" fisher.py --ckpt "$ckpt" "${FISHER[@]}" "${DATA[@]}" "${UNSAFE[@]}" --out "$dir"
  step "$dir/transfer.json" "$dir/transfer.log" "$trained" \
    "$PY" transfer.py --ckpt "$ckpt" "${TARGETS[@]}" "${DATA[@]}" "${UNSAFE[@]}" --out "$dir"
}

invert() {  # invert DIR CKPT: inversion of the cell's checkpoint, labelled by the judge (if any)
  local dir=$1 ckpt=$2
  step "$dir/invert.json" "$dir/invert.log" "$(made_by "$ckpt"; [[ -z "$JUDGE_CKPT" ]] || made_by "$JUDGE_CKPT")" \
    "$PY" invert.py --ckpt "$ckpt" ${JUDGE_CKPT:+--judge "$JUDGE_CKPT"} "${INVERT[@]}" "${DATA[@]}" "${UNSAFE[@]}" \
    --out "$dir"
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
JUDGED="$OUT/.judge_done"  # made when the judge is ready; every inversion waits for it
judge() {  # the judge is trained here, or (imagenet) one of the published checkpoints
  (( PUBLISHED )) || train "$OUT/judge" "${JUDGE[@]}" --seed 100 || return 1
  touch "$JUDGED"
}
cell() {  # cell DIR CKPT args...: train (CKPT "") or evaluate CKPT, Fisher, transfer, then (the judge ready) inversion
  local dir=$1 ckpt=$2; shift 2
  if [[ -z "$ckpt" ]]; then
    train "$dir" "$@" && ckpt=$dir/model.pt || return 1
  else
    evaluate "$dir" "$ckpt" "$@" || return 1
  fi
  measure "$dir" "$ckpt" || return 1
  until [[ -f "$JUDGED" ]]; do [[ -f "$FAILED" ]] && return 1; sleep 1; done
  invert "$dir" "$ckpt"
}

# Longest first (robust cells, then eps 0, whose training has no attack), so that both
# cores stay busy until the end; the judge starts first, so no inversion waits long for it.
if (( ! PUBLISHED )); then
  for seed in $SEEDS; do for g in "${GRID[@]}"; do ROWS+=("$seed $g"); done; done
fi
cells=()
for c in "${ROWS[@]}"; do read -r _ _ eps _ <<< "$c"; [[ "$eps" != 0 ]] && cells+=("$c"); done
for c in "${ROWS[@]}"; do read -r _ _ eps _ <<< "$c"; [[ "$eps" == 0 ]] && cells+=("$c"); done
if (( PUBLISHED )); then
  what="from $CKPT_DIR/manifest.csv, judged by ${JUDGE_CKPT:-no model (no l2 checkpoint)},"
else
  what="(seeds $SEEDS) and the judge"
fi
echo "[0s] $PRESET: ${#cells[@]} cells $what in $OUT; $JOBS jobs at once, $THREADS torch thread(s) each"
: > "$OUT/steps.tsv"
rm -f "$JUDGED"
launch judge
for c in "${cells[@]}"; do
  read -r seed norm eps ckpt <<< "$c"
  launch cell "$OUT/${norm}_eps${eps//\//_}_seed${seed}" "$ckpt" --norm "$norm" --eps "$eps" --seed "$seed"
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
