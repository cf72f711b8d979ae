#!/usr/bin/env bash
# Issue 12 in one device call (H200): the fine-grained baselines' step (PEER: 8 heads x 256 experts per token
# through the expert op; PKM: 4 heads x 1152 value rows, 32 micro-batches per step), with a kernel trace each,
# then the steady-state check (tokens/s at step ~200 against the first window) for small-dense and small.
# Results land in benchmarks/results/ and, when $OUT is set, there with the logs.
#
#   bash benchmarks/gpu_train_fine.sh
source "$(dirname "$0")/gpu_common.sh"
step train_step_fine 400 "$python" benchmarks/train_step.py \
    --presets small-peer,small-pkm --steps 50 --trace --timeout 190 --output train_step_fine.json
step train_step_steady 150 "$python" benchmarks/train_step.py \
    --presets small-dense,small --steps 50 --steady-steps 200 --timeout 70 --output train_step_steady.json
echo "== total $SECONDS s"
exit "$status"
