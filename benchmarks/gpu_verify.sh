#!/usr/bin/env bash
# Every GPU test and the segment probe, for one device call of at most 10 minutes (H100):
#   1. every `gpu`-marked test: the expert and embedding_bag tests (incl. the whole-layer gradient test) in
#      one process, the router and training tests in a second one beside it (compiling Triton kernels is
#      CPU work, and 16 cores idle while one pytest compiles), then the one test that times kernels, alone,
#      so that the other process cannot slow either side;
#   2. benchmarks/segment_probe.py: the backward's segment pass taken apart (issue 4).
# Results land in benchmarks/results/ and, when $OUT is set, are copied there with the logs.
#
#   bash benchmarks/gpu_verify.sh
source "$(dirname "$0")/gpu_common.sh"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # two test processes share the GPU's memory
timed_test="tests/test_router_gpu.py::test_auto_picks_the_measured_faster_kernel"
pytest_gpu=("$python" -m pytest -m gpu -q -rfE --durations=10)

step gpu_tests_experts 300 "${pytest_gpu[@]}" tests/test_expert_gpu.py tests/test_embedding_bag.py \
    --junitxml="$logs/gpu_tests_experts.xml" &
experts=$!
step gpu_tests_router_train 300 "${pytest_gpu[@]}" tests/test_router_gpu.py tests/test_train_gpu.py \
    --deselect "$timed_test" --junitxml="$logs/gpu_tests_router_train.xml" &
router_train=$!
wait "$experts" || status=1
wait "$router_train" || status=1
step gpu_test_timed 90 "${pytest_gpu[@]}" "$timed_test" --junitxml="$logs/gpu_test_timed.xml"
step segment_probe 150 "$python" benchmarks/segment_probe.py --budget-s 120
echo "== total $SECONDS s"
exit "$status"
