#!/usr/bin/env bash
# One device call (H200, ~3 minutes) for the segment pass's tiles in "reductions" (benchmarks/NOTES.md,
# "The segment pass's tiles"): the expert op's segment gpu tests, then `segment_probe.py --tiles` at
# training's three splits (results/segment_tiles.json).
#
#   bash benchmarks/gpu_segment_tiles.sh
source "$(dirname "$0")/gpu_common.sh"
step gpu_tests_segment 150 "$python" -m pytest -m gpu -q -rfE tests/test_expert_gpu.py -k "segment or reductions"
step segment_tiles 200 "$python" benchmarks/segment_probe.py --tiles --budget-s 170
echo "== total $SECONDS s"
exit "$status"
