#!/usr/bin/env bash
# One device call (H200, ~7 minutes) for issue 13's repeatability question (benchmarks/NOTES.md, "Slices
# 3-5": two runs of one seed ended 0.022 bits/byte apart): the sweep's dense configuration, 600 steps at lr
# 4e-3, twice under each XLA setting of benchmarks/repeatability.py, then OmniMoE's (the tables' learning
# rate x 3), 300 steps, default and both flags. results/repeatability_<ffn>.json.
#
#   bash benchmarks/gpu_repeatability.sh
source "$(dirname "$0")/gpu_common.sh"
step repeatability_dense 330 "$python" benchmarks/repeatability.py --ffn dense --steps 600
step repeatability_omnimoe 230 "$python" benchmarks/repeatability.py --ffn omnimoe --steps 300 \
    --settings "default,both" \
    --table_learning_rate_multiplier=3
echo "== total $SECONDS s"
exit "$status"
