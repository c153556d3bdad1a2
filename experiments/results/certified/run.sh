#!/usr/bin/env bash
# Train and certify every variant of experiments/configs/certified_mnist5k.py (issue 27); run from the repository
# root. Each variant: `lcnn-jax train`, then `lcnn-jax certify` on the first 1000 official MNIST test images with
# APGD (CE and DLR, 100 steps each) at every radius; the JSON lands next to this script.
set -u
RADII=0.5,1.0,1.58
for v in "$@"; do
  wd=runs/certified/$v
  if [ ! -f "$wd/results.json" ]; then
    nice -n 5 lcnn-jax train --config "experiments/configs/certified_mnist5k.py:$v" --workdir "$wd" \
      --config.train.progress=False || { echo "train $v failed"; continue; }
  fi
  nice -n 5 lcnn-jax certify --workdir "$wd" --radii $RADII --test_data mnist --test_data_dir ../shared/data/mnist \
    --num_examples 1000 --attack apgd --out "experiments/results/certified/$v.json"
done
