#!/usr/bin/env bash
# Issue 3 on one GPU, in one go (~4-5 minutes on an H100): the router's native GPU tests (pallas with both
# step-1 methods, and jax-triton), then the router benchmark (with its tiling / step-1 sweep). Results land
# in benchmarks/results/ and, when $OUT is set, are copied there with the logs.
#
#   bash benchmarks/gpu_router.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
logs="${OUT:-benchmarks/results}"
mkdir -p "$logs" benchmarks/results
status=0

"${PYTHON:-python3}" -m pytest -m gpu tests/test_router_gpu.py -q -rfE --durations=10 2>&1 | tee "$logs/router_gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
# A failing test does not stop the timings: they still say where the time goes (each row says "exact").
"${PYTHON:-python3}" benchmarks/router.py --budget-s 150 2>&1 | tee "$logs/router.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit "$status"
