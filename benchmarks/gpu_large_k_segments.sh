#!/usr/bin/env bash
# Issues 12 and 18 in one device call (H200), in order of what the next changes need:
#   1. the gpu tests of the two new kernel paths: the router at K > 1024 and its unsorted output, and the
#      segment pass's "reductions" sums;
#   2. small-omnimoe's step with the kernel router (K = 1280 ran the XLA path before;
#      results/train_step_omnimoe_split_k1280.json);
#   3. segment_sum "products" vs "reductions" at the training shapes and the paper's (segment_probe.py --sums),
#      which decides the expert op's default;
#   4. the router at K = 1280 / 2048 (router.py --large-k), which decides "auto"'s jax-triton rule there.
# Results land in benchmarks/results/ and, when $OUT is set, there with the logs.
#
#   bash benchmarks/gpu_large_k_segments.sh
source "$(dirname "$0")/gpu_common.sh"
step gpu_tests_large_k_segments 130 "$python" -m pytest -m gpu -q -rfE --durations=5 \
    tests/test_router_gpu.py tests/test_expert_gpu.py -k "1280 or 2048 or 4096 or unsorted or reductions"
step train_step_omnimoe_router_kernel 140 "$python" benchmarks/train_step.py --presets small-omnimoe --steps 10 \
    --trace --timeout 130 --output train_step_omnimoe_router_kernel.json
step segment_sums 170 "$python" benchmarks/segment_probe.py --sums --budget-s 120
step router_large_k 100 "$python" benchmarks/router.py --large-k --budget-s 50
echo "== total $SECONDS s"
exit "$status"
