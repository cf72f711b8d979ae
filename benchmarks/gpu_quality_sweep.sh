#!/usr/bin/env bash
# Issue 13's quality sweep, one slice per device call (H200): the plan with what is recorded, then the next
# runs of benchmarks/quality_sweep.py that fit in BUDGET minutes (default 8: the call ends inside a 10-minute
# device limit, a run still going at the budget's end stopping itself with a checkpoint). Each run's record
# lands in benchmarks/results/quality_sweep/ and, when $OUT is set, in quality_sweep/ of $OUT/gpu_out.tgz
# (gpu_common.sh packs $OUT): unpack it and copy those into benchmarks/results/quality_sweep/ (and commit
# them) before the next slice, which skips them and resumes a stopped run while this machine still holds its
# directory under runs/.
#
#   BUDGET=8 bash benchmarks/gpu_quality_sweep.sh [more benchmarks/quality_sweep.py arguments]
source "$(dirname "$0")/gpu_common.sh"
step quality_sweep_plan 120 "$python" benchmarks/quality_sweep.py --list "$@"
step quality_sweep 580 "$python" benchmarks/quality_sweep.py --budget-minutes "${BUDGET:-8}" "$@"
echo "== total $SECONDS s"
exit "$status"
