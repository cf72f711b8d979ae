#!/usr/bin/env bash
# The rows the full runs' budgets left out (issue 7) and the segment-pass probe's variations (issue 4), in
# two device calls of at most 10 minutes each (H100); `--combine` then merges the compare runs (no device).
#
#   bash benchmarks/gpu_fill.sh a   # segment probe; OmniMoE, PEER and PKM at T = 4096 against N, with the checks
#   bash benchmarks/gpu_fill.sh b   # the token points still missing; DeepSeekMoE and PKM trained to the end
#   bash benchmarks/gpu_fill.sh c   # PKM on the embedding_bag kernels: its gpu tests, latency, training
#   bash benchmarks/gpu_fill.sh d   # the segment probe again (no zero fills in its timed rungs); all the checks
# and then, on any machine (it measures nothing):
#   python benchmarks/compare.py --combine compare_peer,compare,compare_more,compare_nsweep,compare_fill,\
#       compare_pkm,compare_checks --only-from pkm=compare_pkm --only-from pkm=compare_checks --name compare_all
source "$(dirname "$0")/gpu_common.sh"
case "${1:-}" in
    a)
        step segment_probe 90 "$python" benchmarks/segment_probe.py --budget-s 60
        step compare_nsweep 500 "$python" benchmarks/compare.py --ffn omnimoe,peer-omni,pkm --tokens 4096 \
            --budget-s 430 --name compare_nsweep
        ;;
    b)
        step compare_fill 280 "$python" benchmarks/compare.py \
            --ffn pkm,peer-omni,deepseekmoe-capacity,peer-reference,deepseekmoe,deepseekmoe-matched \
            --tokens 1024,2048,8192,16384 --n-sweep none --no-checks --budget-s 215 --name compare_fill
        step quality_rest 320 "$python" benchmarks/quality.py --ffn deepseekmoe,pkm --budget-minutes 4.6 \
            --name quality_rest
        ;;
    c)
        step embedding_bag_gpu_tests 150 "$python" -m pytest -m gpu tests/test_embedding_bag.py -q -rfE \
            --durations=5 --junitxml="$logs/embedding_bag_gpu_tests.xml"
        step compare_pkm 240 "$python" benchmarks/compare.py --ffn pkm --no-checks --budget-s 180 --name compare_pkm
        step quality_pkm 200 "$python" benchmarks/quality.py --ffn pkm --budget-minutes 2.8 --name quality_pkm
        ;;
    d)
        step segment_probe 90 "$python" benchmarks/segment_probe.py --budget-s 60
        # The implementation-agreement checks (PKM's now on embedding_bag) with the one cheap row they need.
        step compare_checks 300 "$python" benchmarks/compare.py --ffn dense --tokens 4096 --n-sweep none \
            --budget-s 480 --name compare_checks
        ;;
    *)
        echo "usage: bash benchmarks/gpu_fill.sh a|b|c|d" >&2
        exit 2
        ;;
esac
echo "== total $SECONDS s"
exit "$status"
