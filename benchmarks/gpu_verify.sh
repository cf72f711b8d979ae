#!/usr/bin/env bash
# What no GPU run has checked yet, in priority order, for one device call of at most 10 minutes (H100):
#   1. every `gpu`-marked test (router, experts incl. the whole-layer gradient test, training): ~5 min;
#      the expert tests last ran only 19 of 29 before their time ran out, and two router and one training
#      test were added or changed after the last GPU run;
#   2. the quality benchmark's OmniMoE row (it spent its whole share compiling last time), with dense as the
#      reference at the same settings.
# Results land in benchmarks/results/ and, when $OUT is set, are copied there with the logs.
#
#   bash benchmarks/gpu_verify.sh
source "$(dirname "$0")/gpu_common.sh"

step gpu_tests 330 "$python" -m pytest -m gpu tests/ -q -rfE --durations=15 --junitxml="$logs/gpu_tests.xml"
step quality 240 "$python" benchmarks/quality.py --ffn dense,omnimoe --budget-minutes 3.5 --steps 300
echo "== total $SECONDS s"
exit "$status"
