#!/usr/bin/env bash
# What needs a GPU, in one script that runs on a bare GPU machine with no network (the wheels of
# what its image lacks travel in .whl/), within 8 minutes, and prints one table at the end: one row
# per check, pass / FAIL / skipped, with its figures. Each check is independent: one that fails or
# runs out of its time does not stop the others.
#
#   bash scripts/gpu_check.sh                 here or on a GPU machine (PYTHON: the interpreter to use;
#                                             default .venv/bin/python, else python3)
#   bash scripts/gpu_check.sh --out DIR       also write DIR/gpu_check_table.txt and DIR/gpu_check_logs.txt
#   bash scripts/gpu_check.sh --fetch-wheels  where PyPI is reachable: the wheels of what the GPU image lacks
#                                             into .whl/ (scripts/gpu_wheels.py; carry .whl to the machine)
#
# Setup: the packages the interpreter cannot import are installed from .whl/ into a folder of their
# own (pip --no-index --no-deps --target), each on its own; the image's packages are left as they
# are. Without an installed prunebench, the package is used from this tree (a copy with conf/ in it).
#
# Checks, in this order (CPU: runs without a GPU too; GPU: "skipped: no CUDA device" without one):
#   CPU  device-discipline tests (tests/test_device.py)
#   CPU  a tiny LLaMA-architecture LM, its tokenizer and corpus, built offline (scripts/tiny_lm.py),
#        and Wanda, SparseGPT and fine-tuning of it in float32: the references for the GPU's half
#        precision (with a GPU: in the background, on two cores, beside the GPU checks)
#   CPU  torchrun, 2 ranks, gloo: the collectives prunebench uses
#   GPU  torchrun, 2 ranks on one GPU (both on cuda:0): NCCL's collectives; if NCCL refuses two ranks
#        on one GPU, the runs below use gloo for CUDA tensors (scripts/gpu_ddp.py) and say so
#   GPU  torchrun, 2 ranks: ResNet-20 unstructured; and train.sync_bn=true with granularity=filter
#   GPU  the default recipe on the GPU: accuracy, and its sparse latency (latency.sparse=true, tf32 on)
#   GPU  sparse latency of LeNet-5 (convolutions through im2col) in a short unstructured run
#   GPU  Wanda and SparseGPT in float16 and bfloat16 against the float32 perplexities
#   GPU  LM fine-tuning in bfloat16 (train.finetune_epochs=1 model.dtype=bfloat16) against float32's
#   GPU  a tiny Mixtral (built on the CPU beside the LM): Wanda over every expert, and REAP removing a
#        quarter of the experts, in bfloat16 against float32
#   GPU  the CUDA tests (tests/test_cuda.py)
#   CPU  the default recipe on the CPU, beside the GPU's (only with a GPU)
#   GPU  a CIFAR-shaped ResNet-20 epoch: prunebench's fit() against a bare PyTorch loop (target 1.5x)
#   GPU  block-by-block SparseGPT of an OPT-125M-shaped model (random float16 weights, 128 x 2048
#        tokens): seconds per block and peak GPU memory against the model's size
# GPU_CHECK_SECONDS (default 450) bounds the whole script: each check runs under `timeout` with
# its own budget, cut to what is left; a check with too little left is skipped and says so.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD

OUT_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --fetch-wheels) exec python3 scripts/gpu_wheels.py fetch --dir .whl ;;
    --out) [ $# -ge 2 ] || { echo "gpu_check: --out needs a folder" >&2; exit 2; }; OUT_DIR=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

TOTAL=${GPU_CHECK_SECONDS:-450}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOGS=$WORK/logs
mkdir -p "$LOGS"
declare -a TABLE

row() { TABLE+=("$1|$2|${3:-}"); }  # check | result | figures
left() { echo $(( TOTAL - SECONDS )); }

print_table() {
  local r check rest result figures
  printf '\n%-50s %-8s %s\n' "check" "result" "figures"
  for r in "${TABLE[@]}"; do
    check=${r%%|*}; rest=${r#*|}; result=${rest%%|*}; figures=${rest#*|}
    printf '%-50s %-8s %s\n' "$check" "$result" "$figures"
  done
}

finish() {
  print_table | tee "$WORK/table.txt"
  if [ -n "$OUT_DIR" ]; then
    mkdir -p "$OUT_DIR" && cp "$WORK/table.txt" "$OUT_DIR/gpu_check_table.txt" &&
      for f in "$LOGS"/*.log; do [ -e "$f" ] && printf '\n===== %s\n' "${f##*/}" && cat "$f"; done \
        >"$OUT_DIR/gpu_check_logs.txt"
  fi
  echo "(logs: $LOGS; $(( SECONDS )) s in all)"
}

# step NAME SECONDS CMD...: CMD under `timeout`, output in $LOGS/NAME.log (echoed when it fails).
# Returns CMD's status; 124 when it ran out of time; 125 when too little of the budget was left.
step() {
  local name=$1 budget=$2; shift 2
  local have; have=$(left)
  (( have - 5 < budget )) && budget=$(( have - 5 ))
  if (( budget < 10 )); then echo "== $name: skipped (out of the ${TOTAL} s budget)"; return 125; fi
  echo "== $name (at most $budget s)"
  local t0=$SECONDS rc
  timeout -k 15 "$budget" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  STEP_SECONDS=$(( SECONDS - t0 ))
  if (( rc != 0 )); then
    echo "-- $name: exit $rc after $STEP_SECONDS s; the log's end:"
    tail -n 15 "$LOGS/$name.log" | sed 's/^/   /'
  fi
  return $rc
}

# the row of a check whose command failed, from its status
failed_row() {  # CHECK RC [LOGNAME]
  case $2 in
    124|137) row "$1" "FAIL" "timed out after ${STEP_SECONDS} s" ;;
    125) row "$1" "skipped" "out of the ${TOTAL} s budget" ;;
    *) local why
       why=$(grep -E -m1 '^(error|Error|[A-Za-z.]*(Error|Exception)):' "$LOGS/${3:-x}.log" 2>/dev/null)
       [ -n "$why" ] || why=$(grep -v '^ *$' "$LOGS/${3:-x}.log" 2>/dev/null | tail -n 1)
       row "$1" "FAIL" "exit $2: $(cut -c1-150 <<<"$why")" ;;
  esac
}

# needs MODULE...: whether the interpreter imports them (else a reason in $MISSING)
needs() {
  MISSING=""
  local m
  for m in "$@"; do "$PYTHON" -c "import $m" >/dev/null 2>&1 || MISSING+="${MISSING:+, }$m"; done
  [ -z "$MISSING" ]
}

# ------------------------------------------------------------------------------------------ setup
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import torch" >"$LOGS/setup_torch.log" 2>&1; then
  cat "$LOGS/setup_torch.log"
  row "setup: torch" "FAIL" "$PYTHON cannot import torch: nothing can be checked"
  finish; exit 1
fi
"$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda',
torch.version.cuda, '| gpu:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')" | tee "$LOGS/setup_versions.log"
row "setup: interpreter" "pass" "$(cat "$LOGS/setup_versions.log")"

SITE=$WORK/site
if ! "$PYTHON" -c "import hydra, omegaconf, torch_pruning, datasets" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "== setup: the packages this interpreter lacks, from .whl/"
    "$PYTHON" scripts/gpu_wheels.py install --dir .whl --target "$SITE" 2>&1 | tee "$LOGS/setup_wheels.log"
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    if grep -q FAILED "$LOGS/setup_wheels.log"; then
      row "setup: wheels from .whl/" "FAIL" "$(grep FAILED "$LOGS/setup_wheels.log" | awk '{print $1}' | paste -sd, -) failed (see above); the checks that need them say so"
    else
      row "setup: wheels from .whl/" "pass" "installed: $(grep -E ' installed ' "$LOGS/setup_wheels.log" | awk '{print $1"=="$3}' | paste -sd' ' -)"
    fi
  else
    row "setup: wheels from .whl/" "FAIL" "no .whl/ here: run 'bash scripts/gpu_check.sh --fetch-wheels' where PyPI is reachable and carry .whl"
  fi
fi
if ! "$PYTHON" -c "import prunebench.conf" 2>/dev/null; then
  # a tree without an installed prunebench: a copy of the package with conf/ inside it, as installed
  mkdir -p "$WORK/src" && cp -r prunebench "$WORK/src/" && rm -rf "$WORK/src/prunebench/conf" &&
    cp -r conf "$WORK/src/prunebench/conf" && find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
  export PYTHONPATH=$WORK/src${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HOME=$WORK/hf TOKENIZERS_PARALLELISM=false
export PRUNEBENCH_DATA_DIR=${PRUNEBENCH_DATA_DIR:-$ROOT/data}
# from here on in $WORK: `python -m` puts the current folder first on sys.path, where the tree's
# prunebench (without conf/) would shadow the copy
cd "$WORK" || exit 1
PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" -c "$ROOT/pyproject.toml")
if "$PYTHON" -c "import prunebench.cli" >"$LOGS/setup_import.log" 2>&1; then
  row "setup: import prunebench" "pass" "$("$PYTHON" -c "import prunebench, os; print(os.path.dirname(prunebench.__file__))")"
else
  tail -3 "$LOGS/setup_import.log"
  row "setup: import prunebench" "FAIL" "$(tail -1 "$LOGS/setup_import.log" | cut -c1-150)"
fi
CUDA=0
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && CUDA=1
(( CUDA )) || echo "gpu_check: no CUDA device here: the GPU checks are skipped"
NO_GPU="no CUDA device"
PB=("$PYTHON" -m prunebench)
TORCHRUN=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2)

# ------------------------------------------------------------------------ 1. device discipline (CPU)
name="device-discipline tests (CPU)"
if needs pytest hydra; then
  if step device_tests 90 "${PYTEST[@]}" "$ROOT/tests/test_device.py"; then
    row "$name" "pass" "$(grep -E -o '[0-9]+ passed[^=]*' "$LOGS/device_tests.log" | tail -1 | sed 's/ *$//'), ${STEP_SECONDS} s"
  else failed_row "$name" $? device_tests; fi
else row "$name" "skipped" "missing: $MISSING"; fi

# -------------------------------------------- 2. language models on the CPU, in the background
# The tiny LM and its float32 runs (the references of the GPU's half precision) need no GPU: with
# one, they run beside the GPU checks below on two cores, and the LM checks on the GPU wait.
LM=$WORK/tiny_lm
LM_ARGS=(model=hf_causal_lm "model.name=$LM/model" dataset=text "dataset.path=$LM/corpus.txt" dataset.seq_len=64
         calibration.samples=16 "data_dir=$WORK/data")
FT=(criterion=magnitude sparsity=0.5 recovery=full recovery.epochs=1 recovery.lr=2e-5)
WIDTH=(criterion=flap granularity=width sparsity=0.35 latency.repeats=3)  # structured: removed, saved, timed
MOE=$WORK/tiny_moe  # a mixture of experts: fused 3-D expert weights
MOE_ARGS=(model=hf_causal_lm "model.name=$MOE/model" dataset=text "dataset.path=$MOE/corpus.txt" dataset.seq_len=64
          calibration.samples=16 "data_dir=$WORK/data")
MOE_CHECKS=("moe|criterion=wanda sparsity=0.5|Wanda 50% of every expert" \
            "experts|criterion=reap granularity=experts sparsity=0.25 latency.repeats=2|REAP removes 25% of the experts")

# lm_run LOGNAME DEVICE ARGS...: a language-model run; its summary in $WORK/LOGNAME
lm_run() {
  local log=$1 dev=$2; shift 2
  step "$log" 90 "${PB[@]}" "${LM_ARGS[@]}" "device=$dev" "hydra.run.dir=$WORK/$log" "$@"
}

lm_on_the_cpu() {  # in a subshell: its rows go to $WORK/lm_rows
  TABLE=()
  local name="tiny LM built offline (CPU)" crit figures r
  if needs transformers tokenizers; then
    if step tiny_lm 120 "$PYTHON" "$ROOT/scripts/tiny_lm.py" "$LM" --arch llama --sentences 3000 --steps 150 --width 64 \
         --heads 8 --kv-heads 2
    then
      row "$name" "pass" "$(grep -o 'llama, [0-9,]* parameters, last training loss [0-9.]*' "$LOGS/tiny_lm.log"), ${STEP_SECONDS} s"
    else failed_row "$name" $? tiny_lm; fi
  else row "$name" "skipped" "missing: $MISSING"; fi
  lm_ready
  for crit in wanda sparsegpt; do
    name="LM $crit 50%, float32 (CPU reference)"
    if (( ! HAVE_LM )); then row "$name" "skipped" "$LM_WHY"; continue; fi
    if lm_run "lm_${crit}_fp32" cpu "criterion=$crit" sparsity=0.5 model.dtype=float32; then
      figures=$("$PYTHON" "$ROOT/scripts/gpu_summary.py" lm "$WORK/lm_${crit}_fp32" --sparsity 0.5) && r=pass || r=FAIL
      row "$name" "$r" "$figures"
    else failed_row "$name" $? "lm_${crit}_fp32"; fi
  done
  name="LM width FLAP 35%, float32 (CPU reference)"
  if (( ! HAVE_LM )); then row "$name" "skipped" "$LM_WHY"
  elif lm_run lm_width_fp32 cpu "${WIDTH[@]}" model.dtype=float32; then
    figures=$("$PYTHON" "$ROOT/scripts/gpu_summary.py" structured "$WORK/lm_width_fp32") && r=pass || r=FAIL
    row "$name" "$r" "$figures"
  else failed_row "$name" $? lm_width_fp32; fi
  name="LM fine-tuning 1 epoch, float32 (CPU reference)"
  if (( ! HAVE_LM )); then row "$name" "skipped" "$LM_WHY"
  elif lm_run lm_ft_fp32 cpu "${FT[@]}" model.dtype=float32; then
    figures=$("$PYTHON" "$ROOT/scripts/gpu_summary.py" finetune "$WORK/lm_ft_fp32" --sparsity 0.5) && r=pass || r=FAIL
    row "$name" "$r" "$figures"
  else failed_row "$name" $? lm_ft_fp32; fi
  moe_on_the_cpu
  printf '%s\n' "${TABLE[@]}" >"$WORK/lm_rows"
}

# moe_check KIND DEVICE DTYPE: the MOE_CHECKS entry KIND run there, its row added (GPU: against the CPU's float32)
moe_check() {
  local kind=$1 dev=$2 dtype=$3 entry args what name figures r ref=()
  for entry in "${MOE_CHECKS[@]}"; do [ "${entry%%|*}" = "$kind" ] && break; done
  args=${entry#*|}; what=${args#*|}; args=${args%%|*}
  name="MoE $what, $dtype ($([ "$dev" = cpu ] && echo "CPU reference" || echo GPU))"
  if [ "$dev" = cuda ] && (( ! CUDA )); then row "$name" "skipped" "$NO_GPU"; return; fi
  if [ ! -f "$MOE/model/config.json" ]; then row "$name" "skipped" "no tiny MoE (its build did not finish)"; return; fi
  [ "$dev" = cuda ] && ref=(--ref "$WORK/moe_${kind}_float32")
  # shellcheck disable=SC2086  # the entry's options are words
  if step "moe_${kind}_$dtype" 90 "${PB[@]}" "${MOE_ARGS[@]}" "device=$dev" "hydra.run.dir=$WORK/moe_${kind}_$dtype" \
       $args "model.dtype=$dtype"; then
    figures=$("$PYTHON" "$ROOT/scripts/gpu_summary.py" "$kind" "$WORK/moe_${kind}_$dtype" "${ref[@]}") && r=pass || r=FAIL
    row "$name" "$r" "$figures"
  else failed_row "$name" $? "moe_${kind}_$dtype"; fi
}

moe_on_the_cpu() {
  local name="tiny MoE (Mixtral, 8 experts, top-2) built offline (CPU)"
  if (( ! HAVE_LM )); then row "$name" "skipped" "$LM_WHY"; return; fi
  if step tiny_moe 60 "$PYTHON" "$ROOT/scripts/tiny_lm.py" "$MOE" --arch mixtral --sentences 1500 --steps 60 --width 32 \
       --layers 2 --kv-heads 2
  then row "$name" "pass" "$(grep -o 'mixtral, [0-9,]* parameters' "$LOGS/tiny_moe.log"), ${STEP_SECONDS} s"
  else failed_row "$name" $? tiny_moe; return; fi
  moe_check moe cpu float32
  moe_check experts cpu float32
}

lm_ready() {  # HAVE_LM=1 when the tiny LM is there and the LM runs can import what they need
  HAVE_LM=0; LM_WHY="no tiny LM (its build did not finish)"
  if [ -f "$LM/model/config.json" ]; then
    if needs hydra datasets; then HAVE_LM=1; else LM_WHY="missing: $MISSING"; fi
  fi
}

if (( CUDA )); then
  OMP_NUM_THREADS=2 lm_on_the_cpu >"$LOGS/lm_on_the_cpu.out" 2>&1 &  # tiny models: more threads only add overhead
  LM_PID=$!
  echo "== the tiny LM and its float32 runs on the CPU, in the background (pid $LM_PID)"
else
  lm_on_the_cpu
  LM_PID=""
fi

# ------------------------------------------------------------------ 3. two processes under torchrun
name="torchrun 2 ranks, gloo collectives (CPU)"
if step ddp_probe_gloo 60 env CUDA_VISIBLE_DEVICES= "${TORCHRUN[@]}" "$ROOT/scripts/gpu_ddp.py" probe --backend gloo; then
  row "$name" "pass" "$(grep -o 'probe ok: .*' "$LOGS/ddp_probe_gloo.log" | cut -c11-)"
else failed_row "$name" $? ddp_probe_gloo; fi

DDP_VIA=()  # how the prunebench runs below start: -m prunebench (NCCL), or gpu_ddp.py run with gloo
DDP_NOTE=""
name="torchrun 2 ranks on one GPU, NCCL (GPU)"
if (( ! CUDA )); then row "$name" "skipped" "$NO_GPU"
else
  if step ddp_probe_nccl 60 "${TORCHRUN[@]}" "$ROOT/scripts/gpu_ddp.py" probe --backend nccl; then
    row "$name" "pass" "$(grep -o 'probe ok: .*' "$LOGS/ddp_probe_nccl.log" | cut -c11-)"
    DDP_VIA=(-m prunebench)
  else
    rc=$?
    why=$(grep -o 'probe FAILED: .*' "$LOGS/ddp_probe_nccl.log" | head -1 | cut -c15-)
    if [ -n "$why" ]; then row "$name" "FAIL" "$why"; else failed_row "$name" $rc ddp_probe_nccl; fi
    name="torchrun 2 ranks on one GPU, gloo for CUDA (GPU)"
    if step ddp_probe_gloo_cuda 60 "${TORCHRUN[@]}" "$ROOT/scripts/gpu_ddp.py" probe --backend gloo; then
      row "$name" "pass" "$(grep -o 'probe ok: .*' "$LOGS/ddp_probe_gloo_cuda.log" | cut -c11-); the runs below use it"
      DDP_VIA=("$ROOT/scripts/gpu_ddp.py" run --backend "cpu:gloo,cuda:gloo" --)
      DDP_NOTE=" [gloo: NCCL refused]"
    else failed_row "$name" $? ddp_probe_gloo_cuda; fi
  fi
fi

DDP_DATA=(dataset=synthetic "dataset.shape=[3,32,32]" dataset.num_train=2048 dataset.num_test=512 train.batch_size=128
          train.pretrain_epochs=1 train.finetune_epochs=1 latency.repeats=0 device=cuda model=resnet20)
ddp_check() {  # NAME LOGNAME [SUMMARY OPTIONS...] -- PRUNEBENCH ARGS...
  local name=$1 log=$2; shift 2
  local opts=()
  while [ "$1" != "--" ]; do opts+=("$1"); shift; done; shift
  if (( ! CUDA )); then row "$name" "skipped" "$NO_GPU"; return; fi
  if (( ${#DDP_VIA[@]} == 0 )); then row "$name" "skipped" "no backend for 2 ranks on this GPU (see above)"; return; fi
  if step "$log" 120 "${TORCHRUN[@]}" "${DDP_VIA[@]}" "${DDP_DATA[@]}" "hydra.run.dir=$WORK/$log" "$@"; then
    figures=$("$PYTHON" "$ROOT/scripts/gpu_summary.py" image "$WORK/$log" --processes 2 "${opts[@]}") && r=pass || r=FAIL
    row "$name" "$r" "$figures$DDP_NOTE"
  else
    local rc=$?
    failed_row "$name" $rc "$log"
    local why; why=$(grep -E -m1 -o '(DistributedError|error): .*' "$LOGS/$log.log" | cut -c1-150)
    [ -n "$why" ] && TABLE[-1]="$name|FAIL|$why$DDP_NOTE"
  fi
}
ddp_check "torchrun 2 ranks: ResNet-20 unstructured (GPU)" ddp_unstructured --sparsity 0.9 --
ddp_check "torchrun 2 ranks: sync_bn, filter pruning (GPU)" ddp_sync_bn -- \
  train.sync_bn=true granularity=filter criterion.scope=layer sparsity=0.5

# --------------------------------------------------------- 4. unstructured runs and sparse latency
DATA=()
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ ! -d "$PRUNEBENCH_DATA_DIR/FashionMNIST" ]; then
  DATA=(dataset=synthetic "dataset.shape=[1,28,28]" dataset.num_train=60000 dataset.num_test=10000)
  echo "(no Fashion-MNIST here: the default recipe runs on synthetic data of its shape)"
fi
name="default recipe, device=cuda"
if (( ! CUDA )); then
  row "$name" "skipped" "$NO_GPU"
  row "sparse latency, LeNet-300-100 (default run)" "skipped" "$NO_GPU"
elif step default_cuda 120 "${PB[@]}" "${DATA[@]}" device=cuda "hydra.run.dir=$WORK/default_cuda"; then
  figures=$("$PYTHON" "$ROOT/scripts/gpu_summary.py" image "$WORK/default_cuda") && r=pass || r=FAIL
  row "$name" "$r" "$figures"
  figures=$("$PYTHON" "$ROOT/scripts/gpu_summary.py" sparse "$WORK/default_cuda") && r=pass || r=FAIL
  row "sparse latency, LeNet-300-100 (default run)" "$r" "$figures"
else
  rc=$?
  failed_row "$name" $rc default_cuda
  row "sparse latency, LeNet-300-100 (default run)" "FAIL" "the run did not finish (above)"
fi

name="sparse latency, LeNet-5 convolutions (GPU)"
if (( ! CUDA )); then row "$name" "skipped" "$NO_GPU"
elif step sparse_lenet5 90 "${PB[@]}" model=lenet5 dataset=synthetic "dataset.shape=[1,28,28]" dataset.num_train=4096 \
       dataset.num_test=1024 train.pretrain_epochs=1 train.finetune_epochs=1 "latency.batch_sizes=[1,128]" \
       device=cuda "hydra.run.dir=$WORK/sparse_lenet5"; then
  figures=$("$PYTHON" "$ROOT/scripts/gpu_summary.py" sparse "$WORK/sparse_lenet5" --sparsity 0.9) && r=pass || r=FAIL
  row "$name" "$r" "$figures"
else failed_row "$name" $? sparse_lenet5; fi

# -------------------------------------------------- 5. language models in half precision on the GPU
if [ -n "$LM_PID" ]; then
  echo "== waiting for the CPU's language-model runs (pid $LM_PID)"
  wait "$LM_PID"
  cat "$LOGS/lm_on_the_cpu.out"
  [ -f "$WORK/lm_rows" ] && mapfile -t -O "${#TABLE[@]}" TABLE <"$WORK/lm_rows"
fi
lm_ready
for crit in wanda sparsegpt; do
  for dtype in float16 bfloat16; do
    name="LM $crit 50%, $dtype (GPU)"
    if (( ! CUDA )); then row "$name" "skipped" "$NO_GPU"; continue; fi
    if (( ! HAVE_LM )); then row "$name" "skipped" "$LM_WHY"; continue; fi
    if lm_run "lm_${crit}_${dtype}" cuda "criterion=$crit" sparsity=0.5 "model.dtype=$dtype"; then
      figures=$("$PYTHON" "$ROOT/scripts/gpu_summary.py" lm "$WORK/lm_${crit}_${dtype}" --ref "$WORK/lm_${crit}_fp32" \
                --sparsity 0.5) && r=pass || r=FAIL
      row "$name" "$r" "$figures"
    else failed_row "$name" $? "lm_${crit}_${dtype}"; fi
  done
done
name="LM width FLAP 35%, bfloat16 (GPU)"
if (( ! CUDA )); then row "$name" "skipped" "$NO_GPU"
elif (( ! HAVE_LM )); then row "$name" "skipped" "$LM_WHY"
elif lm_run lm_width_bf16 cuda "${WIDTH[@]}" model.dtype=bfloat16; then
  figures=$("$PYTHON" "$ROOT/scripts/gpu_summary.py" structured "$WORK/lm_width_bf16" --ref "$WORK/lm_width_fp32") \
    && r=pass || r=FAIL
  row "$name" "$r" "$figures"
else failed_row "$name" $? lm_width_bf16; fi
for kind in moe experts; do moe_check "$kind" cuda bfloat16; done
name="LM fine-tuning 1 epoch, bfloat16 (GPU)"
if (( ! CUDA )); then row "$name" "skipped" "$NO_GPU"
elif (( ! HAVE_LM )); then row "$name" "skipped" "$LM_WHY"
elif lm_run lm_ft_bf16 cuda "${FT[@]}" model.dtype=bfloat16; then
  figures=$("$PYTHON" "$ROOT/scripts/gpu_summary.py" finetune "$WORK/lm_ft_bf16" --ref "$WORK/lm_ft_fp32" --sparsity 0.5) \
    && r=pass || r=FAIL
  row "$name" "$r" "$figures"
else failed_row "$name" $? lm_ft_bf16; fi

# ------------------------------------------------------------------------------------ 6. CUDA tests
name="CUDA tests (tests/test_cuda.py)"
if (( ! CUDA )); then row "$name" "skipped" "$NO_GPU"
elif step cuda_tests 150 "${PYTEST[@]}" -m cuda "$ROOT/tests/test_cuda.py"; then
  row "$name" "pass" "$(grep -E -o '[0-9]+ passed[^=]*' "$LOGS/cuda_tests.log" | tail -1 | sed 's/ *$//'), ${STEP_SECONDS} s"
else
  rc=$?
  failed_row "$name" $rc cuda_tests
  summary=$(grep -E -o '[0-9]+ failed[^=]*' "$LOGS/cuda_tests.log" | tail -1)
  [ -n "$summary" ] && TABLE[-1]="$name|FAIL|$summary; $(grep -E '^FAILED' "$LOGS/cuda_tests.log" | sed 's/^FAILED tests\/test_cuda.py:://; s/ - .*//' | paste -sd' ' - | cut -c1-200)"
fi

# ---------------------------------------------------------------- 7. the default recipe on the CPU
name="default recipe, device=cpu (beside the GPU's)"
if (( ! CUDA )); then row "$name" "skipped" "$NO_GPU (the comparison needs the GPU run)"
elif step default_cpu 120 "${PB[@]}" "${DATA[@]}" device=cpu latency.sparse=false "hydra.run.dir=$WORK/default_cpu"; then
  figures=$("$PYTHON" "$ROOT/scripts/gpu_summary.py" image "$WORK/default_cpu") && r=pass || r=FAIL
  row "$name" "$r" "$figures"
else failed_row "$name" $? default_cpu; fi

# --------------------------------------------------------------------------------- 8. benchmarks
name="ResNet-20 epoch benchmark (GPU)"
if (( ! CUDA )); then row "$name" "skipped" "$NO_GPU"
elif step bench_train 100 "$PYTHON" "$ROOT/scripts/bench_train.py" --model resnet20 --data cifar_shaped --images 10000 \
       --repeats 2 --workers 8 --device cuda; then
  while IFS='|' read -r label value; do row "resnet20, ratio $label" "pass" "$value"; done \
    < <(grep -E "/ " "$LOGS/bench_train.log" | sed -E 's/^ +(.*[^ ]) {2,}([0-9.]+) *(.*)$/\1|\2 \3/')
else failed_row "$name" $? bench_train; fi

name="LM block-by-block SparseGPT, OPT-125M shape (GPU)"
if (( ! CUDA )); then row "$name" "skipped" "$NO_GPU"
elif ! needs transformers; then row "$name" "skipped" "missing: $MISSING"
elif step bench_lm 120 "$PYTHON" "$ROOT/scripts/bench_lm_memory.py" --shape opt-125m --dtype float16 --criterion sparsegpt \
       --samples 128 --seq-len 2048 --device cuda; then
  row "$name" "pass" "$(grep -E '^opt' "$LOGS/bench_lm.log" | sed 's/^[^:]*: //' | cut -c1-200)"
else failed_row "$name" $? bench_lm; fi

finish
