#!/usr/bin/env bash
# Issue 18, the router at K > 1024, in one device call of at most ~9 minutes (H200):
#   1. the router's `gpu` tests at K > 1024 and of the unsorted output (sort_by_score=False);
#   2. the router benchmark at K = 1280, 2048, n = 256, 320, T = 4096, 32768, sorted and unsorted
#      (router.py --large-k -> results/router_large_k.json): the timings that decide "auto"'s rule;
#   3. small-omnimoe's step with the kernel router (K = 1280 was the XLA path before), to compare with
#      results/train_step_omnimoe_split_k1280.json.
# Results land in benchmarks/results/ and, when $OUT is set, there with the logs.
#
#   bash benchmarks/gpu_router_large_k.sh
source "$(dirname "$0")/gpu_common.sh"
step router_gpu_tests_large_k 150 "$python" -m pytest -m gpu -q -rfE --durations=10 tests/test_router_gpu.py \
    -k "1280 or 2048 or 4096 or unsorted"
step router_large_k 190 "$python" benchmarks/router.py --large-k --budget-s 100
step train_step_omnimoe_router_kernel 220 "$python" benchmarks/train_step.py --presets small-omnimoe --steps 10 \
    --trace --timeout 200 --output train_step_omnimoe_router_kernel.json
echo "== total $SECONDS s"
exit "$status"
