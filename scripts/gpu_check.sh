#!/usr/bin/env bash
# What needs a GPU, in one script (about 5 minutes on one GPU; the CPU-side checks alone without one):
#   1. the device-discipline tests that need no GPU (tests/test_device.py)
#   2. the CUDA tests (tests/test_cuda.py: CIFAR-shaped augmented data, bf16 + channels_last, a
#      structured run with compaction and latency, SNIP and OBS scores against the CPU's, resume
#      across devices, the reinit's random streams)
#   3. the default run with device=cuda beside the same run on the CPU
#   4. a CIFAR-shaped ResNet-20 epoch: prunebench's fit() against a bare PyTorch loop on the same GPU
#      (target: within 1.5x), masked against dense, and the data path against a DataLoader
#   5. block-by-block SparseGPT of OPT-125M- and OPT-1.3B-shaped models (random float16 weights, 128
#      windows of 2048 tokens, as the paper): seconds per block and the peak allocated on the GPU
#      against the model's size (only one block is on the device at a time)
# and prints a short table at the end.
#
#   bash scripts/gpu_check.sh                 here or on a GPU machine (PYTHON: the interpreter to use)
#   bash scripts/gpu_check.sh --fetch-wheels  on a machine with PyPI: wheels of the pure-Python
#                                             dependencies into .whl/, for a GPU machine without network
set -uo pipefail
cd "$(dirname "$0")/.."

DEPS="hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 torch-pruning==1.6.1"
if [ "${1:-}" = "--fetch-wheels" ]; then
  python3 -m pip wheel -q --no-deps -w .whl $DEPS && python3 -m pip wheel -q -w .whl "transformers==5.24.0" && ls .whl
  exit
fi

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# a machine without prunebench installed: its dependencies from .whl/, the package from this tree
if ! "$PYTHON" -c "import hydra, omegaconf, torch_pruning" 2>/dev/null; then
  if [ -d .whl ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "gpu_check: hydra-core, omegaconf or torch-pruning missing; run 'bash scripts/gpu_check.sh --fetch-wheels' where PyPI is reachable"
    exit 1
  fi
fi
if ! "$PYTHON" -c "import prunebench.conf" 2>/dev/null; then
  ln -sfn ../conf prunebench/conf  # the installed package maps conf/ to prunebench.conf; a bare tree needs the link
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
WORK=$(mktemp -d)
declare -a TABLE

row() { TABLE+=("$1|$2"); }

echo "== 1. device discipline (no GPU needed)"
if "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_device.py; then row "device-discipline tests (CPU)" "passed"; else row "device-discipline tests (CPU)" "FAILED"; fi

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here: skipping the CUDA tests, the cuda run and the GPU epoch benchmark"
  row "GPU checks" "skipped: no CUDA device"
  printf '\n%-44s %s\n' "check" "result"; for r in "${TABLE[@]}"; do printf '%-44s %s\n' "${r%%|*}" "${r#*|}"; done
  exit 0
fi
"$PYTHON" -c "import torch; print('gpu:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| cuda', torch.version.cuda, '| cudnn', torch.backends.cudnn.version())"

echo "== 2. CUDA tests"
start=$(date +%s)
if timeout 300 "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py; then
  row "CUDA tests" "passed ($(( $(date +%s) - start )) s)"
else row "CUDA tests" "FAILED"; fi

echo "== 3. the default run, device=cuda and device=cpu"
DATA=()
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ ! -d data/FashionMNIST ]; then
  DATA=(dataset=synthetic "dataset.shape=[1,28,28]" dataset.num_train=60000 dataset.num_test=10000)
  echo "(no Fashion-MNIST here: the default recipe on synthetic data of its shape)"
fi
for dev in cuda cpu; do
  t0=$(date +%s%N)
  if timeout 240 "$PYTHON" -m prunebench.run "${DATA[@]}" device=$dev hydra.run.dir="$WORK/default_$dev" >"$WORK/default_$dev.log" 2>&1; then
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    acc=$("$PYTHON" -c "import json,sys; s=json.load(open(sys.argv[1])); f=s['final']; print(f\"test acc {f['test_acc']:.4f}, sparsity {f['sparsity']:.4f}\")" "$WORK/default_$dev/summary.json")
    row "default run, device=$dev" "$acc, $(( ms / 1000 )).$(( ms % 1000 / 100 )) s (with start-up)"
  else
    tail -5 "$WORK/default_$dev.log"; row "default run, device=$dev" "FAILED"
  fi
done

echo "== 4. CIFAR-shaped ResNet-20 epochs (prunebench vs a bare loop, masked vs dense, data path)"
if timeout 300 "$PYTHON" scripts/bench_train.py --model resnet20 --data cifar_shaped --images 20000 --repeats 3 \
     --workers 8 --device cuda | tee "$WORK/bench.log"; then
  while IFS='|' read -r label value; do row "resnet20, ratio $label" "$value"; done \
    < <(grep -E "/ " "$WORK/bench.log" | sed -E 's/^ +(.*[^ ]) {2,}([0-9.]+) *(.*)$/\1|\2 \3/')
else row "resnet20 epoch benchmark" "FAILED"; fi

echo "== 5. language models: block-by-block pruning memory and time"
if "$PYTHON" -c "import transformers" 2>/dev/null; then
  if timeout 420 "$PYTHON" scripts/bench_lm_memory.py --shape opt-125m opt-1.3b --dtype float16 --criterion sparsegpt \
       --samples 128 --seq-len 2048 --device cuda | tee "$WORK/lm.log"; then
    while read -r line; do row "LM ${line%% (*}" "${line#*: }"; done < <(grep -E "^opt" "$WORK/lm.log")
  else row "LM block-by-block benchmark" "FAILED"; fi
else row "LM block-by-block benchmark" "skipped: transformers not installed"; fi

printf '\n%-60s %s\n' "check" "result"
for r in "${TABLE[@]}"; do printf '%-60s %s\n' "${r%%|*}" "${r#*|}"; done
