#!/usr/bin/env bash
# Issues 12 and 18 in one device call of at most ~9.5 minutes (H200):
#   1. the router's `gpu` tests at K > 1024, of the unsorted output and of the factored backward;
#   2. the router benchmark with both backwards at K = 1280, 2048 (router.py --large-k) and at the paper's
#      setting (--paper): the timings that decide whether "factored" becomes the default;
#   3. small-flashmoe's step with the kernel router (unmeasured since the router took K > 1024).
# Results land in benchmarks/results/ and, when $OUT is set, there with the logs.
#
#   bash benchmarks/gpu_factored_presets.sh
source "$(dirname "$0")/gpu_common.sh"
step router_gpu_tests_factored 150 "$python" -m pytest -m gpu -q -rfE --durations=10 tests/test_router_gpu.py \
    -k "1280 or 2048 or 4096 or unsorted or factored"
step router_factored_large_k 150 "$python" benchmarks/router.py --large-k --backward onehot,factored \
    --budget-s 70 --output router_factored_large_k
step router_factored_paper 100 "$python" benchmarks/router.py --paper --backward onehot,factored \
    --budget-s 30 --output router_factored_paper
step train_step_flashmoe 170 "$python" benchmarks/train_step.py --presets small-flashmoe --steps 50 \
    --trace --timeout 160 --output train_step_flashmoe.json
echo "== total $SECONDS s"
exit "$status"
