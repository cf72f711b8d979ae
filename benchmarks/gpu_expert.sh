#!/usr/bin/env bash
# Issue 4 on one GPU, in one go (~6 minutes on an H100): the native kernel tests, then the op benchmark
# (with its per-kernel breakdown and block-size sweep), then the whole-layer benchmark. Results land in
# benchmarks/results/ and, when $OUT is set, are copied there with the logs.
#
#   bash benchmarks/gpu_expert.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
logs="${OUT:-benchmarks/results}"
mkdir -p "$logs" benchmarks/results
status=0

"${PYTHON:-python3}" -m pytest -m gpu tests/test_expert_gpu.py -q -rfE --durations=10 2>&1 | tee "$logs/expert_gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
# A failing test does not stop the timings: they still say where the time goes.
"${PYTHON:-python3}" benchmarks/experts.py --budget-s 150 2>&1 | tee "$logs/experts.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
"${PYTHON:-python3}" benchmarks/layer.py --budget-s 100 2>&1 | tee "$logs/layer.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit "$status"
