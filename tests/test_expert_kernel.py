"""omni_expert's Pallas kernels on the CPU: interpret mode against the reference, and lowering for CUDA.

Interpret mode runs the kernel bodies but accepts things the GPU rejects, so every shape is also lowered for
CUDA (no GPU needed) to catch unlowerable primitives; tests/test_expert_gpu.py runs the same checks natively.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from expert_checks import (
    check_against_reference,
    check_segment_sum,
    expert_inputs,
    segment_sum,
    segment_sum_stages,
    segments_per_block,
)
from helpers import assert_close, assert_trees_close, count_triton_calls, lower_for_cuda, normal

from omnimoe_jax import OmniMoE, OmniMoEConfig
from pallas_kernels import _dispatch, omni_expert, omni_expert_reference
from pallas_kernels.omni_expert import kernel
from pallas_kernels.omni_expert.config import L2_BUDGET_BYTES, ExpertKernelConfig, default_config
from pallas_kernels.omni_expert.scheduling import build_schedule

F32, BF16 = jnp.float32, jnp.bfloat16

# ---------------------------------------------------------------------------------------------------------
# The schedule


@pytest.mark.parametrize(
    ("tokens", "top_k", "num_experts", "hot"),
    [(37, 5, 50, None), (40, 4, 16, 3), (6, 64, 4, None), (8, 16, 100000, None)],
)
def test_schedule_invariants(tokens, top_k, num_experts, hot, seed):
    indices = expert_inputs(seed, tokens, top_k, num_experts, 16, F32, hot_expert=hot).indices
    schedule = jax.jit(build_schedule, static_argnums=1)(indices, num_experts)
    flat = np.asarray(indices).reshape(-1)
    order = np.asarray(schedule.order)
    np.testing.assert_array_equal(np.sort(order), np.arange(flat.size))  # a permutation
    sorted_expert = np.asarray(schedule.sorted_expert)
    np.testing.assert_array_equal(sorted_expert, flat[order])
    steps = np.diff(sorted_expert)
    assert np.all(steps >= 0), "sorted by expert"
    assert np.all((steps > 0) | (np.diff(order) > 0)), "stable: each expert's pairs stay in pair order"
    np.testing.assert_array_equal(schedule.sorted_token, order // top_k)
    values = np.random.default_rng(seed).standard_normal((tokens, top_k)).astype(np.float32)
    in_sorted_order, back = jax.jit(lambda s, v: (s.to_sorted(v), s.to_pairs(s.to_sorted(v))))(schedule, values)
    np.testing.assert_array_equal(in_sorted_order, values.reshape(-1)[order])
    np.testing.assert_array_equal(back, values)  # the two moves invert each other


# ---------------------------------------------------------------------------------------------------------
# The config


@pytest.mark.parametrize(
    ("tokens", "top_k", "num_experts", "d", "dtype", "variant", "splits"),
    [
        (4096, 16, 4096, 1024, BF16, "token", 1),  # 8 MB table: already in L2
        (4096, 32, 65536, 1024, BF16, "token", 8),  # 128 MB table: 16 MB slices
        (4096, 32, 1048576, 1024, BF16, "token", 1),  # ~0.1 pairs per expert: nothing to reuse
        (1024, 512, 102400, 1024, BF16, "token", 16),  # ~5 pairs per expert: 13 MB table slices
        (4096, 512, 102400, 1024, BF16, "sorted", 1),  # the paper's setting, ~20 pairs per expert; x fits L2
        (16384, 1024, 4194304, 16, F32, "sorted", 1),  # no slice of the table fits L2: stream it in expert order
    ],
)
def test_default_config_rule(tokens, top_k, num_experts, d, dtype, variant, splits):
    config = default_config(tokens, top_k, num_experts, d, dtype)
    config.check_width(d)
    assert (config.variant, config.score_splits) == (variant, splits)
    if splits > 1:  # sliced so that the gathered side's slice fits L2
        gathered = num_experts if variant == "token" else tokens  # rows of the side the score pass gathers
        assert gathered * (d // splits) * jnp.dtype(dtype).itemsize <= L2_BUDGET_BYTES


@pytest.mark.parametrize("d", [16, 48, 80, 1040, 4096, 8192])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_default_config_tiles_any_width(d, dtype):
    for num_experts in (4, 4096, 102400, 16777216):
        config = default_config(1024, 64, num_experts, d, dtype)
        config.check_width(d)
        assert config.d_block >= 16


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"variant": "expert"}, "variant='expert' must be one of"),
        ({"segment_sums": "scan"}, "segment_sums='scan' must be one of ('products', 'reductions', 'aligned')"),
        ({"d_block": 48}, "d_block=48 must be a power of two"),
        ({"pair_block": 0}, "pair_block=0 must be a power of two"),
        ({"num_warps": 3}, "num_warps=3 must be a power of two"),
        ({"num_stages": 0}, "num_stages=0 must be a positive int"),
        ({"segment_block": 8, "segment_slots": 8}, "segment_block=8 must be >= 16 (a dot dimension"),
        ({"d_block": 8}, "d_block=8 must be >= 16 (a dot dimension"),
        ({"segment_block": 16, "segment_slots": 32}, "segment_slots=32 must be <= segment_block=16"),
    ],
)
def test_config_rejects_bad_fields(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ExpertKernelConfig(**fields)


def test_config_rejects_a_segment_regather_that_is_not_a_bool():
    with pytest.raises(TypeError, match=re.escape("segment_regather=1 must be a bool")):
        ExpertKernelConfig(segment_regather=1)


def test_default_config_variant_override():
    assert default_config(4096, 32, 65536, 1024, BF16, variant="sorted").variant == "sorted"
    with pytest.raises(ValueError, match=re.escape("variant='both' must be None or one of")):
        default_config(4096, 32, 65536, 1024, BF16, variant="both")


@pytest.mark.parametrize(
    "tokens, top_k, num_experts, d, expected, regather",
    [
        (32768, 32, 16384, 512, "reductions", False),  # `small`'s step: 64 pairs per expert, 64-pair blocks
        (32768, 128, 16384, 512, "reductions", True),  # 256 pairs per expert: ~1.25 segments a block
        (32768, 1280, 65536, 512, "reductions", True),  # `small-omnimoe`'s: 640 pairs per expert
        (4096, 512, 102400, 1024, "products", False),  # the paper's setting: ~20 pairs per expert, 128-pair blocks
        (4096, 32, 65536, 1024, "products", False),  # ~2 pairs per expert
    ],
)
def test_default_config_sums_segments_by_reductions_where_blocks_meet_few_segments(
    tokens, top_k, num_experts, d, expected, regather
):
    config = default_config(tokens, top_k, num_experts, d, BF16)
    pairs = tokens * top_k
    per_expert = pairs / (num_experts * -math.expm1(-pairs / num_experts))
    assert (per_expert >= config.segment_block) == (expected == "reductions")
    assert config.segment_sums == expected
    assert config.segment_regather is regather


def test_default_config_takes_no_pairs():
    assert default_config(0, 8, 64, 32, BF16).segment_sums == "products"


def test_config_must_tile_the_width():
    with pytest.raises(ValueError, match=re.escape("config.d_block=64 must divide d=48")):
        ExpertKernelConfig(d_block=64).check_width(48)
    with pytest.raises(ValueError, match=re.escape("config.score_splits=4 must divide d // d_block = 6")):
        ExpertKernelConfig(d_block=16, score_splits=4).check_width(96)


# ---------------------------------------------------------------------------------------------------------
# Each kernel alone (interpret mode), against numpy


def test_pair_dots_scatters_each_pair_once(seed):
    rng = np.random.default_rng(seed)
    pairs, d = 75, 64  # not a multiple of the block
    a, b = rng.standard_normal((9, d), np.float32), rng.standard_normal((30, d), np.float32)
    a_ids, b_ids = rng.integers(0, 9, pairs, dtype=np.int32), rng.integers(0, 30, pairs, dtype=np.int32)
    dest = rng.permutation(pairs).astype(np.int32)
    config = ExpertKernelConfig(d_block=16, score_splits=2, pair_block=16)
    out = jax.jit(lambda *args: kernel.pair_dots(*args, config=config, interpret=True))(a, b, a_ids, b_ids, dest)
    want = np.zeros(pairs, np.float64)
    want[dest] = np.einsum("pd,pd->p", a[a_ids].astype(np.float64), b[b_ids])
    assert_close(out, want, F32)


@pytest.mark.parametrize("k_block", [8, 2])  # all K = 5 pairs in one program / K split over 3 programs
def test_token_combine_with_a_ragged_last_tile(k_block, seed):
    rng = np.random.default_rng(seed)
    tokens, top_k, num_experts, d = 21, 5, 11, 32
    coef = rng.standard_normal((tokens, top_k), np.float32)
    ids = rng.integers(0, num_experts, (tokens, top_k), dtype=np.int32)
    table = jnp.asarray(rng.standard_normal((num_experts, d), np.float32), BF16)
    config = ExpertKernelConfig(d_block=16, token_block=8, k_block=k_block)
    run = jax.jit(lambda *args: kernel.token_combine(*args, out_dtype=F32, config=config, interpret=True))
    out = run(coef, ids, table)
    want = np.einsum("tk,tkd->td", coef.astype(np.float64), np.asarray(table.astype(F32), np.float64)[ids])
    assert_close(out, want, F32)


def _segment_sum_interpreted(indices, coef, rows, table, config):
    """`segment_sum` with the fused dots, interpret mode, over the schedule of `indices` [T, K]:
    (out, dots, schedule)."""
    schedule = build_schedule(jnp.asarray(indices), table.shape[0])
    out, dots = segment_sum(coef, rows, table, schedule, top_k=indices.shape[1], config=config, interpret=True)
    return out, dots, schedule


@pytest.mark.parametrize("segment_sums", ["products", "reductions", "aligned"])
@pytest.mark.parametrize(
    ("dtype", "block", "slots"),
    [
        (F32, 16, 16),  # IEEE f32 products; at most 16 segments per block: one product each
        (BF16, 32, 16),  # two-part bf16 products; blocks with more than 16 segments take two
    ],
)
def test_segment_sum_writes_exactly_the_touched_rows_and_the_fused_dots(dtype, block, slots, segment_sums, seed):
    # One expert takes every token (its segment spans several blocks, so the fix-up walks them); the rest
    # are mostly one pair each, with ties and cuts at block boundaries; most experts take none (their rows
    # must come out exactly 0 although interpret mode starts every output as NaN).
    rng = np.random.default_rng(seed)
    tokens, top_k, num_experts, d = 45, 3, 300, 32  # 135 pairs: the last block is ragged
    indices = rng.integers(0, num_experts // 2, (tokens, top_k), dtype=np.int32)
    indices[:, 1] = 7
    coef = rng.standard_normal(tokens * top_k, np.float32)  # in sorted order, like the kernel takes it
    rows = jnp.asarray(rng.standard_normal((tokens, d), np.float32), dtype)
    table = jnp.asarray(rng.standard_normal((num_experts, d), np.float32), dtype)
    config = ExpertKernelConfig(d_block=16, segment_block=block, segment_slots=slots, segment_sums=segment_sums)
    out, dots, schedule = _segment_sum_interpreted(indices, coef, rows, table, config)
    check_segment_sum(out, dots, coef=coef, rows=rows, table=table, indices=indices, order=schedule.order, dtype=dtype)


SEGMENT_LAYOUTS = {
    # name: (T, K, experts the pairs choose from, N, segment_block); experts past the chosen ones untouched
    # 150 pairs over 3 experts: ~50-pair segments across 3-4 blocks (heads, tails, both, whole blocks)
    "long_segments": (50, 3, 3, 8, 16),
    # 150 pairs over 2000 experts: nearly every pair a segment of its own, so each block of 32 meets over
    # 16 segments (the products take a second window of slots)
    "short_segments": (50, 3, 2000, 2000, 32),
    # 33 pairs over 12 of 20 experts, ~3-pair segments; the last block holds 1 pair
    "mixed_ragged": (33, 1, 12, 20, 16),
}


@pytest.mark.parametrize("segment_sums", ["products", "reductions", "aligned"])
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("layout", sorted(SEGMENT_LAYOUTS))
def test_segment_sum_layouts(layout, dtype, segment_sums, seed):
    # Both ways of summing a block's segments, against the float64 sum, with the fused dots (the op's tests
    # below also run the pass without them: d_up).
    tokens, top_k, chosen, num_experts, block = SEGMENT_LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    d = 32
    indices = rng.integers(0, chosen, (tokens, top_k), dtype=np.int32)
    coef = rng.standard_normal(tokens * top_k, np.float32)
    rows = jnp.asarray(rng.standard_normal((tokens, d), np.float32), dtype)
    table = jnp.asarray(rng.standard_normal((num_experts, d), np.float32), dtype)
    config = ExpertKernelConfig(d_block=16, segment_block=block, segment_sums=segment_sums)
    out, dots, schedule = _segment_sum_interpreted(indices, coef, rows, table, config)
    check_segment_sum(out, dots, coef=coef, rows=rows, table=table, indices=indices, order=schedule.order, dtype=dtype)


# Pairs per expert, in expert order, for blocks of 16 sorted pairs (0: an expert no pair chooses):
HANDMADE_SEGMENTS = [
    *[16, 0],  # block 0: one whole segment; an empty expert
    *[9, 7],  # block 1: two
    *[5, 6, 5],  # block 2: three
    *[1, 1, 2, 0, 1, 1, 3, 1, 1, 1],  # block 3: nine short ones, then the start of
    57,  # a segment through blocks 3-7 (cut at both ends in blocks 4-6)
    *[6, 5],  # block 7: the long one's end and two more
    *[0, 7, 4, 8],  # block 8: three, the last cut into
    *[3, 0, 0, 0, 0, 0],  # block 9, ragged (6 pairs): the cut one's end and one more; five empty experts
]
HANDMADE_SEGMENTS_PER_BLOCK = [1, 2, 3, 10, 1, 1, 1, 3, 3, 2]


def _indices_with_segments(counts, top_k, rng) -> np.ndarray:
    """[T, K] indices whose pairs sorted by expert have `counts[e]` pairs of expert e, tokens shuffled."""
    experts = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    return rng.permutation(experts).reshape(-1, top_k)


REDUCTIONS_LAYOUTS = {
    # name: (T, K, experts the pairs choose from, N, segment_block), as SEGMENT_LAYOUTS; uniform choices
    "one_or_two_per_block": SEGMENT_LAYOUTS["long_segments"],
    "about_two_per_block": (80, 2, 10, 14, 16),  # 16 pairs per expert, blocks of 16
    "three_or_more_per_block": (48, 2, 16, 24, 16),  # 6 pairs per expert
    "many_per_block": SEGMENT_LAYOUTS["short_segments"],
    "mixed_ragged": SEGMENT_LAYOUTS["mixed_ragged"],
}


@pytest.mark.parametrize(
    ("layout", "dtype"),
    [("handmade", F32), ("handmade", BF16), *((name, BF16) for name in sorted(REDUCTIONS_LAYOUTS))],
)
def test_reductions_with_and_without_regathering(layout, dtype, seed):
    # The reductions body sums a block's first UNROLLED_SEGMENTS segments unrolled and loops only over the
    # rest, each from the first gather's tile or (segment_regather) every one after the first from its rows
    # gathered again: both against the float64 sums, blocks meeting 1, 2, 3 and many segments, in the pass
    # without the dots (d_up's; the pass with them ignores segment_regather) and with them. The same values
    # summed in the same order, yet not compared bit for bit: interpret mode's XLA fuses the second gather
    # into its sum and rounds the last bit differently.
    rng = np.random.default_rng(seed)
    if layout == "handmade":
        top_k, block, num_experts = 2, 16, len(HANDMADE_SEGMENTS)
        indices = _indices_with_segments(HANDMADE_SEGMENTS, top_k, rng)
    else:
        tokens, top_k, chosen, num_experts, block = REDUCTIONS_LAYOUTS[layout]
        indices = rng.integers(0, chosen, (tokens, top_k), dtype=np.int32)
    d = 32
    coef = jnp.asarray(rng.standard_normal(indices.size, np.float32))
    rows = jnp.asarray(rng.standard_normal((indices.shape[0], d), np.float32), dtype)
    table = jnp.asarray(rng.standard_normal((num_experts, d), np.float32), dtype)
    schedule = build_schedule(jnp.asarray(indices), num_experts)
    if layout == "handmade":
        assert segments_per_block(schedule.sorted_expert, block).tolist() == HANDMADE_SEGMENTS_PER_BLOCK
    sums = {"coef": np.asarray(coef), "rows": rows, "table": table, "indices": indices, "order": schedule.order}
    # (with the dots the pass ignores segment_regather: test_only_the_pass_without_dots_regathers)
    for regather, with_dots in ((False, False), (True, False), (False, True)):
        config = ExpertKernelConfig(
            d_block=16, segment_block=block, segment_sums="reductions", segment_regather=regather
        )
        run = functools.partial(segment_sum_stages, top_k=top_k, config=config, interpret=True, with_dots=with_dots)
        _, _, out, dots = run(coef, rows, table, schedule)
        check_segment_sum(out, dots, **sums, dtype=dtype)


def _blocks_kernel_masked_loads(*, regather: bool, with_dots: bool) -> int:
    """How many masked loads the blocks kernel's body holds (its jaxpr, traced for CUDA)."""
    pairs, tokens, num_experts, d = 64, 32, 8, 32
    config = ExpertKernelConfig(d_block=16, segment_block=16, segment_sums="reductions", segment_regather=regather)

    def blocks(coef, rows, sorted_expert, order, table):
        out_shape = jax.ShapeDtypeStruct((num_experts, d), F32)
        dot_table = table if with_dots else None
        return kernel.segment_blocks(
            coef, rows, sorted_expert, order, out_shape, top_k=2, dot_table=dot_table, config=config, interpret=False
        )

    ints = jnp.zeros((pairs,), jnp.int32)
    args = (jnp.ones((pairs,)), jnp.ones((tokens, d)), ints, ints, jnp.ones((num_experts, d)))
    text = str(jax.make_jaxpr(blocks)(*args))
    return len(re.findall(r"<- \w+\[[^\]]*\] mask=", text))


def test_only_the_pass_without_dots_regathers():
    # What the numerics cannot show (the same values either way): segment_regather reaches the kernel, whose
    # later segments then load the pair ids and rows again, and the pass with the fused dots ignores it.
    plain = _blocks_kernel_masked_loads(regather=False, with_dots=False)
    assert _blocks_kernel_masked_loads(regather=True, with_dots=False) > plain > 0
    with_dots = _blocks_kernel_masked_loads(regather=False, with_dots=True)
    assert _blocks_kernel_masked_loads(regather=True, with_dots=True) == with_dots > plain


def _aligned_chunks_by_hand(counts, block: int) -> tuple[list[int], list[int]]:
    """(starts, experts) of the chunks of segments with counts[e] pairs of expert e, in expert order."""
    starts, experts, first = [], [], 0
    for expert, count in enumerate(counts):
        starts += list(range(first, first + count, block))
        experts += [expert] * len(range(first, first + count, block))
        first += count
    return starts, experts


def _check_aligned_chunks(counts, block: int) -> None:
    sorted_expert = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    num_pairs, num_experts = sorted_expert.size, len(counts)
    chunked = kernel.aligned_chunks(jnp.asarray(sorted_expert), block=block, num_experts=num_experts)
    starts, experts, chunk_counts = (np.asarray(a) for a in chunked)
    segments = min(num_pairs, num_experts)
    assert starts.shape == experts.shape == (segments + (num_pairs - segments) // block + 1,)
    want_starts, want_experts = _aligned_chunks_by_hand(counts, block)
    used = len(want_starts)
    assert used < starts.size, "the static bound holds every chunk, and the end entry after them"
    np.testing.assert_array_equal(starts[:used], want_starts)
    np.testing.assert_array_equal(experts[:used], want_experts)
    np.testing.assert_array_equal(starts[used:], num_pairs)  # unused chunks, and the end
    np.testing.assert_array_equal(experts[used:], -1)
    firsts = [c for c in range(used) if c == 0 or want_experts[c - 1] != want_experts[c]]
    for first in firsts:  # at each segment's first chunk: how many chunks the segment has
        assert chunk_counts[first] == want_experts.count(want_experts[first]), (first, chunk_counts[first])
    for start, end in zip(want_starts, [*want_starts[1:], num_pairs], strict=True):  # no chunk crosses a
        assert 0 < end - start <= block and len(set(sorted_expert[start:end])) == 1  # segment or holds more


@pytest.mark.parametrize("block", [1, 2, 4, 16])
def test_aligned_chunks_start_with_every_segment_and_every_block_pairs_into_it(block):
    _check_aligned_chunks(HANDMADE_SEGMENTS, block)
    _check_aligned_chunks([32, 16, 0, 48, 5], block)  # segments of exactly k blocks: the next starts on one


@pytest.mark.parametrize("block", [2, 16])
def test_aligned_chunks_fill_their_bound_and_take_any_layout(block, seed):
    rng = np.random.default_rng(seed)
    # Every segment 1 more than a multiple of block, one per expert: the most chunks P pairs can need.
    _check_aligned_chunks([1 + block * int(k) for k in rng.integers(0, 4, 12)], block)
    _check_aligned_chunks([1, 0, 2, 0, 0, 1], block)  # fewer pairs than experts (and than one block)
    for _ in range(8):  # random layouts, empty experts among them
        _check_aligned_chunks([*rng.integers(0, 3 * block, int(rng.integers(1, 30))), 1], block)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("block", [16, 32])
def test_aligned_segment_sums_of_handmade_segments(dtype, block, seed):
    # Segments of 1 to 57 pairs, empty experts between them, a ragged end: every chunk kind (the segment
    # whole, its first of several, a middle one, its last), with and without the fused dots.
    rng = np.random.default_rng(seed)
    top_k, num_experts, d = 2, len(HANDMADE_SEGMENTS), 32
    indices = _indices_with_segments(HANDMADE_SEGMENTS, top_k, rng)
    coef = jnp.asarray(rng.standard_normal(indices.size, np.float32))
    rows = jnp.asarray(rng.standard_normal((indices.shape[0], d), np.float32), dtype)
    table = jnp.asarray(rng.standard_normal((num_experts, d), np.float32), dtype)
    schedule = build_schedule(jnp.asarray(indices), num_experts)
    sums = {"coef": np.asarray(coef), "rows": rows, "table": table, "indices": indices, "order": schedule.order}
    config = ExpertKernelConfig(d_block=16, segment_block=block, segment_sums="aligned")
    run = functools.partial(
        kernel.segment_sum, sorted_expert=schedule.sorted_expert, order=schedule.order, out_like=table, top_k=top_k
    )
    out, dots = run(coef, rows, dot_table=table, config=config, interpret=True)
    check_segment_sum(out, dots, **sums, dtype=dtype)
    check_segment_sum(run(coef, rows, config=config, interpret=True), None, **sums, dtype=dtype)


def test_segment_blocks_refuses_the_aligned_mode():
    schedule = build_schedule(jnp.zeros((4, 1), jnp.int32), 2)
    with pytest.raises(ValueError, match=r"segment_sums='aligned' sums by aligned chunks: kernel.aligned_chunk_sums"):
        kernel.segment_blocks(
            jnp.ones((4,)),
            jnp.ones((4, 16)),
            schedule.sorted_expert,
            schedule.order,
            jax.ShapeDtypeStruct((2, 16), F32),
            top_k=1,
            dot_table=None,
            config=ExpertKernelConfig(d_block=16, segment_block=16, segment_sums="aligned"),
            interpret=True,
        )


# ---------------------------------------------------------------------------------------------------------
# The whole op, forward and all four gradients, interpret mode vs the reference

# Small blocks everywhere, so that tiles are ragged, K is split over combine programs and sorted blocks cut
# segments (the fix-up kernel runs); column slices so that partial dots are summed.
SMALL_TILES = {"token_block": 16, "pair_block": 16, "k_block": 2, "segment_block": 16, "segment_slots": 16}
CASES = {
    # name: (T, K, N, d, dtype, config fields or None for the heuristic, hot expert)
    "ragged_token_split_columns": (
        37,
        5,
        50,
        64,
        F32,
        {"variant": "token", "d_block": 16, "score_splits": 4, **SMALL_TILES},
        None,
    ),
    "ragged_sorted_split_columns_bf16": (
        37,
        5,
        50,
        64,
        BF16,
        {"variant": "sorted", "d_block": 16, "score_splits": 2, **SMALL_TILES},
        None,
    ),
    "one_expert_takes_every_token": (40, 4, 16, 32, F32, {"variant": "sorted", **SMALL_TILES}, 3),
    "k1": (33, 1, 8, 16, BF16, None, None),
    # f32: interpret mode on XLA:CPU rewrites a whole bf16 output per program, far too slow at N = 65536.
    "k64_n65536": (64, 64, 65536, 16, F32, None, None),
    "k512_n102400": (8, 512, 102400, 16, F32, None, None),
    "k512_n4_long_segments": (6, 512, 4, 16, F32, {"variant": "sorted"}, None),
    "n4_d1024_bf16": (40, 4, 4, 1024, BF16, None, None),
    # The segment passes (d_down with the fused dh, d_up without) summing by reductions: short segments and
    # cut ones, a segment across every block, segments thousands of pairs long
    "reductions_ragged_sorted_split_columns_bf16": (
        37,
        5,
        50,
        64,
        BF16,
        {"variant": "sorted", "d_block": 16, "score_splits": 2, **SMALL_TILES, "segment_sums": "reductions"},
        None,
    ),
    "reductions_one_expert_takes_every_token": (
        40,
        4,
        16,
        32,
        F32,
        {"variant": "token", **SMALL_TILES, "segment_sums": "reductions"},
        3,
    ),
    "reductions_k512_n4_long_segments_bf16": (6, 512, 4, 16, BF16, {"segment_sums": "reductions"}, None),
    # ... and by aligned chunks: segments of one chunk, of several, one through every chunk
    "aligned_ragged_sorted_split_columns_bf16": (
        37,
        5,
        50,
        64,
        BF16,
        {"variant": "sorted", "d_block": 16, "score_splits": 2, **SMALL_TILES, "segment_sums": "aligned"},
        None,
    ),
    "aligned_one_expert_takes_every_token": (
        40,
        4,
        16,
        32,
        F32,
        {"variant": "token", **SMALL_TILES, "segment_sums": "aligned"},
        3,
    ),
    "aligned_k512_n4_long_segments_bf16": (6, 512, 4, 16, BF16, {"segment_sums": "aligned"}, None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_gradients_match_the_reference(name, seed):
    tokens, top_k, num_experts, d, dtype, fields, hot = CASES[name]
    inputs = expert_inputs(seed, tokens, top_k, num_experts, d, dtype, hot_expert=hot)
    config = None  # the heuristic
    if fields is not None:
        config = dataclasses.replace(default_config(tokens, top_k, num_experts, d, dtype), **fields)
    check_against_reference(inputs, interpret=True, config=config)


def test_experts_without_tokens_get_zero_gradient_rows(seed):
    inputs = expert_inputs(seed, 12, 3, 64, 32, F32)  # 36 pairs over 64 experts: at least 28 untouched
    assert np.unique(np.asarray(inputs.indices)).size < 64
    check_against_reference(inputs, interpret=True, activation="gelu")  # the helper checks the zero rows


def test_relu_kink_gets_the_same_gradient_as_the_reference(seed):
    # All-zero token rows (padding) put every score at relu's kink, s = 0: the kernels' hand-written
    # derivative and the reference's autodiff must agree there (both 0, as in torch).
    inputs = expert_inputs(seed, 8, 2, 16, 16, F32)
    x = jnp.zeros_like(inputs.x)

    def dx(implementation):
        def loss(x):
            y = omni_expert(
                x,
                inputs.up,
                inputs.down,
                inputs.weights,
                inputs.indices,
                activation="relu",
                implementation=implementation,
            )
            return jnp.sum(y * jnp.arange(16, dtype=jnp.float32))

        return jax.grad(loss)(x)

    np.testing.assert_array_equal(dx("pallas"), dx("xla"))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["token", "sorted"])
@pytest.mark.parametrize(
    ("tokens", "top_k", "num_experts", "d", "dtype"),
    [(256, 64, 4096, 256, BF16), (64, 512, 102400, 64, F32), (300, 16, 1024, 1024, F32)],
)
def test_larger_shapes_match_the_reference(tokens, top_k, num_experts, d, dtype, variant, seed):
    inputs = expert_inputs(seed, tokens, top_k, num_experts, d, dtype)
    config = default_config(tokens, top_k, num_experts, d, dtype, variant=variant)
    check_against_reference(inputs, interpret=True, config=config)


# ---------------------------------------------------------------------------------------------------------
# Lowering for CUDA on the CPU: the benchmark shapes and the edges, forward and jax.grad of the whole op

LOWERING_SHAPES = [
    # (T, K, N, d, dtype)
    (4096, 16, 4096, 1024, BF16),
    (4096, 32, 65536, 1024, BF16),
    (16384, 32, 1048576, 1024, BF16),
    (4096, 512, 102400, 1024, BF16),
    (16384, 512, 102400, 1024, BF16),
    (37, 1, 4, 16, F32),
    (5, 1024, 16777216, 16, F32),
    (64, 64, 65536, 8192, BF16),
]


def _lower_for_cuda(fn, *shapes_and_dtypes) -> str:
    return lower_for_cuda(fn, *(jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes_and_dtypes)).as_text()


@pytest.mark.parametrize("variant", ["token", "sorted"])
@pytest.mark.parametrize(("tokens", "top_k", "num_experts", "d", "dtype"), LOWERING_SHAPES)
def test_lowers_for_cuda(tokens, top_k, num_experts, d, dtype, variant):
    config = default_config(tokens, top_k, num_experts, d, dtype, variant=variant)

    def forward(x, up, down, weights, indices):
        return omni_expert(x, up, down, weights, indices, implementation="pallas", interpret=False, config=config)

    def loss(*args):
        return jnp.sum(forward(*args).astype(F32))

    shapes = [((tokens, d), dtype), ((num_experts, d), dtype), ((num_experts, d), dtype)]
    shapes += [((tokens, top_k), F32), ((tokens, top_k), jnp.int32)]
    forward_text = _lower_for_cuda(forward, *shapes)
    assert count_triton_calls(forward_text) == 2  # pair_dots, token_combine
    sorts = re.search(r"stablehlo\.sort\b", forward_text) is not None
    assert sorts == (variant == "sorted"), "only the sorted forward builds a schedule"
    grad_text = _lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2, 3)), *shapes)
    # forward 2 + backward: segment_sum (blocks, fix-up, untouched rows) with the dots, token_combine,
    # segment_sum (3 again)
    assert count_triton_calls(grad_text) == 9
    grid = re.findall(r"grid_([yz]) = (\d+)", grad_text)  # the launch grid, where jaxlib shows it
    assert grid, "no launch grid in the lowered text: its format changed, so the CUDA limit went unchecked"
    for axis, size in grid:
        assert int(size) <= 65535, f"grid {axis} = {size} exceeds CUDA's limit"


# The other ways to sum the segments: reductions' loop over a block's segments (a dynamic trip count), the
# scalar branches, the one-row stores and the second gather (segment_regather), and the aligned chunks'
# scalar loads and one-row table loads must lower too. The training
# shapes, then the benchmark shapes and edges.
TRAINING_SHAPES = [(32768, 32, 16384, 512, BF16), (32768, 128, 65536, 512, BF16), (32768, 1280, 65536, 512, BF16)]


@pytest.mark.parametrize(("mode", "regather"), [("reductions", False), ("reductions", True), ("aligned", False)])
@pytest.mark.parametrize(("tokens", "top_k", "num_experts", "d", "dtype"), TRAINING_SHAPES + LOWERING_SHAPES)
def test_other_segment_sums_lower_for_cuda(tokens, top_k, num_experts, d, dtype, mode, regather):
    config = default_config(tokens, top_k, num_experts, d, dtype, variant="sorted")
    config = dataclasses.replace(config, segment_sums=mode, segment_regather=regather)

    def loss(x, up, down, weights, indices):
        y = omni_expert(x, up, down, weights, indices, implementation="pallas", interpret=False, config=config)
        return jnp.sum(y.astype(F32))

    shapes = [((tokens, d), dtype), ((num_experts, d), dtype), ((num_experts, d), dtype)]
    shapes += [((tokens, top_k), F32), ((tokens, top_k), jnp.int32)]
    grad_text = _lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2, 3)), *shapes)
    assert count_triton_calls(grad_text) == 9  # as with "products": the same kernels, another body


# ---------------------------------------------------------------------------------------------------------
# Errors


def _small(dtype=F32, d=32, tokens=4, top_k=2, num_experts=8):
    return expert_inputs(0, tokens, top_k, num_experts, d, dtype)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"d": 40}, ValueError, "needs d a multiple of 16 in [16, 8192]"),
        ({"d": 8208}, ValueError, "needs d a multiple of 16 in [16, 8192]"),
        ({"dtype": jnp.float16}, TypeError, "x has dtype float16; implementation='pallas' takes float32 or bfloat16"),
        ({"tokens": 0}, ValueError, "needs T >= 1 and K >= 1"),
    ],
)
def test_pallas_refuses_what_the_kernels_cannot_take(change, error, message):
    inputs = _small(**change)
    with pytest.raises(error, match=re.escape(message)):
        omni_expert(inputs.x, inputs.up, inputs.down, inputs.weights, inputs.indices, implementation="pallas")


def test_pallas_refuses_mixed_dtypes():
    inputs = _small()
    message = "x, up and down have dtypes float32, bfloat16, float32; implementation='pallas' needs one dtype"
    with pytest.raises(TypeError, match=re.escape(message)):
        omni_expert(
            inputs.x, inputs.up.astype(BF16), inputs.down, inputs.weights, inputs.indices, implementation="pallas"
        )


@pytest.mark.parametrize("implementation", ["pallas", "xla"])
def test_out_of_range_indices_are_refused(implementation):
    # The kernels would read outside the tables; XLA's gather would clamp the index silently.
    inputs = _small()
    for bad in (-1, 8):
        indices = inputs.indices.at[2, 1].set(bad)
        with pytest.raises(ValueError, match=re.escape("indices must be in [0, N=8)")):
            omni_expert(inputs.x, inputs.up, inputs.down, inputs.weights, indices, implementation=implementation)


@pytest.mark.parametrize(("d", "dtype"), [(24, F32), (32, jnp.float16)])
def test_auto_falls_back_to_the_reference_where_kernels_do_not_apply(monkeypatch, d, dtype):
    monkeypatch.setattr(_dispatch, "on_gpu", lambda: True)  # "auto" would pick the kernels...
    inputs = _small(dtype=dtype, d=d)  # ...but d = 24 is not a multiple of 16, and float16 no kernel dtype
    args = (inputs.x, inputs.up, inputs.down, inputs.weights, inputs.indices)
    np.testing.assert_array_equal(omni_expert(*args, implementation="auto"), omni_expert_reference(*args))
    with pytest.raises((ValueError, TypeError), match="implementation='pallas'"):
        omni_expert(*args, implementation="pallas")
    with pytest.raises((ValueError, TypeError), match="implementation='pallas'"):  # a config asks for kernels
        omni_expert(*args, implementation="auto", config=ExpertKernelConfig(d_block=16))


def test_pallas_refuses_a_bad_config():
    inputs = _small()
    args = (inputs.x, inputs.up, inputs.down, inputs.weights, inputs.indices)
    with pytest.raises(TypeError, match="config must be an ExpertKernelConfig or None, got dict"):
        omni_expert(*args, implementation="pallas", config={"d_block": 16})
    with pytest.raises(ValueError, match=re.escape("config.d_block=64 must divide d=32")):
        omni_expert(*args, implementation="pallas", config=ExpertKernelConfig(d_block=64))


def test_unknown_implementation_is_refused():
    inputs = _small()
    with pytest.raises(ValueError, match=re.escape("implementation='triton' is not supported")):
        omni_expert(inputs.x, inputs.up, inputs.down, inputs.weights, inputs.indices, implementation="triton")


# ---------------------------------------------------------------------------------------------------------
# The whole layer: implementation "pallas" (interpret mode here) vs "xla"


def _layer_params_and_grads(config, x, variables):
    model = OmniMoE(config)

    @jax.jit
    def run(params):
        def loss(params):
            y = model.apply({**variables, "params": params}, x)
            return jnp.sum(jnp.sin(y)), y  # a non-linear readout so every output element matters differently

        (_, y), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return y, grads

    return run(variables["params"])


def test_layer_with_pallas_matches_xla(key, monkeypatch):
    import omnimoe_jax._router as router_module
    from pallas_kernels.omni_router import api as router_api

    if "pallas" not in router_api.SUPPORTED_IMPLEMENTATIONS:
        # The router's kernel is another issue; until it lands, route with its reference so this test still
        # exercises the expert kernels inside the whole layer.
        real_router = router_module.omni_router
        monkeypatch.setattr(router_module, "omni_router", lambda *args, implementation, **kw: real_router(*args, **kw))
    xla = OmniMoEConfig(
        hidden_size=32, intermediate_size=48, num_experts=64, num_experts_per_token=6, implementation="xla"
    )
    x = normal(key, (2, 19, 32))
    variables = jax.jit(OmniMoE(xla).init)(jax.random.key(1), x)  # one compile, not one per eager op
    want_y, want_grads = _layer_params_and_grads(xla, x, variables)
    y, grads = _layer_params_and_grads(xla.replace(implementation="pallas"), x, variables)
    assert_close(y, want_y, F32)
    assert_trees_close(grads, want_grads, F32)
    experts = grads["experts"]
    assert float(jnp.abs(experts["up_embed"]).max()) > 0 and float(jnp.abs(experts["down_embed"]).max()) > 0


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="'auto' means pallas on a GPU")
def test_auto_is_the_reference_off_gpu(key):
    inputs = _small()
    args = (inputs.x, inputs.up, inputs.down, inputs.weights, inputs.indices)
    np.testing.assert_array_equal(omni_expert(*args), omni_expert_reference(*args))
