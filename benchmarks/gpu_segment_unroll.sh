#!/usr/bin/env bash
# One device call (H200, ~3-4 minutes) for the reductions body's fixed count of segments
# (kernel.UNROLLED_SEGMENTS): the expert op's segment gpu tests, the reductions bodies' bits among them
# (test_reductions_bodies_give_the_same_bits), then the reductions ladder with its "blocks, fixed count" rungs
# (results/segment_reductions_ladder.json; the prediction, revised after compiling, is in NOTES.md, "A fixed
# count of segments").
#
#   bash benchmarks/gpu_segment_unroll.sh
source "$(dirname "$0")/gpu_common.sh"
step gpu_tests_segment_unroll 150 "$python" -m pytest -m gpu -q -rfE tests/test_expert_gpu.py \
    -k "segment or reductions or bitwise"
step segment_reductions_ladder 200 "$python" benchmarks/segment_probe.py --reductions-ladder --budget-s 170
echo "== total $SECONDS s"
exit "$status"
