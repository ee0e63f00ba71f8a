#!/usr/bin/env bash
# The whole study end to end: train the eps grid (or, imagenet, evaluate published
# checkpoints), then Fisher, transfer and inversion on every checkpoint, then the report.
#
#   bash run_all.sh                 # preset quick: CPU, Fashion-MNIST 0-4 -> 5-9, 6 seeds
#   SEEDS=0 bash run_all.sh         # one seed: verdicts at level models (for these models)
#   bash run_all.sh paper           # CIFAR-10, resnet18, L2 and Linf grids (GPU, internet)
#   bash run_all.sh paper --smoke   # the paper code path on tiny synthetic CIFAR-shaped data
#   CKPT_DIR=dir bash run_all.sh imagenet  # published robust ImageNet models, evaluated
#   bash run_all.sh imagenet --smoke       # its code path on tiny fake checkpoints, CPU
#
# Environment: SEEDS (quick "0 1 2 3 4 5", paper "0 1 2"), JOBS, JOBS_PER_GPU and THREADS
# (below), FORCE=1 (redo every step), OUT (default results/<preset>[-smoke]), PYTHON (default
# python3; without torch a .venv is made, see setup_python.sh), DATA_DIR (default ./data;
# imagenet: DATA_DIR/val in ImageFolder layout, beside the transfer targets' torchvision
# folders). imagenet only: CKPT_DIR (read only) holds the checkpoints and manifest.csv: a
# header, then one row `file,norm,eps[,seed]` per checkpoint, each a cell (file relative to
# CKPT_DIR, norm l2 or linf, eps as 0.5 or 4/255, seed default 0), e.g.
# `resnet50_l2_eps3.ckpt,l2,3`; UNSAFE_LOAD=1 lets every script unpickle them (robustness
# files need it; only for files you trust); TARGETS_LIST (default: those of cifar10 cifar100
# svhn fashion-mnist mnist that data.py finds in DATA_DIR; others download).
# The preset's declared decisions go first to OUT/study.json; report.py judges by them.
# A step is skipped when its output exists and was made by the same command (recorded in a
# hidden .<output>.cmd file beside it, with the command of the training it depends on); a
# changed setting redoes exactly the steps it affects. Training resumes from its last epoch,
# so a killed study started again finishes; every output is written atomically.
set -euo pipefail
cd "$(dirname "$0")"

PRESET=${1:-quick} SMOKE=${2:-}
STUDY=$PRESET${SMOKE:+-smoke}  # the name of its declaration in report.py
FORCE=${FORCE:-0} OUT=${OUT:-results/$STUDY} T0=$SECONDS
DATA=(--data-dir "${DATA_DIR:-./data}")
die() { echo "error: $*" >&2; exit 2; }
[[ -z "$SMOKE" || ("$SMOKE" == --smoke && "$PRESET" != quick) ]] ||
  die "unknown option '$SMOKE' for preset $PRESET (paper and imagenet take --smoke)"
source setup_python.sh torch torchvision numpy  # sets PY: $PYTHON if it has them, else .venv
# ROWS: the cells, "seed norm eps [checkpoint]": SEEDS x GRID, or (imagenet) the manifest's
# rows, whose published checkpoints (PUBLISHED=1) are evaluated instead of trained
PUBLISHED=0 ROWS=() UNSAFE=()
[[ "${UNSAFE_LOAD:-0}" == 1 ]] && UNSAFE=(--unsafe-load)
cell_name() { echo "${2}_eps${3//\//_}_seed$1"; }  # cell_name SEED NORM EPS

# read_manifest FILE: its rows into ROWS (a bad manifest: one line, exit 2), and into JUDGE_CKPT
# the judge of every inversion: the most robust L2 model, as robust models label by perceptible
# features (biased on its own cell: judge_acc is evidence only, C5 and C6 decide on SSIM).
read_manifest() {
  local m=$1 n line lines file norm eps seed extra name seen=" " best=-1
  bad() { die "$m line $n: $*"; }
  [[ -f "$m" ]] || die "manifest not found: $m (a header line, then rows file,norm,eps[,seed])"
  mapfile -t lines < "$m"
  [[ "${lines[0]:-}" == file,norm,eps* ]] ||
    die "$m: the first line must be the header file,norm,eps[,seed]"
  for ((n = 2; n <= ${#lines[@]}; n++)); do
    line=${lines[n - 1]%$'\r'}
    [[ -n "${line//[[:space:]]/}" ]] || continue
    IFS=, read -r file norm eps seed extra <<< "$line"
    norm=${norm//[[:space:]]/} eps=${eps//[[:space:]]/} seed=${seed//[[:space:]]/}
    [[ -n "$file" && -n "$norm" && -n "$eps" && -z "$extra" ]] ||
      bad "expected file,norm,eps[,seed], got '$line'"
    [[ "$norm" == l2 || "$norm" == linf ]] || bad "unknown norm '$norm' (l2 or linf)"
    [[ "$eps" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)(/[1-9][0-9]*)?$ ]] ||
      bad "eps '$eps' is not a number or a fraction like 4/255"
    seed=${seed:-0}
    [[ "$seed" =~ ^[0-9]+$ ]] || bad "seed '$seed' is not a whole number"
    [[ "$file" == /* ]] || file=$(dirname "$m")/$file
    [[ -f "$file" ]] || bad "checkpoint not found: $file"
    name=$(cell_name "$seed" "$norm" "$eps")
    [[ "$seen" != *" $name "* ]] || bad "a second checkpoint for cell $name"
    seen+="$name " ROWS+=("$seed $norm $eps $file")
    # eps is digits, a point and a slash (checked above): awk reads 4/255 as a division
    if [[ "$norm" == l2 ]] && awk "BEGIN { exit !($eps > $best) }"; then
      JUDGE_CKPT=$file best=$eps
    fi
  done
  (( ${#ROWS[@]} > 0 )) || die "$m lists no checkpoint"
}

case "$PRESET" in
  quick)
    # 6 seeds: rule 5's C2 contrast reaches an MDE of 2 points at level seeds (docs/PROTOCOL.md)
    SEEDS=${SEEDS:-0 1 2 3 4 5}
    GRID=("l2 0" "l2 0.25" "l2 0.5" "l2 1.0" "l2 2.0")
    # every model is attacked at the reference radii of the preset (C1 at L2 0.5, declared)
    TRAIN=(--dataset fashion-mnist --classes 0-4 --arch cnn --train-size 10000 --test-size 1000
           --epochs 4 --steps 3 --eval-eps l2:0.5 l2:1.0 --eval-steps 20)
    JUDGE=(--norm l2 --eps 0.5)
    # near (the other five classes) and far (the same, contrast-inverted) targets; probes on
    # all labels and on 1, 10 and 100 per class, and fine-tuning (20 epochs: chosen on held-out
    # settings, docs/FINETUNE.md). C2 is decided on the far target at 10 shots (the quick
    # declaration in claims.py), over 100 draws (rule 5, docs/PROTOCOL.md); the draws are
    # seeded by the cell's training seed (measure, below)
    TARGETS=(--target fashion-mnist:5-9 --target fashion-mnist:5-9+invert --shots 1 10 100
             --draws 5 10:100 --finetune --finetune-size 1000 --finetune-epochs 20)
    FISHER=(--n 512)
    # test images 64-95: the inversion defaults were chosen on images 0-63 (invert.py, TUNED_ON)
    INVERT=(--start 64 --n-images 32 --method baseline,tv,noise,noise-tv)
    ;;
  paper)
    SEEDS=${SEEDS:-0 1 2}
    GRID=("l2 0" "l2 0.25" "l2 0.5" "l2 1.0" "linf 2/255" "linf 4/255" "linf 8/255")
    TRAIN=(--dataset cifar10 --arch resnet18 --epochs 30 --steps 7 --batch-size 128 --lr 0.1
           --augment --eval-eps l2:0.5 linf:8/255 --eval-attack apgd --eval-steps 100
           --eval-restarts 1)
    JUDGE=(--norm l2 --eps 0.5)
    TARGETS=(--target cifar100 --target svhn --target fashion-mnist --target mnist
             --shots 1 10 100 --finetune --finetune-size 10000)
    FISHER=(--n 512)
    INVERT=(--start 0 --n-images 32 --method baseline,tv,noise,noise-tv)
    if [[ -n "$SMOKE" ]]; then  # same code path, tiny synthetic data, CPU
      GRID=("l2 0" "l2 0.5" "linf 8/255")
      TRAIN=(--dataset synthetic --arch resnet18 --width 8 --train-size 64 --test-size 32
             --epochs 1 --steps 1 --batch-size 32 --augment --eval-eps l2:0.5 linf:8/255
             --eval-attack apgd --eval-steps 2 --device cpu)
      TARGETS=(--target synthetic:0-4 --target fashion-mnist:5-9 --train-size 64 --test-size 32
               --shots 1 2 --finetune --finetune-size 32 --device cpu)
      FISHER=(--n 4 --chunk 4 --power-iters 2 --device cpu)
      INVERT=(--n-images 4 --steps 2 --method baseline,tv,noise,noise-tv --device cpu)
    fi
    ;;
  imagenet)
    # Published robust ImageNet models (e.g. Salman et al. 2020's; a torchvision state dict for
    # eps 0), never trained: each is attacked by our evaluation (C1), then measured like a
    # trained cell. CKPT_DIR is only read. robustness pickles need UNSAFE_LOAD=1.
    if [[ -n "$SMOKE" ]]; then  # same code path, tiny fake checkpoints and images, CPU
      [[ -f "$OUT/fake/ckpt/manifest.csv" ]] || "$PY" tests/make_fake_imagenet.py --out "$OUT/fake"
      CKPT_DIR=$OUT/fake/ckpt DATA=(--data-dir "$OUT/fake/data")
    fi
    [[ -n "${CKPT_DIR:-}" ]] ||
      die "the imagenet preset needs CKPT_DIR, a folder of checkpoints with manifest.csv"
    [[ -d "$CKPT_DIR" ]] || die "CKPT_DIR not found: $CKPT_DIR"
    PUBLISHED=1 JUDGE_CKPT=""
    read_manifest "$CKPT_DIR/manifest.csv"
    # the datasets data.py finds in DATA_DIR, in the layouts it reads
    FOUND=" $("$PY" data.py present imagenet cifar10 cifar100 svhn fashion-mnist mnist \
              "${DATA[@]}" | tr '\n' ' ')"
    [[ "$FOUND" == *" imagenet "* ]] ||
      die "the imagenet preset needs DATA_DIR/val (ImageFolder layout): not found: ${DATA[1]}/val"
    # C1 at the declared reference radii, on 1000 val images: APGD-CE, 50 steps
    EVAL=(--dataset imagenet --test-size 1000 --eval-eps l2:0.5 linf:8/255 --eval-attack apgd-ce
          --eval-steps 50)
    # 1000 classes: the weights' Fisher samples 8 labels per example; --chunk bounds its memory
    # (chunk x labels x parameters floats: 3.3 GB for a ResNet-50), --batch-size the Lanczos'
    FISHER=(--dataset imagenet --n 256 --label-samples 8 --chunk 4 --batch-size 32)
    TARGETS=()  # TARGETS_LIST, or the paper's targets found in DATA_DIR
    for t in ${TARGETS_LIST:-${FOUND/ imagenet }}; do TARGETS+=(--target "$t"); done
    TARGETS+=(--shots 1 10 100)
    INVERT=(--n-images 16 --method baseline,tv,noise,noise-tv)
    if [[ -n "$SMOKE" ]]; then
      EVAL=(--dataset imagenet --test-size 8 --eval-eps l2:0.5 linf:8/255 --eval-attack apgd
            --eval-steps 2 --device cpu)
      FISHER=(--dataset imagenet --n 2 --chunk 1 --probes 4 --power-iters 2 --device cpu)
      TARGETS=(--target synthetic:0-4 --train-size 64 --test-size 32 --shots 1 2 --device cpu)
      INVERT=(--n-images 2 --steps 2 --method baseline,tv,noise,noise-tv --device cpu)
    fi
    [[ "${TARGETS[*]}" == *--target* ]] || die "no transfer target's data in ${DATA[1]}" \
      "(cifar10 cifar100 svhn fashion-mnist mnist): add it, or name targets in TARGETS_LIST"
    ;;
  *) die "unknown preset '$PRESET' (quick, paper or imagenet)" ;;
esac
(( PUBLISHED )) || JUDGE_CKPT=$OUT/judge/model.pt
mkdir -p "$OUT"
# Independent cells run concurrently: JOBS at once, each with THREADS torch threads (default
# 1). On the CPU outputs depend on THREADS (the order of float sums), never on JOBS: JOBS=1
# and JOBS=4 give identical files. The GPUs: those CUDA_VISIBLE_DEVICES names (set but empty:
# none), else every one nvidia-smi lists. Each runs at most JOBS_PER_GPU of the jobs at once
# (default: one per 32 GiB of the first GPU's memory, at least 1, so 4 on a 141 GB H200; or
# JOBS spread evenly when JOBS is given): one job, bound by kernel launches, leaves most of a
# large GPU idle, and a job's largest step (fisher.py's weights trace at its default --chunk
# on the CIFAR ResNet-18) holds about 26 GB. JOBS defaults to JOBS_PER_GPU per GPU, and
# without a GPU to one per CPU core.
GPU_LIST=()
if nvidia-smi -L > /dev/null 2>&1; then
  if [[ -v CUDA_VISIBLE_DEVICES ]]; then
    IFS=, read -ra GPU_LIST <<< "$CUDA_VISIBLE_DEVICES"
  else
    mapfile -t GPU_LIST < <(seq 0 $(($(nvidia-smi -L | grep -c '^GPU') - 1)))
  fi
fi
N_GPUS=${#GPU_LIST[@]}
# (nproc counts the cores this process may use, but reads OMP_NUM_THREADS as its answer)
CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2> /dev/null || echo 1)
for name in JOBS JOBS_PER_GPU; do
  [[ -z "${!name:-}" || "${!name}" =~ ^[1-9][0-9]*$ ]] ||
    die "$name must be a positive integer, got '${!name}'"
done
if (( N_GPUS )) && [[ -z "${JOBS_PER_GPU:-}" ]]; then
  if [[ -n "${JOBS:-}" ]]; then
    JOBS_PER_GPU=$(( (JOBS + N_GPUS - 1) / N_GPUS ))
  else
    mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits \
          -i "${GPU_LIST[0]}" 2> /dev/null | head -n 1)
    [[ "$mib" =~ ^[0-9]+$ ]] || mib=0
    JOBS_PER_GPU=$(( mib / 32768 > 1 ? mib / 32768 : 1 ))
  fi
fi
JOBS=${JOBS:-$(( N_GPUS ? N_GPUS * JOBS_PER_GPU : CORES ))}
THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

# step OUTPUT LOG UPSTREAM command...: the one skip-or-run. Skipped when OUTPUT exists and was
# made by this command (less the interpreter) after the same UPSTREAM (their commands, or "");
# with another command than the recorded one (or FORCE=1), RESTART (a resumable step's files)
# goes first. One line with the cell, the step, its time; on failure its last lines, exit 1.
RESTART=()
step() {
  local output=$1 log=$2 cmd="${*:5}" stamp t cell name
  stamp=$(dirname "$output")/.$(basename "$output").cmd
  cell=$(basename "$(dirname "$output")") name=$(basename "$output")
  [[ -z "$3" ]] || cmd+=$'\n'"after: $3"
  if [[ "$FORCE" == 1 || ! -f "$stamp" || "$(< "$stamp")" != "$cmd" ]]; then
    rm -f "${RESTART[@]}"
  elif [[ -f "$output" ]]; then
    echo "[$((SECONDS - T0))s] $cell: skip $name (done with these settings)"
    return
  fi
  rm -f "$output"
  printf '%s' "$cmd" > "$stamp"
  t=$SECONDS
  if ! "${@:4}" > "$log" 2>&1; then
    echo "[$((SECONDS - T0))s] $cell: FAILED $name: ${*:4}" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi
  echo "[$((SECONDS - T0))s] $cell: done $name ($((SECONDS - t))s)"
  printf '%s\t%s\t%s\n' "$cell" "${name%.json}" "$((SECONDS - t))" >> "$OUT/steps.tsv"
}

train() {  # train DIR ARGS...: resumable, so a killed run continues from its last epoch
  local dir=$1 RESTART=("$1/model.pt" "$1/log.jsonl"); shift
  mkdir -p "$dir"
  step "$dir/metrics.json" "$dir/train.log" "" \
    "$PY" advtrain.py "${TRAIN[@]}" "${DATA[@]}" "$@" --out "$dir" --resume
}

# made_by DIR...: the training commands of the cells DIR, on which every step of a checkpoint
# trained here depends; nothing for a published one (its path is in the step's own command)
made_by() { (( PUBLISHED )) || for dir; do cat "$dir/.metrics.json.cmd"; done; }

measure() {  # measure DIR CKPT NORM EPS SEED: train (or evaluate CKPT), then Fisher, transfer
  local dir=$1 ckpt=$2 trained
  mkdir -p "$dir"
  if (( PUBLISHED )); then  # the --trained-* flags: what the published model was trained with
    step "$dir/metrics.json" "$dir/eval.log" "" "$PY" advtrain.py --eval-only --ckpt "$ckpt" \
      "${EVAL[@]}" "${DATA[@]}" --trained-norm "$3" --trained-eps "$4" --trained-seed "$5" \
      "${UNSAFE[@]}" --out "$dir"
  else
    train "$dir" --norm "$3" --eps "$4" --seed "$5"
  fi
  trained=$(made_by "$dir")
  step "$dir/fisher.json" "$dir/fisher.log" "$trained" \
    "$PY" fisher.py --ckpt "$ckpt" "${FISHER[@]}" "${DATA[@]}" "${UNSAFE[@]}" --out "$dir"
  step "$dir/transfer.json" "$dir/transfer.log" "$trained" \
    "$PY" transfer.py --ckpt "$ckpt" "${TARGETS[@]}" "${DATA[@]}" "${UNSAFE[@]}" --seed "$5" \
    --out "$dir"
}

invert() {  # invert DIR CKPT: inversion of the cell's checkpoint, labelled by the judge (if any)
  step "$1/invert.json" "$1/invert.log" "$(made_by "$1" "$OUT/judge")" \
    "$PY" invert.py --ckpt "$2" ${JUDGE_CKPT:+--judge "$JUDGE_CKPT"} "${INVERT[@]}" \
    "${DATA[@]}" "${UNSAFE[@]}" --out "$1"
}

# A pool of at most JOBS background jobs (the shell's own job control). A job that fails
# leaves $FAILED behind; the pool then stops the others and the study. On a GPU machine a job
# starts once a GPU runs fewer than JOBS_PER_GPU of the pool's jobs, on the GPU that runs the
# fewest at that moment (the first listed on a tie), the only one it sees.
FAILED=$OUT/.failed GPU_OF=()  # GPU_OF[process id of a running job]: its GPU, a GPU_LIST index
rm -f "$FAILED"
pick_gpu() {  # the least-loaded GPU with room into $gpu (launch's); fails when none has room
  local pid i load=() running=" $(jobs -rp | tr '\n' ' ') "
  for pid in "${!GPU_OF[@]}"; do
    if [[ "$running" == *" $pid "* ]]; then
      i=${GPU_OF[pid]} && load[i]=$(( ${load[i]:-0} + 1 ))
    else
      unset "GPU_OF[pid]"  # ended
    fi
  done
  gpu=""
  for i in "${!GPU_LIST[@]}"; do
    if (( ${load[i]:-0} < JOBS_PER_GPU )) && [[ -z "$gpu" || ${load[i]:-0} -lt ${load[gpu]:-0} ]]
    then gpu=$i; fi
  done
  [[ -n "$gpu" ]]
}
launch() {  # launch COMMAND...: in the background, once fewer than JOBS jobs run
  local gpu=""
  check_failed
  while (( $(jobs -rp | wc -l) >= JOBS )) || { (( N_GPUS )) && ! pick_gpu; }; do
    wait -n || true
    check_failed
  done
  if [[ -z "$gpu" ]]; then  # (a subshell: a failing step's exit ends it, not the `||`)
    ( "$@" ) || touch "$FAILED" &
  else
    ( export CUDA_VISIBLE_DEVICES=${GPU_LIST[gpu]}; "$@" ) || touch "$FAILED" &
    GPU_OF[$!]=$gpu
  fi
}
check_failed() {
  [[ -f "$FAILED" ]] || return 0
  jobs -p | xargs -r kill 2> /dev/null || true
  wait || true
  echo "[$((SECONDS - T0))s] study stopped: a step failed (above)" >&2
  exit 1
}

# Longest first (robust cells, then eps 0, whose training has no attack), so that every core
# stays busy until the end; the judge starts first.
(( PUBLISHED )) || for s in $SEEDS; do for g in "${GRID[@]}"; do ROWS+=("$s $g"); done; done
robust=() plain=()
for c in "${ROWS[@]}"; do
  [[ "$(cut -d' ' -f3 <<< "$c")" == 0 ]] && plain+=("$c") || robust+=("$c")
done
echo "[0s] $PRESET: ${#ROWS[@]} cells in $OUT; judge ${JUDGE_CKPT:-none (no l2 checkpoint)};" \
     "$JOBS jobs at once$( ((N_GPUS)) && echo " (at most $JOBS_PER_GPU per GPU, $N_GPUS GPUs)")," \
     "$THREADS torch thread(s) each"
"$PY" report.py --declare "$STUDY" "$OUT"
: > "$OUT/steps.tsv"
# Each cell's job trains (or evaluates) it and measures Fisher and transfer; its inversion is
# launched once that job and the judge's have ended (`wait` on their process ids).
judge=()
(( PUBLISHED )) || { launch train "$OUT/judge" "${JUDGE[@]}" --seed 100; judge=($!); }
dirs=() ckpts=() pids=()
for c in "${robust[@]}" "${plain[@]}"; do
  read -r seed norm eps ckpt <<< "$c"
  dirs+=("$OUT/$(cell_name "$seed" "$norm" "$eps")") ckpts+=("${ckpt:-${dirs[-1]}/model.pt}")
  launch measure "${dirs[-1]}" "${ckpts[-1]}" "$norm" "$eps" "$seed"
  pids+=($!)
done
for i in "${!dirs[@]}"; do
  wait "${judge[@]}" "${pids[i]}" || true
  launch invert "${dirs[i]}" "${ckpts[i]}"
done
wait || true
check_failed
# the report always reflects every run present
"$PY" report.py "$OUT" 2>&1 | tee "$OUT/report.log" ||
  { echo "[$((SECONDS - T0))s] FAILED: report.py $OUT (above)" >&2; exit 1; }
printf 'total\tstudy\t%s\n' "$((SECONDS - T0))" >> "$OUT/steps.tsv"
echo "[$((SECONDS - T0))s] study done: $OUT/report.md"
