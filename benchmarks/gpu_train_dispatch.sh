#!/usr/bin/env bash
# Issue 12 in one device call (H200): the baseline presets' step after the coarse MoEs' dispatch moved to
# gathers only (no float scatter-add), with a kernel trace each; small-dense beside them as the reference.
# Results land in benchmarks/results/ and, when $OUT is set, there with the logs.
#
#   bash benchmarks/gpu_train_dispatch.sh
source "$(dirname "$0")/gpu_common.sh"
step train_step_dispatch 420 "$python" benchmarks/train_step.py \
    --presets small-dense,small-deepseekmoe,small-gshard,small-peer,small-pkm --steps 50 --trace --timeout 100 \
    --output train_step_dispatch.json
echo "== total $SECONDS s"
exit "$status"
