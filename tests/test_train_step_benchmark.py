"""benchmarks/train_step.py's accounting of a traced step's kernels (the GPU run itself is not in the
default suite)."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import train_step  # benchmarks/ is a folder of scripts, not a package


def test_kernel_groups_account_for_every_kernel_once():
    kernels = {
        "omni_expert_segment_blocks": 5.0,
        "omni_expert_pair_dots": 1.0,
        "omni_router_backward": 2.0,
        "embedding_bag_combine": 0.5,
        "nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT": 3.0,
        "gemm_fusion_dot_363": 1.0,
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma": 1.5,
        "void cub::_V_300200::detail::radix_sort::DeviceRadixSortOnesweepKernel": 0.25,
        "loop_multiply_fusion_1": 0.75,
        "input_add_reduce_fusion_59": 0.5,
        "some_new_kernel": 0.125,
    }
    groups = train_step.kernel_groups(kernels)
    assert groups == {
        "expert op": 6.0,
        "matrix products": 4.0,
        "router": 2.0,
        "attention": 1.5,
        "XLA fusions": 1.25,
        "other Pallas kernels": 0.5,
        "sorts": 0.25,
        "other": 0.125,
    }
    assert list(groups) == sorted(groups, key=lambda g: -groups[g])  # largest first
    assert sum(groups.values()) == sum(kernels.values())
