#!/usr/bin/env bash
# The whole study end to end: train the eps grid (or, imagenet, evaluate published
# checkpoints), then Fisher, transfer and inversion on every checkpoint, then the report.
#
#   bash run_all.sh                 # preset quick: CPU, Fashion-MNIST 0-4 -> 5-9, 6 seeds
#   SEEDS=0 bash run_all.sh         # one seed (results/quick-seeds0): verdicts at level models
#   bash run_all.sh paper           # CIFAR-10, resnet18, L2 and Linf grids (GPU, internet)
#   bash run_all.sh paper --smoke   # the paper code path on tiny synthetic CIFAR-shaped data
#   CKPT_DIR=dir bash run_all.sh imagenet  # published robust ImageNet models, evaluated
#   bash run_all.sh imagenet --smoke       # its code path on tiny fake checkpoints, CPU
#
# Where it runs (one plan of the study, so a step's output never depends on where it ran):
#   (default)    a local pool of JOBS jobs (below)
#   --slurm      submits the study to Slurm and returns: the judge, an array job of the cells,
#                an array of their inversions (each after its cell and the judge) and the
#                report (after every task has ended, naming the cells that did not finish).
#                Each task asks for THREADS cores, and one GPU unless the preset runs on the
#                CPU; SBATCH_ARGS adds your options to every sbatch (e.g. "--partition=gpu
#                --account=lab --time=04:00:00"). Logs and job ids in OUT/slurm/.
#   --plan       prints the study's tasks, a line each in dependency order: STAGE, NAME and
#                the command (tab-separated). Stage 1: the judge and the cells, stage 2: the
#                inversions (each needs its cell and the judge), stage 3: the report. Any
#                engine can run them, a stage after the one before, e.g.
#                for s in 1 2 3; do awk -F'\t' -v s=$s '$1 == s {print $3}' plan.tsv |
#                  xargs -d '\n' -n 1 -P 4 bash -c; done
#   --redeclare  replaces OUT/study.json's declaration by the preset's current one (recorded
#                there, old and new, and shown in report.md); without it a declaration that
#                differs from the one OUT was declared with is refused
#
# Environment: SEEDS (quick "0 1 2 3 4 5", paper "0 1 2"; another set gets its own default OUT),
# DEVICE (auto, cpu or cuda; quick and the smokes: cpu, else auto), JOBS, JOBS_PER_GPU, FISHER_CHUNK
# and THREADS (below), FORCE=1 (redo every step), OUT (default results/<preset>[-smoke][-seeds<S>]),
# PYTHON (default python3; without torch a .venv is made, see setup_python.sh), DATA_DIR (default
# ./data; imagenet: DATA_DIR/val in ImageFolder layout, beside the transfer targets' torchvision
# folders). imagenet only: CKPT_DIR (read only) holds the checkpoints and manifest.csv: a header,
# then one row `file,norm,eps[,seed[,model]]` per checkpoint, each a cell (file relative to
# CKPT_DIR, norm l2 or linf, eps as 0.5 or 4/255, seed default 0, model for any other classifier:
# torchvision:NAME or package.module:function, README "Your own model"), e.g.
# `resnet50_l2_eps3.ckpt,l2,3`; UNSAFE_LOAD=1 lets every script unpickle them (robustness files need
# it; only for files you trust); TARGETS_LIST (default: those of cifar10 cifar100 svhn fashion-mnist
# mnist that data.py finds in DATA_DIR; others download).
# The preset's declared decisions go first to OUT/study.json; report.py judges by them.
# A step is skipped when its output exists and was made by the same command (recorded in a
# hidden .<output>.cmd file beside it, with the command of the training it depends on); a
# changed setting redoes exactly the steps it affects. Training resumes from its last epoch,
# so a killed study started again (or resubmitted) finishes; every output is written
# atomically.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
die() { echo "error: $*" >&2; exit 2; }

# --plan-task PLAN KEY: one task of a plan file as a Slurm job runs it: the line named KEY,
# or the SLURM_ARRAY_TASK_ID-th line of stage KEY (the judge aside: it has a job of its own)
if [[ "${1:-}" == --plan-task ]]; then
  (( $# == 3 )) || die "usage: run_all.sh --plan-task PLAN_FILE NAME_OR_STAGE"
  line=$(awk -F'\t' -v k="$3" -v i="${SLURM_ARRAY_TASK_ID:-1}" \
         '$2 == k || ($1 == k && $2 != "judge" && ++n == i) { print $3; exit }' "$2")
  [[ -n "$line" ]] || die "no task $3 (index ${SLURM_ARRAY_TASK_ID:-1}) in $2"
  exec bash -c "$line"
fi

PRESET="" SMOKE="" ACTION=local TASK="" REDECLARE=()
while (( $# )); do
  case $1 in
    --smoke) SMOKE=--smoke ;;
    --plan | --slurm) ACTION=${1#--} ;;
    --redeclare) REDECLARE=(--redeclare) ;;
    --task) (( $# > 1 )) || die "--task needs a task name (--plan lists them)"
            ACTION=task TASK=$2; shift ;;
    -h | --help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    -*) die "unknown option '$1' (--smoke, --slurm, --plan, --redeclare, --help)" ;;
    *) [[ -z "$PRESET" ]] || die "one preset, got '$PRESET' and '$1'"; PRESET=$1 ;;
  esac
  shift
done
PRESET=${PRESET:-quick}
[[ -z "$SMOKE" || "$PRESET" != quick ]] ||
  die "unknown option '--smoke' for preset quick (paper and imagenet take --smoke)"
STUDY=$PRESET${SMOKE:+-smoke}  # the name of its declaration in report.py
GIVEN_OUT=${OUT:-} OUT=${OUT:-results/$STUDY} FORCE=${FORCE:-0} T0=$SECONDS
DATA=(--data-dir "${DATA_DIR:-./data}")
source setup_python.sh torch torchvision numpy  # sets PY: $PYTHON if it has them, else .venv
# ROWS: the cells, "seed norm eps [checkpoint]": SEEDS x GRID, or (imagenet) the manifest's
# rows, whose published checkpoints (PUBLISHED=1) are evaluated instead of trained
PUBLISHED=0 ROWS=() UNSAFE=() PRESET_SEEDS=""
JOB_MIB=32768  # a job's largest stage on a GPU, MiB; where a preset's is not measured: 32 GiB
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
    IFS=, read -r file norm eps seed model extra <<< "$line"
    norm=${norm//[[:space:]]/} eps=${eps//[[:space:]]/} seed=${seed//[[:space:]]/}
    model=${model//[[:space:]]/}
    [[ -n "$file" && -n "$norm" && -n "$eps" && -z "$extra" ]] ||
      bad "expected file,norm,eps[,seed[,model]], got '$line'"
    [[ "$norm" == l2 || "$norm" == linf ]] || bad "unknown norm '$norm' (l2 or linf)"
    [[ "$eps" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)(/[1-9][0-9]*)?$ ]] ||
      bad "eps '$eps' is not a number or a fraction like 4/255"
    seed=${seed:-0}
    [[ "$seed" =~ ^[0-9]+$ ]] || bad "seed '$seed' is not a whole number"
    [[ -z "$model" || "$model" =~ ^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$ ]] ||
      bad "model '$model' is neither torchvision:NAME nor package.module:function"
    [[ "$file" == /* ]] || file=$(dirname "$m")/$file
    [[ -f "$file" ]] || bad "checkpoint not found: $file"
    name=$(cell_name "$seed" "$norm" "$eps")
    [[ "$seen" != *" $name "* ]] || bad "a second checkpoint for cell $name"
    seen+="$name " ROWS+=("$seed $norm $eps $file $model")
    # eps is digits, a point and a slash (checked above): awk reads 4/255 as a division; the
    # judge is one of our or the published layouts (invert.py --judge), never an adapted model
    if [[ "$norm" == l2 && -z "$model" ]] && awk "BEGIN { exit !($eps > $best) }"; then
      JUDGE_CKPT=$file best=$eps
    fi
  done
  (( ${#ROWS[@]} > 0 )) || die "$m lists no checkpoint"
}

case "$PRESET" in
  quick)
    # 6 seeds: rule 5's C2 contrast reaches an MDE of 2 points at level seeds (docs/PROTOCOL.md)
    PRESET_SEEDS="0 1 2 3 4 5" DEVICE_DEFAULT=cpu  # the README's numbers: CPU, float32
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
    PRESET_SEEDS="0 1 2" DEVICE_DEFAULT=auto
    # a job's largest stage but the weights' trace (whose chunk fits the job's share): Fisher's
    # input and representation estimators at batch 64, 6.5 GiB on the CPU in float32 (python
    # tests/bench.py --memory), with 1.5 GiB for CUDA's context and cuDNN's workspaces
    JOB_MIB=8192
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
      DEVICE_DEFAULT=cpu
      GRID=("l2 0" "l2 0.5" "linf 8/255")
      TRAIN=(--dataset synthetic --arch resnet18 --width 8 --train-size 64 --test-size 32
             --epochs 1 --steps 1 --batch-size 32 --augment --eval-eps l2:0.5 linf:8/255
             --eval-attack apgd --eval-steps 2)
      TARGETS=(--target synthetic:0-4 --target fashion-mnist:5-9 --train-size 64 --test-size 32
               --shots 1 2 --finetune --finetune-size 32)
      FISHER=(--n 4 --chunk 4 --power-iters 2)
      INVERT=(--n-images 4 --steps 2 --method baseline,tv,noise,noise-tv)
    fi
    ;;
  imagenet)
    # Published robust ImageNet models (e.g. Salman et al. 2020's; a torchvision state dict for
    # eps 0), never trained: each is attacked by our evaluation (C1), then measured like a
    # trained cell. CKPT_DIR is only read. robustness pickles need UNSAFE_LOAD=1.
    DEVICE_DEFAULT=auto
    if [[ -n "$SMOKE" ]]; then  # same code path, tiny fake checkpoints and images, CPU
      DEVICE_DEFAULT=cpu
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
    # (2.1 x chunk x labels x parameters floats: about 7 GB for a ResNet-50; on a GPU lowered to
    # fit the job's share), --batch-size the Lanczos'
    FISHER=(--dataset imagenet --n 256 --label-samples 8 --chunk 4 --batch-size 32)
    TARGETS=()  # TARGETS_LIST, or the paper's targets found in DATA_DIR
    for t in ${TARGETS_LIST:-${FOUND/ imagenet }}; do TARGETS+=(--target "$t"); done
    TARGETS+=(--shots 1 10 100)
    INVERT=(--n-images 16 --method baseline,tv,noise,noise-tv)
    if [[ -n "$SMOKE" ]]; then
      EVAL=(--dataset imagenet --test-size 4 --eval-eps l2:0.5 linf:8/255 --eval-attack apgd
            --eval-steps 2)
      FISHER=(--dataset imagenet --n 2 --chunk 1 --probes 4 --power-iters 2)
      TARGETS=(--target synthetic:0-4 --train-size 32 --test-size 16 --shots 1 2)
      INVERT=(--n-images 2 --steps 2 --method baseline,tv,noise,noise-tv)
    fi
    [[ "${TARGETS[*]}" == *--target* ]] || die "no transfer target's data in ${DATA[1]}" \
      "(cifar10 cifar100 svhn fashion-mnist mnist): add it, or name targets in TARGETS_LIST"
    ;;
  *) die "unknown preset '$PRESET' (quick, paper or imagenet)" ;;
esac
(( PUBLISHED )) || JUDGE_CKPT=$OUT/judge/model.pt
DEVICE=${DEVICE:-$DEVICE_DEFAULT}
[[ "$DEVICE" =~ ^(auto|cpu|cuda(:[0-9]+)?)$ ]] ||
  die "DEVICE must be auto, cpu, cuda or cuda:N, got '$DEVICE'"
if (( PUBLISHED )); then SEEDS=""; else SEEDS=$(echo ${SEEDS:-$PRESET_SEEDS}); fi
# another seed set is another study: its own folder, since the report judges every run in it
[[ -n "$GIVEN_OUT" || "$SEEDS" == "$PRESET_SEEDS" ]] || OUT+=-seeds${SEEDS// /-}
THREADS=${THREADS:-1}
[[ "$THREADS" =~ ^[1-9][0-9]*$ ]] || die "THREADS must be a positive integer, got '$THREADS'"
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

# The GPUs (unless DEVICE=cpu): those CUDA_VISIBLE_DEVICES names (set but empty: none), else
# every one nvidia-smi lists. Each runs at most JOBS_PER_GPU of the pool's jobs at once; by
# default as many as its free memory holds of the preset's largest stage (JOB_MIB, measured:
# docs/PERFORMANCE.md, Memory), at most 4 (one job, bound by kernel launches, leaves most of a
# large GPU idle) and at least 1; or JOBS spread evenly when JOBS is given; and 1 for a task
# run alone (--task: a Slurm task has a GPU of its own). Each job's share of the free memory
# (whole GiB) bounds the weights' Fisher trace: fisher.py --memory-mib takes the largest chunk
# that fits it; FISHER_CHUNK sets the chunk instead. JOBS defaults to JOBS_PER_GPU per GPU,
# and without a GPU to one per core.
GPU_LIST=() SHARE_MIB=""
if [[ "$DEVICE" != cpu ]] && nvidia-smi -L > /dev/null 2>&1; then
  if [[ -v CUDA_VISIBLE_DEVICES ]]; then  # as CUDA reads it: up to the first invalid entry
    IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
    for gpu in "${visible[@]}"; do
      [[ "$gpu" =~ ^([0-9]+|GPU-.+|MIG-.+)$ ]] || break  # (-1: none)
      GPU_LIST+=("$gpu")
    done
  else
    mapfile -t GPU_LIST < <(seq 0 $(($(nvidia-smi -L | grep -c '^GPU') - 1)))
  fi
fi
N_GPUS=${#GPU_LIST[@]}
# (nproc counts the cores this process may use, but reads OMP_NUM_THREADS as its answer)
CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2> /dev/null || echo 1)
for name in JOBS JOBS_PER_GPU FISHER_CHUNK; do
  [[ -z "${!name:-}" || "${!name}" =~ ^[1-9][0-9]*$ ]] ||
    die "$name must be a positive integer, got '${!name}'"
done
[[ -z "${FISHER_CHUNK:-}" ]] || FISHER+=(--chunk "$FISHER_CHUNK")
if (( N_GPUS )); then
  FREE_MIB=""  # the least free memory of the GPUs, MiB; none where nvidia-smi does not say
  for gpu in "${GPU_LIST[@]}"; do
    mib=$(nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits -i "$gpu" \
          2> /dev/null | head -n 1)
    if [[ ! "$mib" =~ ^[0-9]+$ ]]; then  # (e.g. a MIG instance: [N/A])
      echo "note: nvidia-smi gives no free memory of GPU $gpu: one job per GPU unless" \
           "JOBS_PER_GPU or JOBS says, and Fisher's chunk as the preset's" >&2
      FREE_MIB=""
      break
    fi
    [[ -n "$FREE_MIB" ]] && (( FREE_MIB <= mib )) || FREE_MIB=$mib
  done
  if [[ -z "${JOBS_PER_GPU:-}" ]]; then
    if [[ "$ACTION" == task || -z "$FREE_MIB" ]]; then JOBS_PER_GPU=1
    elif [[ -n "${JOBS:-}" ]]; then JOBS_PER_GPU=$(( (JOBS + N_GPUS - 1) / N_GPUS ))
    else JOBS_PER_GPU=$(( FREE_MIB / JOB_MIB > 4 ? 4 : FREE_MIB / JOB_MIB ))
      (( JOBS_PER_GPU )) || JOBS_PER_GPU=1
    fi
  fi
  if [[ -n "$FREE_MIB" ]]; then
    SHARE_MIB=$(( FREE_MIB / JOBS_PER_GPU ))
    (( SHARE_MIB < 1024 )) || SHARE_MIB=$(( SHARE_MIB / 1024 * 1024 ))  # whole GiB: stable stamps
    (( SHARE_MIB )) || SHARE_MIB=1
    [[ -n "${FISHER_CHUNK:-}" ]] || FISHER+=(--memory-mib "$SHARE_MIB")
  fi
fi
JOBS=${JOBS:-$(( N_GPUS ? N_GPUS * JOBS_PER_GPU : CORES ))}

# The cells in the order the pool starts them: longest first (robust cells, then eps 0, whose
# training has no attack), so that every core stays busy until the end. CELL_ROW[name]: "seed
# norm eps checkpoint [model]", model a manifest's torchvision:NAME or package.module:function.
(( PUBLISHED )) || for s in $SEEDS; do for g in "${GRID[@]}"; do ROWS+=("$s $g"); done; done
CELLS=() PLAIN=()
declare -A CELL_ROW
for c in "${ROWS[@]}"; do
  read -r seed norm eps ckpt model <<< "$c"
  name=$(cell_name "$seed" "$norm" "$eps")
  CELL_ROW[$name]="$seed $norm $eps ${ckpt:-$OUT/$name/model.pt} $model"
  [[ "$eps" == 0 ]] && PLAIN+=("$name") || CELLS+=("$name")
done
CELLS+=("${PLAIN[@]}")

# step OUTPUT LOG UPSTREAM command...: the one skip-or-run. Skipped when OUTPUT exists and was
# made by this command (less the interpreter) after the same UPSTREAM (their commands, or "");
# with another command than the recorded one (or FORCE=1), RESTART (a resumable step's files)
# goes first. One line with the cell, the step, its time; on failure its last lines, exit 1.
# CHECKING=1: runs nothing, and adds the step to $INCOMPLETE when it would run.
RESTART=() CHECKING=0 INCOMPLETE=$OUT/incomplete.tsv
step() {
  local output=$1 log=$2 cmd="${*:5}" stamp t cell name
  stamp=$(dirname "$output")/.$(basename "$output").cmd
  cell=$(basename "$(dirname "$output")") name=$(basename "$output")
  [[ -z "$3" ]] || cmd+=$'\n'"after: $3"
  if (( CHECKING )); then
    [[ -f "$output" && -f "$stamp" && "$(< "$stamp")" == "$cmd" ]] ||
      printf '%s\t%s\t%s\n' "$cell" "${name%.json}" "${log#"$OUT/"}" >> "$INCOMPLETE"
    return
  fi
  if [[ "$FORCE" == 1 || ! -f "$stamp" || "$(< "$stamp")" != "$cmd" ]]; then
    rm -f "${RESTART[@]}"
  elif [[ -f "$output" ]]; then
    echo "[$((SECONDS - T0))s] $cell: skip $name (done with these settings)"
    return
  fi
  mkdir -p "$(dirname "$output")"
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
  step "$dir/metrics.json" "$dir/train.log" "" \
    "$PY" advtrain.py "${TRAIN[@]}" "${DATA[@]}" "$@" --device "$DEVICE" --out "$dir" --resume
}

# made_by DIR...: the training commands of the cells DIR, on which every step of a checkpoint
# trained here depends; nothing for a published one (its path is in the step's own command)
made_by() { (( PUBLISHED )) || for dir; do cat "$dir/.metrics.json.cmd" 2> /dev/null || :; done; }

# model_flags MODEL: a manifest's model as the scripts take it (--arch or --model), into MODEL
model_flags() {
  MODEL=()
  case $1 in
    "") ;;
    torchvision:*) MODEL=(--arch "$1") ;;
    *) MODEL=(--model "$1") ;;
  esac
}

# measure DIR CKPT NORM EPS SEED: train (or evaluate CKPT, built as MODEL), then Fisher, transfer
measure() {
  local dir=$1 ckpt=$2 trained
  if (( PUBLISHED )); then  # the --trained-* flags: what the published model was trained with
    step "$dir/metrics.json" "$dir/eval.log" "" "$PY" advtrain.py --eval-only --ckpt "$ckpt" \
      "${MODEL[@]}" "${EVAL[@]}" "${DATA[@]}" --trained-norm "$3" --trained-eps "$4" \
      --trained-seed "$5" "${UNSAFE[@]}" --device "$DEVICE" --out "$dir"
  else
    train "$dir" --norm "$3" --eps "$4" --seed "$5"
  fi
  trained=$(made_by "$dir")
  step "$dir/fisher.json" "$dir/fisher.log" "$trained" "$PY" fisher.py --ckpt "$ckpt" \
    "${MODEL[@]}" "${FISHER[@]}" "${DATA[@]}" "${UNSAFE[@]}" --device "$DEVICE" --out "$dir"
  step "$dir/transfer.json" "$dir/transfer.log" "$trained" "$PY" transfer.py --ckpt "$ckpt" \
    "${MODEL[@]}" "${TARGETS[@]}" "${DATA[@]}" "${UNSAFE[@]}" --seed "$5" --device "$DEVICE" \
    --out "$dir"
}

invert() {  # invert DIR CKPT: inversion of the cell's checkpoint, labelled by the judge (if any)
  step "$1/invert.json" "$1/invert.log" "$(made_by "$1" "$OUT/judge")" \
    "$PY" invert.py --ckpt "$2" "${MODEL[@]}" ${JUDGE_CKPT:+--judge "$JUDGE_CKPT"} \
    "${INVERT[@]}" "${DATA[@]}" "${UNSAFE[@]}" --device "$DEVICE" --out "$1"
}

report() {  # the steps that did not finish (failed, stopped, never run), then the report
  local task tasks=("${CELLS[@]}" "${CELLS[@]/#/invert:}")
  (( PUBLISHED )) || tasks=(judge "${tasks[@]}")
  : > "$INCOMPLETE"
  (CHECKING=1; for task in "${tasks[@]}"; do run_task "$task"; done)
  [[ ! -s "$INCOMPLETE" ]] || echo "[$((SECONDS - T0))s] did not finish:" \
    "$(cut -f1,2 "$INCOMPLETE" | tr '\t\n' ': ' | sed 's/ $//')" >&2
  "$PY" report.py "$OUT" 2>&1 | tee "$OUT/report.log" ||
    { echo "[$((SECONDS - T0))s] FAILED: report.py $OUT (above)" >&2; exit 1; }
}

run_task() {  # run_task NAME: one task of the plan (judge, a cell, invert:CELL or report)
  local seed norm eps ckpt model MODEL cell=${1#invert:}
  case $1 in
    judge) (( ! PUBLISHED )) || die "no judge is trained in preset $PRESET"
           train "$OUT/judge" "${JUDGE[@]}" --seed 100 ;;
    report) report ;;
    *) [[ -v "CELL_ROW[$cell]" ]] || die "no task '$1' in this study ($PRESET in $OUT," \
                                         "SEEDS '$SEEDS': --plan lists its tasks)"
       read -r seed norm eps ckpt model <<< "${CELL_ROW[$cell]}"
       model_flags "$model"
       if [[ "$1" == invert:* ]]; then invert "$OUT/$cell" "$ckpt"
       else measure "$OUT/$cell" "$ckpt" "$norm" "$eps" "$seed"; fi ;;
  esac
}

# plan: the study's tasks, STAGE<TAB>NAME<TAB>COMMAND a line, in dependency order. Each
# command runs one task through this script with the settings of this run, wherever it runs.
plan() {
  local v cmd python=$PY settings
  [[ "$PY" != */* ]] || python=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
  settings=(OUT="$OUT" SEEDS="$SEEDS" DEVICE="$DEVICE" THREADS="$THREADS" FORCE="$FORCE"
            PYTHON="$python")
  for v in DATA_DIR CKPT_DIR UNSAFE_LOAD TARGETS_LIST JOBS_PER_GPU FISHER_CHUNK; do
    [[ -z "${!v:-}" ]] || settings+=("$v=${!v}")
  done
  cmd=$(printf '%q ' env "${settings[@]}" bash "$ROOT/run_all.sh" "$PRESET" $SMOKE --task)
  (( PUBLISHED )) || printf '1\tjudge\t%sjudge\n' "$cmd"
  for v in "${CELLS[@]}"; do printf '1\t%s\t%s%s\n' "$v" "$cmd" "$v"; done
  for v in "${CELLS[@]}"; do printf '2\tinvert:%s\t%sinvert:%s\n' "$v" "$cmd" "$v"; done
  printf '3\treport\t%sreport\n' "$cmd"
}

if [[ "$ACTION" == task ]]; then
  run_task "$TASK"
  exit
fi
mkdir -p "$OUT"
logs=$(cd "$OUT" && pwd)/slurm
if [[ "$ACTION" == slurm && -s "$logs/jobs" ]]; then  # one submission at a time: one writer
  live=$(squeue -h -o %A -j "$(paste -sd, "$logs/jobs")" 2> /dev/null | sort -u | xargs) || :
  [[ -z "$live" ]] || die "jobs of this study are still queued or running: $live" \
                          "(squeue -j ${live// /,}); wait for them or scancel them, then resubmit"
fi
if [[ "$ACTION" == plan ]]; then
  "$PY" report.py --declare "$STUDY" "$OUT" "${REDECLARE[@]}" >&2
  plan | tee "$OUT/plan.tsv"
  exit
fi
"$PY" report.py --declare "$STUDY" "$OUT" "${REDECLARE[@]}"
plan > "$OUT/plan.tsv"
: > "$OUT/steps.tsv"

# submit: the plan as Slurm jobs, each task running its plan line (--plan-task); returns
if [[ "$ACTION" == slurm ]]; then
  command -v sbatch > /dev/null ||
    die "--slurm needs Slurm's sbatch on PATH (run it where you submit jobs)"
  mkdir -p "$logs"
  read -ra user_args <<< "${SBATCH_ARGS:-}"
  task=(--cpus-per-task "$THREADS")
  [[ "$DEVICE" == cpu ]] || task+=(--gres gpu:1)
  n=${#CELLS[@]} judge=""
  sb() {  # sb NAME KEY SBATCH_ARGS...: a job running the plan's task KEY; prints its id
    local id log=$logs/$1-%j.out
    [[ "$*" != *--array* ]] || log=$logs/$1-%A_%a.out
    id=$(sbatch --parsable --chdir "$ROOT" -J "$STUDY-$1" -o "$log" "${@:3}" \
         "${user_args[@]}" --wrap "$(printf '%q ' bash "$ROOT/run_all.sh" --plan-task \
                                     "$(dirname "$logs")/plan.tsv" "$2")") || exit 1
    echo "${id%%;*}"
  }
  (( PUBLISHED )) || judge=$(sb judge judge "${task[@]}")
  cells=$(sb cells 1 "${task[@]}" --array "1-$n")
  inversions=$(sb invert 2 "${task[@]}" --array "1-$n" --kill-on-invalid-dep yes \
               --dependency "aftercorr:$cells${judge:+,afterok:$judge}")
  report=$(sb report report --cpus-per-task 1 \
           --dependency "afterany:${judge:+$judge:}$cells:$inversions")
  printf '%s\n' $judge "$cells" "$inversions" "$report" > "$logs/jobs"
  echo "[$((SECONDS - T0))s] $PRESET: submitted ${judge:+the judge (job $judge), }$n cells" \
       "(array $cells), their inversions (array $inversions) and the report (job $report);" \
       "each task ${task[*]}${SBATCH_ARGS:+ $SBATCH_ARGS}"
  echo "follow: squeue -j $(paste -sd, "$logs/jobs"); logs in $logs; the report:" \
       "$OUT/report.md. Resubmit (the same command) to redo only what is missing or changed."
  exit
fi

# The local pool: at most JOBS jobs at once, each with THREADS torch threads (default 1). On
# the CPU outputs depend on THREADS (the order of float sums), never on JOBS: JOBS=1 and JOBS=4
# give identical files (on a GPU, kernels may sum in other orders whatever JOBS). With GPUs,
# JOBS_PER_GPU jobs on each (above).

# Each job runs one task in a process group of its own (job control, set -m), so stopping a
# job stops every process it started. A job that fails leaves $FAILED behind; the pool then
# stops the others and the study, as does an interrupt. On a GPU machine a job starts once a
# GPU runs fewer than JOBS_PER_GPU of the pool's jobs, on the GPU that runs the fewest at that
# moment (the first listed on a tie), the only one it sees.
set -m
FAILED=$OUT/.failed GPU_OF=()  # GPU_OF[process id of a running job]: its GPU, a GPU_LIST index
rm -f "$FAILED"
stop_jobs() {  # every running job, with all its processes
  local pid
  for pid in $(jobs -p); do kill -TERM -- "-$pid" 2> /dev/null || :; done
  wait || :
}
trap 'stop_jobs; echo "[$((SECONDS - T0))s] study stopped: interrupted" >&2; exit 130' INT
trap 'stop_jobs; echo "[$((SECONDS - T0))s] study stopped: terminated" >&2; exit 143' TERM
check_failed() {
  [[ -f "$FAILED" ]] || return 0
  stop_jobs
  echo "[$((SECONDS - T0))s] study stopped: a step failed (above)" >&2
  exit 1
}
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
launch() {  # launch TASK: run_task TASK in the background, once fewer than JOBS jobs run
  local gpu=""
  check_failed
  while (( $(jobs -rp | wc -l) >= JOBS )) || { (( N_GPUS )) && ! pick_gpu; }; do
    wait -n || :
    check_failed
  done
  if [[ -z "$gpu" ]]; then  # (a subshell: a failing step's exit ends it, not the `||`)
    ( run_task "$1" ) || touch "$FAILED" &
  else
    ( export CUDA_VISIBLE_DEVICES=${GPU_LIST[gpu]}; run_task "$1" ) || touch "$FAILED" &
    GPU_OF[$!]=$gpu
  fi
}

per_gpu=""
(( ! N_GPUS )) ||
  per_gpu=" (at most $JOBS_PER_GPU per GPU, $N_GPUS GPUs${SHARE_MIB:+, $SHARE_MIB MiB each})"
echo "[0s] $PRESET: ${#CELLS[@]} cells in $OUT on $DEVICE; judge ${JUDGE_CKPT:-none (no l2" \
     "checkpoint)}; $JOBS jobs at once$per_gpu, $THREADS torch thread(s) each"
# The plan's stages: the judge and each cell's job (train or evaluate, Fisher, transfer); each
# inversion once its cell's job and the judge's have ended (`wait` on their process ids); the
# report once every job has.
judge=()
(( PUBLISHED )) || { launch judge; judge=($!); }
pids=()
for c in "${CELLS[@]}"; do launch "$c"; pids+=($!); done
for i in "${!CELLS[@]}"; do
  wait "${judge[@]}" "${pids[i]}" || :
  launch "invert:${CELLS[i]}"
done
wait || :
check_failed
set +m
run_task report
printf 'total\tstudy\t%s\n' "$((SECONDS - T0))" >> "$OUT/steps.tsv"
echo "[$((SECONDS - T0))s] study done: $OUT/report.md"
