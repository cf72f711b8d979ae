#!/usr/bin/env bash
# One device call (H200, ~7-8 minutes) for ExpertKernelConfig.segment_regather and the aligned chunks: the
# expert op's segment gpu tests (the two reductions bodies' bits among them), the segment pass's pieces in
# each sum mode at training's shapes and the paper's (results/segment_sums_regather.json; when it first ran,
# d_down's pass still regathered, which is why it no longer does), then the matched OmniMoE preset's step
# beside small-dense's (the heuristic sets segment_regather at its K = 1280; results/train_step_regather.json).
#
#   bash benchmarks/gpu_regather.sh
source "$(dirname "$0")/gpu_common.sh"
step gpu_tests_regather 150 "$python" -m pytest -m gpu -q -rfE tests/test_expert_gpu.py \
    -k "segment or reductions or regather"
step segment_sums 130 "$python" benchmarks/segment_probe.py --sums --budget-s 110 --name segment_sums_regather
step train_step_regather 290 "$python" benchmarks/train_step.py --presets small-omnimoe,small-dense --steps 50 \
    --trace --timeout 130 --output train_step_regather.json
echo "== total $SECONDS s"
exit "$status"
