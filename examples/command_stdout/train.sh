#!/usr/bin/env bash
# A non-Python program tuned by caviar: it reports by printing lines on stdout,
#   caviar-report step=N value=X   (every epoch; the worker stops it with SIGTERM when pruned)
#   caviar-result value=X          (once, at the end)
# Usage: train.sh LEARNING_RATE DECAY [EPOCHS]. The "model" is a toy: a loss that falls fastest
# near lr = 0.1 and decay = 0.5.
set -euo pipefail
lr=$1
decay=$2
epochs=${3:-10}
loss=1.0
for ((epoch = 0; epoch < epochs; epoch++)); do
  loss=$(awk -v l="$loss" -v lr="$lr" -v d="$decay" -v e="$epoch" 'BEGIN {
    gap = (log(lr) - log(0.1))^2 + 4 * (d - 0.5)^2
    printf "%.6f", l * (1 - 0.3 / (1 + gap)) + 0.01 * gap / (1 + e)
  }')
  echo "epoch $epoch loss $loss" >&2
  echo "caviar-report step=$epoch value=$loss"
  sleep "${EXAMPLE_EPOCH_S:-0.05}"
done
echo "caviar-result value=$loss"
