#!/usr/bin/env bash
# The README's example: four criteria pruning LeNet-300-100 at initialisation on Fashion-MNIST,
# at three sparsities, two seeds each (24 jobs, two at a time), then the report. About 5 minutes
# on 2 CPU cores. Writes multirun/readme/report.{md,csv,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf multirun/readme
.venv/bin/prunebench -m hydra/launcher=local hydra.launcher.n_jobs=2 \
  model=lenet300 dataset=fashion_mnist \
  criterion=magnitude,random,snip,grasp sparsity=0.5,0.9,0.98 seed=0,1 \
  train.pretrain_epochs=0 train.finetune_epochs=10 train.eval_every_epoch=false \
  hydra.sweep.dir=multirun/readme
.venv/bin/prunebench-report multirun/readme --log-density
cp multirun/readme/report.png scripts/readme_report.png   # the README shows these two
cp multirun/readme/report.md scripts/readme_report.md
