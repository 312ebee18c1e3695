#!/usr/bin/env bash
# Sets prunebench up in ./.venv: Fashion-MNIST from Debian when missing (and apt is usable),
# then PyTorch and the package with its dependencies. Safe to run again.
#   TORCH_SPEC   the torch/torchvision pins (default: the builds this project is tested with)
#   PYTHON       the interpreter for the virtual environment (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
PYTHON=${PYTHON:-python3}
FMNIST_DIR=/usr/share/datasets/fashion-mnist

if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's dataset-fashion-mnist"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "setup: could not install dataset-fashion-mnist; put the IDX files in data/ (see README)"
  else
    echo "setup: Fashion-MNIST not in $FMNIST_DIR and apt is not usable here (not root);"
    echo "       run 'sudo apt-get install dataset-fashion-mnist' or put the IDX files in data/"
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
echo "setup: installing $TORCH_SPEC"
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q $TORCH_SPEC
echo "setup: installing prunebench"
.venv/bin/python -m pip install -q -e '.[dev]'
.venv/bin/prunebench --help >/dev/null
echo "setup: done. Run: .venv/bin/prunebench   Tests: .venv/bin/pytest"
