#!/usr/bin/env bash
# One device call of at most ~9.5 minutes (H200) for this session's kernel changes and the last unmeasured
# preset (issues 12 and 18):
#   1. the expert op's `gpu` tests of the segment pass (its row gather now issued before the numbering);
#   2. the router's `gpu` tests of the unsorted output, the factored backward and step 3's compaction;
#   3. the segment pass taken apart in reductions mode (segment_probe.py --reductions-ladder);
#   4. the router at the paper's setting (step 3 compacted; steps 1 and 3 timed apart);
#   5. the router's backward kernel alone at 4, 8 and 16 warps (why "factored" is slower at n = 256);
#   6. small-pkm's step with grad_accum="auto" (what the memory estimate picks, and its tokens/s and peak);
#   7. the whole layer against plain jnp (layer.py: the T = 4096 settings first, fresh on this GPU).
# Results land in benchmarks/results/ and, when $OUT is set, there with the logs.
#
#   bash benchmarks/gpu_kernels_pkm.sh
source "$(dirname "$0")/gpu_common.sh"
step expert_gpu_tests_segment 70 "$python" -m pytest -m gpu -q -rfE tests/test_expert_gpu.py -k "segment or bitwise"
step router_gpu_tests_compact 90 "$python" -m pytest -m gpu -q -rfE tests/test_router_gpu.py \
    -k "unsorted or factored or compact"
step segment_reductions_ladder 90 "$python" benchmarks/segment_probe.py --reductions-ladder --budget-s 70
step router_paper 70 "$python" benchmarks/router.py --paper --budget-s 30
step router_backward_warps 50 "$python" benchmarks/router.py --backward-warps --budget-s 30
step train_step_pkm_auto 130 "$python" benchmarks/train_step.py --presets small-pkm --steps 50 --trace \
    --timeout 120 --output train_step_pkm_auto.json
step layer 80 "$python" benchmarks/layer.py --budget-s 55
echo "== total $SECONDS s"
exit "$status"
