#!/usr/bin/env bash
# Issue 12 in one device call (H200), after the expert op's heuristic took segment_sums="reductions" where a
# block meets few segments: the expert op's segment gpu tests (both modes, and the default at every gpu
# shape), then the step of `small` and `small-omnimoe` with the new default, against
# results/train_step_steady.json and results/train_step_omnimoe_router_kernel.json.
#
#   bash benchmarks/gpu_segment_default.sh
source "$(dirname "$0")/gpu_common.sh"
step gpu_tests_segment_sums 110 "$python" -m pytest -m gpu -q -rfE tests/test_expert_gpu.py -k "segment or reductions"
step train_step_segment_reductions 190 "$python" benchmarks/train_step.py --presets small,small-omnimoe --steps 50 \
    --trace --timeout 110 --output train_step_segment_reductions.json
echo "== total $SECONDS s"
exit "$status"
