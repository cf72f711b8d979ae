"""The Pallas router kernels (interpret mode on the CPU) against the jnp reference, and their CUDA lowering.

Interpret mode runs the kernel bodies but accepts things Triton rejects, so every shape is also lowered for
CUDA on the CPU (Pallas -> Triton IR), which fails on anything Triton cannot express. Interpret-mode
compiles cost seconds each: the default suite covers every T, n, K value and both dtypes at least once,
the full product runs under `-m slow`.
"""

import dataclasses
import functools
import itertools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    assert_close,
    lower_for_cuda,
    normal,
    omni_router_brute_force,
    router_compaction_cases,
    router_merge_outcomes,
)

from omnimoe_jax import OmniMoE, OmniMoEConfig
from omnimoe_jax._router import CartesianRouter, by_score
from pallas_kernels import _dispatch, omni_router
from pallas_kernels._checks import is_power_of_two
from pallas_kernels.omni_expert import api as expert_api
from pallas_kernels.omni_router import RouterConfig, api, default_config, kernel
from pallas_kernels.omni_router.config import (
    AXIS_SORTS,
    BACKWARDS,
    MIN_FACTORED_AXIS,
    bound_table,
    candidate_table,
    compacted_slots,
    head_ranks,
    next_power_of_2,
    rank_floors,
)
from pallas_kernels.omni_router.reference import omni_router_reference

TOKENS = (1, 7, 128, 1000)
AXIS_SIZES = (2, 3, 16, 100, 256, 320)


def top_ks(n):
    return sorted({k for k in (1, 2, 16, 512) if k <= n * n} | ({n * n} if n * n <= 256 else set()))


FULL_PRODUCT = [
    (tokens, n, top_k, dtype, None, axis_sort)
    for tokens, n, dtype, axis_sort in itertools.product(TOKENS, AXIS_SIZES, ("float32", "bfloat16"), AXIS_SORTS)
    for top_k in top_ks(n)
]
# Every T, n, K (including K = n*n), both dtypes and both axis sorts at least once, within the suite's time
# budget. The default tiling gives whole tiles here; the explicit ones (block_tokens) leave a ragged last tile.
DEFAULT = [
    (1, 2, 4, "float32", None, "threshold"),
    (7, 3, 2, "bfloat16", 4, "select"),
    (7, 3, 9, "float32", None, "threshold"),
    (128, 16, 256, "bfloat16", None, "select"),
    (1000, 256, 16, "float32", 16, "threshold"),
    (7, 320, 512, "bfloat16", None, "threshold"),
    (128, 100, 1, "float32", None, "threshold"),
    (128, 100, 64, "float32", None, "select"),
]
assert {c[0] for c in DEFAULT} == set(TOKENS) and {c[1] for c in DEFAULT} == set(AXIS_SIZES)
assert {c[2] for c in DEFAULT} >= {1, 2, 16, 512} and {c[3] for c in DEFAULT} == {"float32", "bfloat16"}
assert {c[5] for c in DEFAULT} == set(AXIS_SORTS)
CASE_NAMES = ("tokens", "n", "top_k", "dtype", "block_tokens", "axis_sort")


# Interpret-mode kernels are XLA:CPU programs of thousands of small ops; compiling them without LLVM's
# expensive passes halves the suite's time and changes no result (integer selection, single f32 adds).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def log_probs(key, tokens, n, dtype="float32"):
    """Two [T, n] rows of log-probabilities in `dtype` (softmax of normals with a random temperature)."""
    kx, ky, kt = jax.random.split(key, 3)
    temperature = jax.random.uniform(kt, (tokens, 1), minval=0.3, maxval=3.0)
    lpx = jax.nn.log_softmax(temperature * normal(kx, (tokens, n)), axis=-1)
    lpy = jax.nn.log_softmax(temperature * normal(ky, (tokens, n)), axis=-1)
    return lpx.astype(dtype), lpy.astype(dtype)


@functools.partial(jax.jit, static_argnames=("top_k", "config"), compiler_options=FAST_COMPILE)
def pallas_route(lpx, lpy, top_k, config=None):
    return omni_router(lpx, lpy, top_k, implementation="pallas", interpret=True, config=config)


@functools.partial(jax.jit, static_argnames=("top_k", "implementation", "config"), compiler_options=FAST_COMPILE)
def route_vjp(lpx, lpy, cotangent, top_k, implementation, config=None):
    """(scores, indices), (d lpx, d lpy) for the cotangent of the scores: forward and backward, one compile."""
    route = functools.partial(omni_router, top_k=top_k, implementation=implementation, interpret=True, config=config)
    (scores, indices), vjp = jax.vjp(route, lpx, lpy)
    return (scores, indices), vjp((cotangent, np.zeros(indices.shape, jax.dtypes.float0)))


def assert_routes_equal(got, want):
    (scores, indices), (want_scores, want_indices) = got, want
    assert scores.dtype == jnp.float32 and indices.dtype == jnp.int32
    assert scores.shape == want_scores.shape and indices.shape == want_indices.shape
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(scores, want_scores)  # the same f32 sums, bit for bit


def check_against_reference(key, tokens, n, top_k, dtype, block_tokens, axis_sort):
    """Forward equal to the reference; gradients through jax.vjp with a random cotangent equal to its."""
    k1, k2 = jax.random.split(key)
    lpx, lpy = log_probs(k1, tokens, n, dtype)
    cotangent = normal(k2, (tokens, top_k))
    config = dataclasses.replace(default_config(tokens, n, top_k), axis_sort=axis_sort)
    if block_tokens is not None:
        config = dataclasses.replace(config, block_tokens=block_tokens)
        assert tokens % block_tokens, "an explicit tile here is meant to leave a ragged last tile"
    got, (dx, dy) = route_vjp(lpx, lpy, cotangent, top_k, "pallas", config)
    want, (want_dx, want_dy) = route_vjp(lpx, lpy, cotangent, top_k, "xla")
    assert_routes_equal(got, want)
    assert bool(jnp.all(got[0][:, :-1] >= got[0][:, 1:])), "scores must be descending"
    assert dx.dtype == lpx.dtype and dy.dtype == lpy.dtype
    assert_close(dx, want_dx, dtype, what="d log_probs_x")
    assert_close(dy, want_dy, dtype, what="d log_probs_y")


@pytest.mark.parametrize(CASE_NAMES, DEFAULT)
def test_matches_reference(tokens, n, top_k, dtype, block_tokens, axis_sort, key):
    check_against_reference(key, tokens, n, top_k, dtype, block_tokens, axis_sort)


@pytest.mark.slow
@pytest.mark.parametrize(CASE_NAMES, FULL_PRODUCT)
def test_matches_reference_full_product(tokens, n, top_k, dtype, block_tokens, axis_sort, key):
    check_against_reference(key, tokens, n, top_k, dtype, block_tokens, axis_sort)


@pytest.mark.parametrize(
    ("n", "top_k", "axis_sort", "dtype"),
    [(6, 5, "threshold", "bfloat16"), (6, 13, "threshold", "float32"), (6, 5, "select", "float32")],
)
def test_ties_match_brute_force(n, top_k, axis_sort, dtype, seed):
    # Integer-valued log-probs tie everywhere, per axis and in the (exact) sums.
    rng = np.random.default_rng(seed)
    lpx = rng.integers(-3, 1, (64, n)).astype(np.float32)
    lpy = rng.integers(-3, 1, (64, n)).astype(np.float32)
    lpx[:4], lpy[:4] = 0.0, 0.0  # constant rows: every expert ties
    lpx[4:8], lpy[4:8] = -np.inf, -np.inf  # nothing but -inf: every expert ties too
    lpx, lpy = jnp.asarray(lpx, dtype), jnp.asarray(lpy, dtype)  # small integers are exact in bf16 too
    config = dataclasses.replace(default_config(64, n, top_k), axis_sort=axis_sort)
    got = pallas_route(lpx, lpy, top_k, config)
    assert_routes_equal(got, omni_router_brute_force(lpx, lpy, top_k))
    np.testing.assert_array_equal(got[1][:8], np.tile(np.arange(top_k), (8, 1)))


# Step 1 orders only the head of each axis exactly (rank_floors): shapes with k' > the head, with
# (n > k') and without (n = k') the compaction before the bucketing, K = 1024 (the largest K a 32 head
# serves, see `head_ranks`), and ragged tiles of several tokens.
BUCKETED = [
    (9, 1024, 512, "bfloat16", 4, "threshold"),
    pytest.param(7, 320, 512, "float32", 2, "threshold", marks=pytest.mark.slow),
    pytest.param(16, 320, 1024, "float32", None, "threshold", marks=pytest.mark.slow),
    pytest.param(16, 200, 512, "float32", None, "threshold", marks=pytest.mark.slow),
    pytest.param(5, 160, 1024, "bfloat16", None, "threshold", marks=pytest.mark.slow),
    pytest.param(5, 160, 512, "float32", None, "select", marks=pytest.mark.slow),  # a full sort: finer
]


@pytest.mark.parametrize(CASE_NAMES, BUCKETED)
def test_bucketed_axis_order_matches_reference(tokens, n, top_k, dtype, block_tokens, axis_sort, key):
    assert min(top_k, n) > head_ranks(n, top_k)
    check_against_reference(key, tokens, n, top_k, dtype, block_tokens, axis_sort)


# K > 1024: a head of at least 64 (h^2 >= K) and 8,192 to 65,536 candidate slots per token. An exact head
# (k' = n <= 128), the bucketing (n = 256, 320), the compaction before it (K < n = 2048), K = MAX_TOP_K, the
# full sort of "select" and a ragged tile.
LARGE_K = [
    (5, 64, 1280, "float32", None, "threshold"),
    (3, 128, 2048, "bfloat16", 2, "threshold"),
    (3, 256, 1280, "bfloat16", None, "threshold"),
    (3, 256, 2048, "float32", None, "threshold"),
    (2, 256, 1280, "float32", None, "select"),
    pytest.param(3, 320, 2048, "bfloat16", None, "threshold", marks=pytest.mark.slow),
    pytest.param(2, 2048, 1280, "float32", None, "threshold", marks=pytest.mark.slow),
    pytest.param(2, 160, 4096, "float32", None, "threshold", marks=pytest.mark.slow),
    pytest.param(3, 64, 4096, "bfloat16", None, "threshold", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(CASE_NAMES, LARGE_K)
def test_large_k_matches_reference(tokens, n, top_k, dtype, block_tokens, axis_sort, key):
    assert top_k > 1024 and head_ranks(n, top_k) ** 2 >= top_k
    check_against_reference(key, tokens, n, top_k, dtype, block_tokens, axis_sort)


def test_large_k_ties_match_brute_force(seed):
    # As `test_ties_match_brute_force`, at K > 1024 with the bucketing (k' = n = 160 > h = 64): five values per
    # axis put every bucket boundary and the K-th score inside runs of ties.
    n, top_k = 160, 1280
    assert min(top_k, n) > head_ranks(n, top_k) == 64
    rng = np.random.default_rng(seed)
    lpx = rng.integers(-4, 1, (4, n)).astype(np.float32)
    lpy = rng.integers(-4, 1, (4, n)).astype(np.float32)
    lpx[0], lpy[0] = 0.0, 0.0
    lpx = jnp.asarray(lpx, jnp.bfloat16)
    lpy = jnp.asarray(lpy, jnp.bfloat16)
    got = pallas_route(lpx, lpy, top_k)
    assert_routes_equal(got, omni_router_brute_force(lpx, lpy, top_k))
    np.testing.assert_array_equal(got[1][0], np.arange(top_k))


def test_ties_across_bucket_boundaries_match_brute_force(seed):
    # Four distinct values per axis: every bucket boundary of step 1 falls inside a run of ties, which the
    # prefix counts must split by column exactly as the reference's lower-index-first rule does.
    n, top_k = 160, 512
    assert min(top_k, n) > head_ranks(n, top_k)
    rng = np.random.default_rng(seed)
    lpx = rng.integers(-3, 1, (8, n)).astype(np.float32)
    lpy = rng.integers(-3, 1, (8, n)).astype(np.float32)
    lpx[:2], lpy[:2] = 0.0, 0.0
    lpx[2], lpy[2] = -np.inf, -np.inf
    got = pallas_route(jnp.asarray(lpx), jnp.asarray(lpy), top_k)
    assert_routes_equal(got, omni_router_brute_force(jnp.asarray(lpx), jnp.asarray(lpy), top_k))
    np.testing.assert_array_equal(got[1][:3], np.tile(np.arange(top_k), (3, 1)))


def test_compacted_slots_are_a_power_of_two_between_k_and_half_the_slots():
    for n, top_k in [(100, 128), (320, 512), (320, 1024), (256, 1280), (256, 2048), (4096, 4096)]:
        slots, width = candidate_table(n, top_k).shape[1], compacted_slots(n, top_k)
        assert is_power_of_two(width) and 1.5 * top_k <= width <= slots // 2, (n, top_k)
    assert compacted_slots(320, 512) == 1024 and compacted_slots(256, 1280) == 2048
    for n, top_k in [(256, 64), (64, 16), (3, 9)]:  # too few slots: no compaction
        assert compacted_slots(n, top_k) == candidate_table(n, top_k).shape[1]


def test_merge_compaction_and_its_fallback_match_brute_force(seed):
    # Step 3 compacts a tile's candidates >= its lower bound into B = 256 of the 1,024 slots once every token
    # has at most B of them, else (ties at the K-th score beyond B) finishes over all slots. The cases of
    # `router_compaction_cases` lie on both sides of B (which it asserts with its host model of the merge),
    # one token per tile and two (a fitting token beside one that does not fit sends both over all slots),
    # and with the compaction off: all must give the brute force's routing, and the same slot order.
    n, top_k = 100, 128
    assert compacted_slots(n, top_k) == 256 < candidate_table(n, top_k).shape[1]
    lpx, lpy = map(jnp.asarray, router_compaction_cases(n, top_k, np.random.default_rng(seed)))
    want = omni_router_brute_force(lpx, lpy, top_k)
    unsorted = []
    for block_tokens, compact_merge in ((1, True), (2, True), (1, False)):
        config = dataclasses.replace(
            default_config(len(lpx), n, top_k), block_tokens=block_tokens, compact_merge=compact_merge
        )
        got, got_unsorted, _ = pallas_route_both_orders(lpx, lpy, top_k, config)
        assert_routes_equal(got, want)
        assert_same_sets(got_unsorted, want)
        unsorted.append(got_unsorted)
    for other in unsorted[1:]:
        for got, first in zip(other, unsorted[0], strict=True):
            np.testing.assert_array_equal(got, first)
    # A ragged last tile: tokens 0 and 2 fit at once, token 4 (continuous) after halvings over all slots,
    # beside a token past the input, whose slots must not keep the tile from compacting.
    ragged = np.array([0, 2, 4])
    fits, at_lo = router_merge_outcomes(lpx[ragged], lpy[ragged], top_k, block_tokens=2)
    assert fits.all() and (at_lo <= 256).all()
    config = dataclasses.replace(default_config(len(ragged), n, top_k), block_tokens=2)
    got, got_unsorted, _ = pallas_route_both_orders(lpx[ragged], lpy[ragged], top_k, config)
    assert_routes_equal(got, tuple(w[ragged] for w in want))
    for got_part, first in zip(got_unsorted, unsorted[0], strict=True):
        np.testing.assert_array_equal(got_part, first[ragged])


def test_minus_infinity_only_ties_where_every_score_is_minus_infinity(seed):
    # -inf absorbs the other axis: the sums tie although the axes differ, which the dominance argument (and
    # the reference's own per-axis pruning) do not see. The scores still match, and so does every expert
    # with a finite score; which of the tied -inf experts fill the last places may differ.
    n, top_k = 6, 13
    rng = np.random.default_rng(seed)
    lpx = rng.normal(size=(64, n)).astype(np.float32)
    lpy = rng.normal(size=(64, n)).astype(np.float32)
    lpx[rng.random((64, n)) < 0.4] = -np.inf
    lpy[rng.random((64, n)) < 0.4] = -np.inf
    scores, indices = pallas_route(jnp.asarray(lpx), jnp.asarray(lpy), top_k)
    want_scores, want_indices = omni_router_brute_force(jnp.asarray(lpx), jnp.asarray(lpy), top_k)
    np.testing.assert_array_equal(scores, want_scores)
    finite = np.isfinite(np.asarray(want_scores))
    assert 0 < finite.sum() < finite.size, "the draw must mix finite and -inf scores"
    indices = np.asarray(indices)
    np.testing.assert_array_equal(indices[finite], np.asarray(want_indices)[finite])
    token = np.arange(64)[:, None]
    np.testing.assert_array_equal(lpx[token, indices // n] + lpy[token, indices % n], scores)
    assert all(len(set(row)) == top_k for row in indices.tolist()), "an expert chosen twice"


@functools.partial(jax.jit, static_argnames=("top_k", "config"), compiler_options=FAST_COMPILE)
def pallas_route_both_orders(lpx, lpy, top_k, config):
    """The kernel router's output sorted by score and unsorted, and (unsorted) its input gradients for a
    loss that weighs each score by its expert only, so that any order of the K gives the same gradient."""
    route = functools.partial(omni_router, top_k=top_k, implementation="pallas", interpret=True, config=config)
    expert_weight = jnp.cos(jnp.arange(lpx.shape[1] ** 2, dtype=jnp.float32))  # [N]

    def loss(a, b):
        scores, indices = route(a, b, sort_by_score=False)
        return jnp.sum(scores * expert_weight[indices]), (scores, indices)

    grads, unsorted = jax.grad(loss, argnums=(0, 1), has_aux=True)(lpx, lpy)
    return route(lpx, lpy), unsorted, grads


def assert_reference_gradients(dx, dy, lpx, lpy, top_k, dtype):
    """dx, dy: `pallas_route_both_orders`' gradients, against the reference router's for the same loss."""
    expert_weight = jnp.cos(jnp.arange(lpx.shape[1] ** 2, dtype=jnp.float32))  # [N], as that loss weighs

    def reference_loss(a, b):
        scores, indices = omni_router_reference(a, b, top_k)
        return jnp.sum(scores * expert_weight[indices])

    want_dx, want_dy = jax.grad(reference_loss, argnums=(0, 1))(lpx, lpy)
    assert_close(dx, want_dx, dtype, what="d log_probs_x")
    assert_close(dy, want_dy, dtype, what="d log_probs_y")


def assert_same_sets(got, want):
    """Per row, the same K (index, score) pairs: both sorted by index, then compared bit for bit."""
    (scores, indices), (want_scores, want_indices) = (tuple(map(np.asarray, pair)) for pair in (got, want))
    assert scores.shape == want_scores.shape and indices.dtype == want_indices.dtype == np.int32
    by_index, want_by_index = np.argsort(indices, axis=1), np.argsort(want_indices, axis=1)
    np.testing.assert_array_equal(
        np.take_along_axis(indices, by_index, 1), np.take_along_axis(want_indices, want_by_index, 1)
    )
    np.testing.assert_array_equal(
        np.take_along_axis(scores, by_index, 1), np.take_along_axis(want_scores, want_by_index, 1)
    )


def axis_ranks(log_probs):
    """[T, n] int: each entry's rank on its axis (lax.top_k's order: descending, ties by lower column)."""
    _, order = jax.lax.top_k(kernel.order_key(log_probs.astype(jnp.float32)), log_probs.shape[1])
    return np.argsort(np.asarray(order), axis=1)


@pytest.mark.parametrize(
    ("tokens", "n", "top_k", "dtype", "axis_sort"),
    [
        (9, 16, 40, "float32", "threshold"),  # exact axis order (k' = n <= the head)
        (5, 100, 64, "bfloat16", "select"),  # a full sort
        (3, 256, 1280, "bfloat16", "threshold"),  # bucketed axis order, small-omnimoe's n and K
    ],
)
def test_unsorted_output_is_the_sorted_set_in_slot_order(tokens, n, top_k, dtype, axis_sort, key):
    lpx, lpy = log_probs(key, tokens, n, dtype)
    config = dataclasses.replace(default_config(tokens, n, top_k), axis_sort=axis_sort)
    got_sorted, unsorted, (dx, dy) = pallas_route_both_orders(lpx, lpy, top_k, config)
    want = omni_router_reference(lpx, lpy, top_k)
    assert_routes_equal(got_sorted, want)
    assert_same_sets(unsorted, want)
    indices = np.asarray(unsorted[1])
    assert not np.array_equal(indices, np.asarray(want[1])), "sort_by_score=False must skip the sort"
    if min(top_k, n) <= head_ranks(n, top_k) or axis_sort == "select":
        # Exact axis orders: slot order is (rank of the row on x, rank of the column on y) ascending.
        tok = np.arange(tokens)[:, None]
        pairs = axis_ranks(lpx)[tok, indices // n] * n + axis_ranks(lpy)[tok, indices % n]
        assert np.all(np.diff(pairs, axis=1) > 0), "not in slot order"
    # Gradients through the unsorted output: those of the reference (sorted) for the same loss.
    assert_reference_gradients(dx, dy, lpx, lpy, top_k, dtype)


def test_unsorted_xla_output_stays_in_score_order(key):
    # The reference's selection is its sort: sort_by_score=False changes nothing there.
    lpx, lpy = log_probs(key, 4, 16, "float32")
    got = omni_router(lpx, lpy, 40, implementation="xla", sort_by_score=False)
    assert_routes_equal(got, omni_router_reference(lpx, lpy, 40))


def test_sort_by_score_must_be_a_bool():
    lpx = jnp.zeros((4, 8))
    with pytest.raises(TypeError, match="sort_by_score must be a bool, got 1"):
        omni_router(lpx, lpx, 3, implementation="pallas", interpret=True, sort_by_score=1)


def sorted_positions(log_probs, k_axis):
    """What step 1 (and the jax-triton kernel) hands to the merge: [T, k'] columns of the top k'."""
    _, positions = jax.lax.top_k(kernel.order_key(log_probs.astype(jnp.float32)), k_axis)  # ties: lower first
    return positions.astype(jnp.int32)


@pytest.mark.parametrize(("tokens", "n", "top_k"), [(128, 100, 64), (8, 320, 512)])
def test_merge_from_presorted_axes_matches_reference(tokens, n, top_k, key):
    # The merge kernel alone, as implementation="triton" uses it after its native sorting kernel: a full
    # sort is finer than the bucket order the candidate table assumes where k' > the head (n = 320).
    lpx, lpy = log_probs(key, tokens, n, "bfloat16")
    config = default_config(tokens, n, top_k)
    merge = functools.partial(kernel.router_merge, top_k=top_k, config=config, interpret=True)
    unsorted = jax.jit(functools.partial(merge, sort_by_score=False), compiler_options=FAST_COMPILE)
    merge = jax.jit(merge, compiler_options=FAST_COMPILE)
    positions = sorted_positions(lpx, min(top_k, n)), sorted_positions(lpy, min(top_k, n))
    want = omni_router_reference(lpx, lpy, top_k)
    assert_routes_equal(merge(lpx, lpy, *positions), want)
    assert_same_sets(unsorted(lpx, lpy, *positions), want)


def test_no_tokens():
    empty = jnp.zeros((0, 5), jnp.float32)
    scores, indices = omni_router(empty, empty, 3, implementation="pallas", interpret=True)
    assert scores.shape == indices.shape == (0, 3)


@pytest.mark.parametrize(
    ("tokens", "n", "top_k"),
    [(1, 2, 1), (4096, 64, 16), (16384, 1024, 64), (4096, 320, 512), (32768, 256, 1280), (32768, 320, 2048)],
)
def test_default_config_stays_in_budget(tokens, n, top_k):
    config = default_config(tokens, n, top_k)
    slots = candidate_table(n, top_k).shape[1]
    widest = max(next_power_of_2(n), slots)
    assert 4 <= config.num_warps <= 16
    if widest <= 8192:
        assert config.block_tokens * widest <= 32 * 16 * config.num_warps, "more than ~16 registers/thread/array"
    else:  # wider than 16 warps hold at 16 registers per thread: as few tokens and as many warps as there are
        assert config.block_tokens == 1 and config.num_warps == 16
    assert config.block_tokens == 1 or -(-tokens // config.block_tokens) >= 264, "too few programs"
    assert config.block_tokens * config.backward_block_k * next_power_of_2(n) <= 512 * config.num_warps


@pytest.mark.parametrize(
    ("n", "top_k"),
    [(3, 9), (16, 16), (320, 512), (100, 1), (200, 512), (320, 1024), (1024, 1024), (256, 1280), (320, 2048)],
)
def test_candidate_table_is_the_dominance_region_of_the_rank_floors(n, top_k):
    k_axis = min(top_k, n)
    floors = rank_floors(n, top_k)
    head = min(head_ranks(n, top_k), k_axis)
    # Exact ranks in the head, then buckets [r, 2r) whose floor is r, cut at k'.
    np.testing.assert_array_equal(floors[:head], np.arange(head))
    for position in range(head, k_axis):
        start = 1 << (position // head).bit_length() - 1
        assert floors[position] == head * start
    table = candidate_table(n, top_k)
    pairs = {(a, b) for a, b in table.T if a >= 0}
    want = {(a, b) for a in range(k_axis) for b in range(k_axis) if (floors[a] + 1) * (floors[b] + 1) <= top_k}
    assert pairs == want and len(pairs) == int((table[0] >= 0).sum())
    exact = {(a, b) for a in range(k_axis) for b in range(k_axis) if (a + 1) * (b + 1) <= top_k}
    assert exact <= pairs, "the coarser order keeps every pair an exact order would"
    # The head is chosen so that the coarser order costs no more slots than an exact one.
    assert table.shape[1] == next_power_of_2(len(pairs)) == next_power_of_2(len(exact))


def test_candidate_table_sizes_at_the_papers_setting():
    assert head_ranks(320, 512) == 32 and len(candidate_table(320, 512)[0]) == 4096  # of 102,400
    assert len(candidate_table(320, 1024)[0]) == 8192


@pytest.mark.parametrize(
    ("n", "top_k"),
    [(2, 4), (3, 9), (16, 16), (100, 1), (320, 512), (320, 1024), (4096, 1024), (256, 1280), (64, 4096), (4096, 4096)],
)
def test_bound_pairs_are_exact_head_ranks_beaten_by_k_pairs(n, top_k):
    head = min(head_ranks(n, top_k), top_k, n)
    assert head == min(top_k, n) or head * head >= top_k, "a bucketed head must hold a pair beaten by K"
    table = bound_table(n, top_k)
    pairs = [(a, b) for a, b in table.T if a >= 0]
    assert pairs and table.shape[1] == next_power_of_2(len(pairs))
    assert all(a < head and b < head and (a + 1) * (b + 1) >= top_k for a, b in pairs)


def test_order_key_follows_the_total_order():
    values = np.array([np.nan, np.inf, 3.5, 1e-30, 0.0, -0.0, -1e-30, -2.0, -np.inf, -np.nan], np.float32)
    keys = np.asarray(kernel.order_key(jnp.asarray(values)))
    assert np.all(keys[:-1] > keys[1:])
    np.testing.assert_array_equal(np.asarray(kernel.key_value(jnp.asarray(keys))).view(np.int32), values.view(np.int32))


@pytest.mark.parametrize(
    ("shape", "dtypes", "top_k", "config", "error", "match"),
    [
        ((4, 40), ("float64",) * 2, 4, None, ValueError, "dtype float64; implementation='pallas' takes float32 or"),
        ((4, 40), ("float16",) * 2, 4, None, ValueError, "dtype float16"),
        ((4, 40), ("float32", "bfloat16"), 4, None, ValueError, "must have one dtype"),
        ((4, 4097), ("float32",) * 2, 2, None, ValueError, r"n=4097 experts per axis; .* takes 2 <= n <= 4096"),
        ((4, 1), ("float32",) * 2, 1, None, ValueError, r"n=1 experts per axis"),
        ((4, 65), ("float32",) * 2, 4097, None, ValueError, r"top_k=4097; .* takes top_k <= 4096"),
        ((4, 40), ("float32",) * 2, 4, (8, 4), TypeError, "config must be a RouterConfig or None"),
    ],
)
def test_kernel_limits_are_refused(shape, dtypes, top_k, config, error, match):
    with jax.enable_x64(True):
        lpx, lpy = (jnp.zeros(shape, dtype) for dtype in dtypes)
        with pytest.raises(error, match=match):
            omni_router(lpx, lpy, top_k, implementation="pallas", interpret=True, config=config)


def test_auto_falls_back_to_the_reference_where_kernels_do_not_apply(monkeypatch):
    monkeypatch.setattr(_dispatch, "on_gpu", lambda: True)  # "auto" would pick the kernel...
    with jax.enable_x64(True):
        lpx = jnp.log(jnp.full((3, 4), 0.25, jnp.float64))  # ...but float64 is not a kernel dtype
        scores, indices = omni_router(lpx, lpx, 5, implementation="auto")
        np.testing.assert_array_equal(indices, omni_router_reference(lpx, lpx, 5)[1])
        assert scores.dtype == jnp.float64


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("block_tokens", 3, "power-of-two"),
        ("block_tokens", 128, "<= 64"),
        ("num_warps", 0, "power-of-two"),
        ("num_warps", 32, "<= 16"),
        ("backward_block_k", True, "power-of-two"),
        ("num_stages", 0, "positive int"),
        ("axis_sort", "sort", "must be one of"),
        ("compact_merge", 1, "must be a bool"),
    ],
)
def test_bad_configs_are_refused(field, value, match):
    fields = dict(block_tokens=1, num_warps=4, num_stages=1, backward_block_k=1, axis_sort="select")
    fields[field] = value
    with pytest.raises(ValueError, match=f"RouterConfig.{field}={value!r}.*{match}"):
        RouterConfig(**fields)


def test_triton_needs_a_gpu_and_jax_triton(monkeypatch):
    lpx = jnp.zeros((4, 8))
    with pytest.raises(ValueError, match='implementation="triton" runs only on a GPU'):
        omni_router(lpx, lpx, 3, implementation="triton")
    with pytest.raises(ValueError, match="interpret=True is not available"):
        omni_router(lpx, lpx, 3, implementation="triton", interpret=True)
    monkeypatch.setattr(_dispatch, "on_gpu", lambda: True)
    monkeypatch.setitem(sys.modules, "jax_triton", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=r'pip install "omnimoe-jax\[triton\]"'):
        omni_router(lpx, lpx, 3, implementation="triton")


def test_auto_with_interpret_stays_on_pallas(monkeypatch):
    # On a GPU with jax-triton, "auto" takes the triton variant from K = 65; it has no interpret mode, so a
    # caller asking for interpret=True gets the Pallas kernels (interpreted) instead of an error.
    monkeypatch.setattr(_dispatch, "on_gpu", lambda: True)
    monkeypatch.setattr(api, "_triton_available", lambda: True)
    lpx = jax.nn.log_softmax(normal(jax.random.key(0), (2, 16)))
    _, indices = omni_router(lpx, lpx, 70, implementation="auto", interpret=True)
    np.testing.assert_array_equal(indices, omni_router_reference(lpx, lpx, 70)[1])


# CUDA lowering on the CPU: Pallas -> Triton IR for the GPU, which fails on anything Triton cannot lower.


def check_cuda_lowering(tokens, n, top_k, dtype, axis_sort="threshold"):
    lpx = jnp.zeros((tokens, n), dtype)
    config = dataclasses.replace(default_config(tokens, n, top_k), axis_sort=axis_sort)
    route = functools.partial(omni_router, top_k=top_k, implementation="pallas", interpret=False, config=config)
    text = lower_for_cuda(route, lpx, lpx).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1, "the forward must be one Triton kernel"

    def loss(a, b):
        scores, _ = route(a, b)
        return jnp.sum(scores * jnp.arange(top_k, dtype=jnp.float32))

    text = lower_for_cuda(jax.grad(loss, argnums=(0, 1)), lpx, lpx).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2, "forward and backward kernels"
    merge = functools.partial(kernel.router_merge, top_k=top_k, config=config, interpret=False)
    positions = jnp.zeros((tokens, min(top_k, n)), jnp.int32)
    lower_for_cuda(merge, lpx, lpx, positions, positions)


@pytest.mark.parametrize(
    CASE_NAMES,
    [
        *DEFAULT,
        (16384, 4096, 1024, "float32", None, "threshold"),
        (4096, 320, 512, "bfloat16", None, "threshold"),
        (4096, 320, 1024, "float32", None, "threshold"),
        (4096, 1024, 1024, "bfloat16", None, "threshold"),
        (4096, 320, 1024, "bfloat16", None, "select"),
        (32768, 256, 1280, "bfloat16", None, "threshold"),  # small-omnimoe's router (K > 1024)
        (4096, 320, 2048, "float32", None, "threshold"),
        (4096, 4096, 4096, "bfloat16", None, "threshold"),  # K = MAX_TOP_K, 65,536 slots
        (4096, 256, 2048, "bfloat16", None, "select"),
    ],
)
def test_lowers_for_cuda(tokens, n, top_k, dtype, block_tokens, axis_sort):
    check_cuda_lowering(tokens, n, top_k, dtype, axis_sort)


@pytest.mark.parametrize(("tokens", "n", "top_k"), [(32768, 256, 1280), (4096, 320, 512)])
def test_unsorted_output_lowers_without_a_sort(tokens, n, top_k):
    lpx = jnp.zeros((tokens, n), jnp.bfloat16)
    for sort_by_score, sorts in ((True, 1), (False, 0)):
        route = functools.partial(
            omni_router, top_k=top_k, implementation="pallas", interpret=False, sort_by_score=sort_by_score
        )
        text = lower_for_cuda(route, lpx, lpx).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 1 and text.count("stablehlo.sort") == sorts, sort_by_score


def test_lowers_for_cuda_with_64_bit_defaults():
    # With x64 on, jnp reductions and index ops default to 64-bit types, which Triton kernels must not see.
    with jax.enable_x64(True):
        check_cuda_lowering(100, 320, 512, "float32")


@pytest.mark.slow
@pytest.mark.parametrize(CASE_NAMES, FULL_PRODUCT)
def test_lowers_for_cuda_full_product(tokens, n, top_k, dtype, block_tokens, axis_sort):
    check_cuda_lowering(tokens, n, top_k, dtype, axis_sort)


@pytest.mark.triton
def test_native_triton_kernel_compiles_for_sm90():
    # An opt-in tier (-m triton, with the `triton` extra installed): compiles to a cubin with triton's own
    # ptxas. Not in the default suite, whose clean-clone install stays small.
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pallas_kernels.omni_router import triton_kernel

    signature = {name: "*bf16" for name in ("lpx_ptr", "lpy_ptr")}
    signature.update({name: "*i32" for name in ("x_pos_ptr", "y_pos_ptr")})
    constants = dict(TOKENS=1000, N=320, N_PAD=512, K_AXIS=320, K_PAD=512, BLOCK_TOKENS=1)
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(triton_kernel.sort_axes_kernel, signature, constants)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=1, enable_fp_fusion=False)
    )
    assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0


# The layer with the kernel router: same routing and the same gradients as with the reference router.


def layer_config(implementation):
    return OmniMoEConfig(
        hidden_size=32, intermediate_size=48, num_experts=64, num_experts_per_token=6, implementation=implementation
    )


def test_router_module_unsorted_then_by_score_is_the_sorted_routing(key):
    # What the layers do: route unsorted, sort only the RoutingResult they return.
    x = normal(key, (40, 32))
    router = CartesianRouter(layer_config("pallas"))
    variables = router.init(jax.random.key(1), x)
    routed = jax.jit(lambda v, a, s: router.apply(v, a, sort_by_score=s), static_argnums=2)
    want, unsorted = routed(variables, x, True), routed(variables, x, False)
    assert not np.array_equal(unsorted.indices, want.indices)
    assert_same_sets((unsorted.scores, unsorted.indices), (want.scores, want.indices))
    got = by_score(unsorted)
    assert_routes_equal((got.scores, got.indices), (want.scores, want.indices))
    np.testing.assert_array_equal(got.weights, want.weights)  # exp(score) per entry: no sum to reorder
    np.testing.assert_array_equal(got.logits_x, want.logits_x)


def test_router_module_with_the_pallas_kernel(key):
    x = normal(key, (40, 32))
    pallas, xla = CartesianRouter(layer_config("pallas")), CartesianRouter(layer_config("xla"))
    variables = xla.init(jax.random.key(1), x)
    readout = normal(jax.random.fold_in(key, 1), (40, 6))

    def loss(module, params, tokens):
        routing = module.apply({**variables, "params": params}, tokens)
        return jnp.sum(routing.weights * readout), routing

    grad = jax.jit(jax.grad(loss, argnums=(1, 2), has_aux=True), static_argnums=0)
    (got_params, got_x), got = grad(pallas, variables["params"], x)
    (want_params, want_x), want = grad(xla, variables["params"], x)
    assert_routes_equal((got.scores, got.indices), (want.scores, want.indices))
    np.testing.assert_array_equal(got.weights, want.weights)
    for g, w in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params), strict=True):
        assert_close(g, w, jnp.float32, what="router parameter gradient")
    assert_close(got_x, want_x, jnp.float32, what="input gradient")


@pytest.mark.skipif(
    "pallas" not in expert_api.SUPPORTED_IMPLEMENTATIONS, reason="omni_expert has no Pallas implementation yet"
)
def test_layer_with_pallas_kernels(key):
    x = normal(key, (40, 32))
    variables = OmniMoE(layer_config("xla")).init(jax.random.key(1), x)

    def loss(config, params, tokens):
        y, routing = OmniMoE(config).apply({**variables, "params": params}, tokens, return_routing=True)
        return jnp.sum(jnp.sin(y)), (y, routing.indices)

    grad = jax.jit(jax.grad(loss, argnums=(1, 2), has_aux=True), static_argnums=0)
    got_grads, (got_y, got_indices) = grad(layer_config("pallas"), variables["params"], x)
    want_grads, (want_y, want_indices) = grad(layer_config("xla"), variables["params"], x)
    np.testing.assert_array_equal(got_indices, want_indices)  # the returned routing is sorted by score
    # The experts take the router's unsorted output whether or not the routing is returned: the same y.
    layer = OmniMoE(layer_config("pallas"))
    y, (y_again, _) = jax.jit(lambda v, a: (layer.apply(v, a), layer.apply(v, a, return_routing=True)))(variables, x)
    np.testing.assert_array_equal(y, y_again)
    assert_close(got_y, want_y, jnp.float32)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        assert_close(g, w, jnp.float32, what="layer gradient")


# RouterConfig.backward="factored": a per-token [n_pad / 16, 16] block product; "onehot" where n_pad < 256.
FACTORED_CASES = [
    # (T, n, K, dtype): n_pad = 16 (runs "onehot"), 256 and 512 (n = 320); K = 8, 512 and 1280; ragged T.
    (5, 16, 8, "float32"),
    (3, 16, 256, "bfloat16"),
    (5, 256, 8, "float32"),
    (3, 256, 512, "bfloat16"),
    (3, 256, 1280, "float32"),
    (7, 320, 8, "bfloat16"),
    (5, 320, 512, "float32"),
    (3, 320, 1280, "bfloat16"),
]


def factored_config(tokens, n, top_k, backward="factored"):
    config = dataclasses.replace(default_config(tokens, n, top_k), backward=backward)
    applies = next_power_of_2(n) >= MIN_FACTORED_AXIS
    assert kernel.uses_factored_backward(n, config) == (applies and backward == "factored")
    return config


@pytest.mark.parametrize(
    ("tokens", "n", "top_k", "want"),
    [
        (64, 16, 8, "onehot"),
        (4096, 128, 128, "onehot"),
        (4096, 200, 512, "factored"),  # n_pad = 256
        (4096, 256, 8, "factored"),
        (32768, 320, 1280, "factored"),
    ],
)
def test_default_config_takes_the_factored_backward_where_it_applies(tokens, n, top_k, want):
    # "factored" was the faster backward at every shape measured (benchmarks/NOTES.md); below n_pad = 256 it
    # would run "onehot" anyway, and the config says so.
    assert default_config(tokens, n, top_k).backward == want


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize(("tokens", "n", "top_k", "dtype"), FACTORED_CASES)
def test_each_backward_matches_reference(tokens, n, top_k, dtype, backward, key):
    # Both backwards at every case, so "onehot" stays checked at n_pad >= 256 where the default is "factored".
    k1, k2 = jax.random.split(key)
    lpx, lpy = log_probs(k1, tokens, n, dtype)
    cotangent = normal(k2, (tokens, top_k))
    got, (dx, dy) = route_vjp(lpx, lpy, cotangent, top_k, "pallas", factored_config(tokens, n, top_k, backward))
    want, (want_dx, want_dy) = route_vjp(lpx, lpy, cotangent, top_k, "xla")
    assert_routes_equal(got, want)
    assert dx.dtype == lpx.dtype and dy.dtype == lpy.dtype
    assert_close(dx, want_dx, dtype, what="d log_probs_x")
    assert_close(dy, want_dy, dtype, what="d log_probs_y")


@pytest.mark.parametrize(("tokens", "n", "top_k", "dtype"), FACTORED_CASES)
def test_factored_backward_through_the_unsorted_output(tokens, n, top_k, dtype, key):
    lpx, lpy = log_probs(key, tokens, n, dtype)
    _, unsorted, (dx, dy) = pallas_route_both_orders(lpx, lpy, top_k, factored_config(tokens, n, top_k))
    assert_same_sets(unsorted, omni_router_reference(lpx, lpy, top_k))
    assert_reference_gradients(dx, dy, lpx, lpy, top_k, dtype)


@pytest.mark.parametrize(("n", "top_k"), [(16, 8), (16, 256), (256, 8), (256, 512), (256, 1280), (320, 1280)])
def test_factored_backward_sums_repeated_experts(n, top_k, seed):
    # The forward never repeats an expert, but the backward takes any [T, K] ids: here many repeats (ids
    # from a few rows and columns), both backwards against a float64 scatter-add.
    rng = np.random.default_rng(seed)
    tokens = 5
    rows, cols = rng.integers(0, n, (2, tokens, top_k)) % rng.integers(1, 4, (2, tokens, 1))
    experts = (rows * n + cols).astype(np.int32)
    dscores = rng.standard_normal((tokens, top_k)).astype(np.float32)
    want_dx, want_dy = np.zeros((tokens, n)), np.zeros((tokens, n))
    for t in range(tokens):
        np.add.at(want_dx[t], rows[t], dscores[t])
        np.add.at(want_dy[t], cols[t], dscores[t])
    for backward in BACKWARDS:
        config = dataclasses.replace(default_config(tokens, n, top_k), backward=backward)
        dx, dy = jax.jit(
            functools.partial(kernel.router_backward, n=n, dtype=jnp.float32, config=config, interpret=True),
            compiler_options=FAST_COMPILE,
        )(dscores, experts)
        assert_close(dx, want_dx, "float32", what=f"{backward}: d log_probs_x")
        assert_close(dy, want_dy, "float32", what=f"{backward}: d log_probs_y")


def test_bad_backward_is_refused():
    with pytest.raises(ValueError, match=r"RouterConfig.backward='fast'.*must be one of \('onehot', 'factored'\)"):
        RouterConfig(block_tokens=1, num_warps=4, backward="fast")
    for bad in (3, 32, 0, 4.0):
        with pytest.raises(ValueError, match=r"RouterConfig.backward_num_warps="):
            RouterConfig(block_tokens=1, num_warps=4, backward_num_warps=bad)


@pytest.mark.parametrize(("tokens", "n", "top_k"), [(32768, 256, 1280), (4096, 320, 512), (64, 16, 8)])
def test_backward_runs_at_its_own_warps_whatever_the_forward_takes(tokens, n, top_k):
    # The forward's 16 warps at K = 1280 made both backwards 2-5x slower than 4 on an H200 (NOTES.md).
    config = default_config(tokens, n, top_k)
    assert config.backward_num_warps == 4
    dscores = jnp.zeros((tokens, top_k), jnp.float32)
    experts = jnp.zeros((tokens, top_k), jnp.int32)
    backward = functools.partial(kernel.router_backward, n=n, dtype=jnp.bfloat16, config=config, interpret=False)
    text = lower_for_cuda(backward, dscores, experts).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert re.search(r"num_warps\s*=\s*4\b", text), "the backward kernel's launch asks for 4 warps"


def test_factored_chunk_is_a_dot_of_at_least_16_in_the_register_budget():
    for n, top_k, num_warps in itertools.product((256, 320, 1024, 4096), (1, 8, 512, 1280, 4096), (1, 4, 16)):
        block_k = kernel.factored_block_k(n, top_k, num_warps)
        assert is_power_of_two(block_k) and 16 <= block_k <= max(16, next_power_of_2(top_k))
        assert block_k == 16 or block_k * next_power_of_2(n) // 16 <= 512 * num_warps


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize(("tokens", "n", "top_k"), [(32768, 256, 1280), (4096, 320, 512)])
def test_each_backward_lowers_for_cuda(tokens, n, top_k, backward):
    lpx = jnp.zeros((tokens, n), jnp.bfloat16)
    config = factored_config(tokens, n, top_k, backward)
    for sort_by_score in (True, False):
        route = functools.partial(
            omni_router,
            top_k=top_k,
            implementation="pallas",
            interpret=False,
            config=config,
            sort_by_score=sort_by_score,
        )

        def loss(a, b, route=route):
            scores, _ = route(a, b)
            return jnp.sum(scores * jnp.arange(top_k, dtype=jnp.float32))

        text = lower_for_cuda(jax.grad(loss, argnums=(0, 1)), lpx, lpx).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 2, "forward and backward kernels"
    backward = functools.partial(kernel.router_backward, n=n, dtype=jnp.bfloat16, config=config, interpret=False)
    dscores = jnp.zeros((tokens, top_k), jnp.float32)
    text = lower_for_cuda(backward, dscores, jnp.zeros((tokens, top_k), jnp.int32)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
