#!/usr/bin/env bash
# Issues 12 and 17 in one device call of at most ~10 minutes (H200), each part alone on the GPU:
#   1. FlashMoE's `gpu` tests;
#   2. the small dense and OmniMoE presets' step time, MFU and a kernel trace (benchmarks/train_step.py);
#   3. the matched MoE presets, few steps each (whether they fit, their step time and trace).
# Results land in benchmarks/results/ and, when $OUT is set, there with the logs.
#
#   bash benchmarks/gpu_train_step.sh
source "$(dirname "$0")/gpu_common.sh"
step gpu_tests_flashmoe 150 "$python" -m pytest -m gpu -q -rfE --durations=5 tests/test_flashmoe_gpu.py
step train_step_small 170 "$python" benchmarks/train_step.py --presets small-dense,small --steps 50 --trace \
    --timeout 80 --output train_step_small.json
step train_step_moe 280 "$python" benchmarks/train_step.py \
    --presets small-omnimoe,small-deepseekmoe,small-flashmoe --steps 10 --trace --timeout 90 \
    --output train_step_moe.json
echo "== total $SECONDS s"
exit "$status"
