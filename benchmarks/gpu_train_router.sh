#!/usr/bin/env bash
# Issues 12, 17 and 18 in one device call of at most ~7 minutes (H200):
#   1. beside each other: the router's and FlashMoE's `gpu` tests (no preallocation, so the two processes
#      share the GPU), and whether the small MoE presets fit (benchmarks/train_step.py, few steps: its
#      timings here run beside the tests and are not the presets' speed);
#   2. alone: the router benchmark at the paper's shape and its sweep (router.py --paper).
# Results land in benchmarks/results/ and, when $OUT is set, there with the logs.
#
#   bash benchmarks/gpu_train_router.sh
source "$(dirname "$0")/gpu_common.sh"
XLA_PYTHON_CLIENT_PREALLOCATE=false step gpu_tests_router_flashmoe 200 "$python" -m pytest -m gpu -q -rfE \
    --durations=10 tests/test_router_gpu.py tests/test_flashmoe_gpu.py &
tests=$!
XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 step train_step_fit 200 "$python" benchmarks/train_step.py \
    --presets small-omnimoe,small --steps 10 --timeout 90 --output train_step_fit.json
wait "$tests" || status=1
step router_paper 120 "$python" benchmarks/router.py --paper --budget-s 60
echo "== total $SECONDS s"
exit "$status"
