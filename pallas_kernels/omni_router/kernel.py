"""Pallas (Triton lowering) kernels of the Cartesian top-K router. No autodiff here: `api` adds the VJP.
The host-side pieces they are built from (the size limits, the static tables `head_ranks`, `rank_floors`,
`candidate_table`, `bound_table`, and the tiling `RouterConfig` / `default_config`) live in config.py.

Forward, one program per tile of `block_tokens` tokens; besides the [T, K] result it writes only [T, k']
scratch rows per axis (the ordered positions; for "threshold" also the column-ordered winners and heads),
which it reads straight back:

1. Ordered axes. For each axis the positions of the top k' = min(K, n) log-probs in an order that is exact
   for the first h = `head_ranks(n, K)` ranks (all k' up to 128, else 32-128 with h^2 >= K), descending,
   ties by lower position (exactly `lax.top_k`'s order), with the rest in octave buckets of ranks [h, 2h), [2h, 4h), ...
   (each in column order; `rank_floors`). Values are compared as order-preserving int32 keys (`order_key`), so
   -inf, -0.0 and NaN order as in the IEEE total order `lax.top_k` uses and can never be confused with
   the padding sentinel. Two methods (`RouterConfig.axis_sort`):
   "threshold" (default): where k' < n, bisection on the key finds the k'-th largest (16 steps for bf16 inputs,
   32 for f32) and prefix counts take the k' winners (ties by lower column) and pack them in column order into
   scratch rows. Where k' > h, one more bisection, vectorised over both axes and the bucket boundaries and
   started from each row's key range, finds the top h, 2h, 4h, ... of those, and prefix counts place every
   entry in its bucket and pack the head into scratch rows. The head's ranks are counts of the head entries
   that beat each one (an h^2 count; k'^2 where k' <= h).
   "select": k' passes of "argmax (one fused value/index reduction), then knock it out": a full sort,
   which is finer than the bucket order and serves the same tables.
   The program stores its rows of both position lists and waits at a barrier.
2. Dominance. An entry at position p of that order has rank >= f(p) (`rank_floors`: p in the head, the
   bucket's first rank after it), so the expert at position pair (a, b) scores no more than the
   (f(a)+1)(f(b)+1) - 1 other pairs ranked no lower on both axes, each of which also wins a tie on the
   expert index; only pairs with (f(a)+1)(f(b)+1) <= K can be in the top K. For an exact order that is
   (a+1)(b+1) <= K, about K (ln K + 1) of the k'^2 pairs (2,896 of 102,400 for n = 320, K = 512); the
   buckets add some (3,604 there), and h is the smallest head whose pairs still fit the exact region's
   power-of-two slot count (4,096 there). `candidate_table` lists them once for all tokens; each program
   gathers the positions at those places, then the log-probs at those positions, into one [block_tokens,
   slots] array of f32 sums. (Pallas has no gather from registers, hence the round trip through memory; a
   program reads back only what it just wrote, from L1/L2.)
3. Threshold. Bisection on the int32 key finds tau, the K-th largest candidate score, between the best of
   the head pairs of `bound_table` (each beaten by >= K pairs: a lower bound, checked by one count) and
   the top candidate, so it takes ~log2 of their key distance steps rather than 32; all candidates above
   tau are taken, and of those equal to tau a second bisection on the expert index takes the lowest ones
   (it runs only while some token in the tile has more ties at tau than places left). Only candidates
   >= the bisection's lower end can count: once every token of the tile has at most B = `compacted_slots`
   of them (most do from the start, the others after a few passes over all slots), a prefix count moves
   them, in slot order, through a [T, B] scratch into a [block_tokens, B] array, over which the remaining
   passes, the tie cut and step 4 run (B is a quarter of the slots at the paper's setting). A tile where
   some token still has more when tau is found (ties at tau beyond B) finishes over all slots. Either way
   the same candidates are taken, in the same order (`RouterConfig.compact_merge` turns it off).
4. Output. Each taken candidate gets a slot from a prefix count and is scattered to [T, K]. Slots follow
   candidate order, not score order: the pairs (a, b) ascending, a then b, where a is the row expert's
   position in step 1's order of the x axis and b the column expert's in y's ("slot order"; it depends on
   the step-1 method, exact or bucketed). `sort_by_score` orders each row with one XLA sort afterwards
   (keys: score descending, expert ascending), which is the reference's order; callers that need only the
   set skip it (`sort_by_score=False` of `router_forward`, `router_merge`).

Cost per token of step 1 "threshold": per axis ~16-32 count passes over the padded row (k' < n), ~log2 of the
row's key range passes over [2 x boundaries, k'] for both axes (k' > h), and an h^2 rank count; "select" k'
argmax passes over the row. Then ~20-32 (+ ties) count passes, a few over all candidate slots and the rest
over the B compacted ones. No step costs k'^2 (the
previous full rank count: 320^2 per axis at the paper's setting, most of its time). The `merge` kernel runs
steps 2-4 on position lists computed elsewhere (the jax-triton variant sorts with `tl.topk`, see
`triton_kernel.py`).

One caveat shared with `omni_router_reference` (whose per-axis pruning rests on the same argument): the
dominance argument assumes that x' > x implies x' + y > x + y after rounding. Where two such sums round to
the same f32 (or -inf absorbs the other axis), the tie goes to the lower expert index, which can promote a
pair the argument pruned: then the scores still agree, but which of the experts tied at the K-th score
fill the last places may differ. For finite log-probs it needs two values of one axis within an ulp of
their sum exactly at the edge of the region.

Backward: d lp_x[t, i] = sum_k dscores[t, k] [row(e_tk) == i] (and columns alike), accumulated in f32 per
tile by one-hot sums over chunks of K; repeated rows of one token add up, and no two programs touch the
same token, so there are no atomics.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.omni_router.config import (
    ELEMENTS_PER_WARP,
    FACTOR_LO,
    MIN_FACTORED_AXIS,
    RouterConfig,
    bound_table,
    candidate_table,
    compacted_slots,
    head_ranks,
    next_power_of_2,
)

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


def order_key(x: jax.Array) -> jax.Array:
    """f32 -> int32 with the order of the IEEE total order (-NaN < -inf < ... < -0 < +0 < ... < +NaN).

    Non-negative floats keep their bits; negative ones flip the 31 magnitude bits so that larger
    magnitudes sort lower. Only the bit pattern INT32_MIN (a negative NaN with a full payload) collides
    with the sentinel the kernels use for "no candidate".
    """
    bits = lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, bits ^ INT32_MAX, bits)


def key_value(key: jax.Array) -> jax.Array:
    """Inverse of `order_key`: int32 -> f32."""
    bits = jnp.where(key < 0, key ^ INT32_MAX, key)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _compiler_params(config: RouterConfig) -> pltriton.CompilerParams:
    return pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def _row_keys(log_probs_ref, t0, *, block_tokens: int):
    """Rows t0... of log_probs_ref [T, n] as order keys [bt, n_pad] (INT32_MIN past the row or the input)."""
    tokens, n = log_probs_ref.shape
    n_pad = next_power_of_2(n)
    rows = t0 + lax.broadcasted_iota(jnp.int32, (block_tokens, n_pad), 0)
    cols = lax.broadcasted_iota(jnp.int32, (block_tokens, n_pad), 1)
    inside = (rows < tokens) & (cols < n)
    x = pltriton.load(log_probs_ref.at[pl.ds(t0, block_tokens), pl.ds(0, n_pad)], mask=inside, other=0.0)
    return jnp.where(inside, order_key(x.astype(jnp.float32)), INT32_MIN), rows, cols


def _sort_axis_by_selection(log_probs_ref, positions_ref, t0, *, block_tokens: int):
    """Step 1 for one axis by k' argmax passes: rows t0... of log_probs_ref [T, n] -> positions_ref [T, k'].

    Row t of positions_ref lists the columns of the k' largest log-probs, largest first, ties by lower column.
    """
    tokens, k_axis = positions_ref.shape
    k_pad = next_power_of_2(k_axis)
    keys, _, cols = _row_keys(log_probs_ref, t0, block_tokens=block_tokens)  # [bt, n_pad]
    ranks = lax.broadcasted_iota(jnp.int32, (block_tokens, k_pad), 1)

    def take_best(rank, carry):
        keys, top = carry
        # One (value, index) reduction: the largest key, the lowest column among equal ones.
        best = lax.argmax(keys, 1, jnp.int32)[:, None]  # [bt, 1]
        knocked_out = jnp.where(cols == best, INT32_MIN, keys)
        return knocked_out, jnp.where(ranks == rank, best, top)

    _, top = lax.fori_loop(0, k_axis, take_best, (keys, jnp.zeros((block_tokens, k_pad), jnp.int32)))
    out_rows = t0 + lax.broadcasted_iota(jnp.int32, (block_tokens, k_pad), 0)
    stored = (out_rows < tokens) & (ranks < k_axis)
    pltriton.store(positions_ref.at[pl.ds(t0, block_tokens), pl.ds(0, k_pad)], top, mask=stored)


def _compact_top_of_axis(log_probs_ref, keys_ref, cols_ref, t0, *, block_tokens: int, key_bits: int):
    """Step 1a by threshold: the top k' of rows t0... -> keys_ref, cols_ref [T, k'], in column order.

    Bisection finds the k'-th largest key; the entries above it and, of those equal to it, the ones with the
    lowest columns (a prefix count) are exactly the top k'. A second prefix count packs them to the front.
    `key_bits`: significant high bits of the keys (16 for bf16 inputs: half the bisection steps).
    """
    tokens, k_axis = keys_ref.shape
    keys, rows, cols = _row_keys(log_probs_ref, t0, block_tokens=block_tokens)  # [bt, n_pad]
    shift = 32 - key_bits
    coarse = keys >> shift  # order-preserving; exact for bf16 inputs, whose keys' low 16 bits are constant

    # tau = the largest coarse key with count(coarse >= tau) >= k'. Invariant: count(>= lo) >= k' > count(>= hi).
    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without int32 overflow
        enough = jnp.sum(coarse >= mid[:, None], axis=1, dtype=jnp.int32) >= k_axis
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    bounds = (
        jnp.full((block_tokens,), INT32_MIN >> shift, jnp.int32),
        jnp.full((block_tokens,), INT32_MAX >> shift, jnp.int32),
    )
    tau, _ = lax.fori_loop(0, key_bits, halve, bounds)  # key_bits halvings close the 2^key_bits interval
    tau = tau[:, None]  # [bt, 1]
    above = coarse > tau
    tied = (coarse == tau).astype(jnp.int32)
    need = k_axis - jnp.sum(above, axis=1, keepdims=True, dtype=jnp.int32)  # [bt, 1], >= 1
    taken = above | ((tied == 1) & (lax.cumsum(tied, axis=1) <= need))  # exactly k' per token
    taken_count = taken.astype(jnp.int32)
    slot = lax.cumsum(taken_count, axis=1) - taken_count  # [bt, n_pad] exclusive prefix count
    write = taken & (rows < tokens)
    slot = jnp.where(write, slot, k_axis)  # lanes not written point past the row (see `_take_top_k`)
    pltriton.store(keys_ref.at[rows, slot], keys, mask=write)
    pltriton.store(cols_ref.at[rows, slot], cols, mask=write)


def _bucket_axes(entries, head_refs, positions_refs, *, key_bits: int):
    """Step 1b for k' > h: the k' entries of each axis, in column order, to the order of `rank_floors`.

    entries: per axis (keys, cols, rows), each [bt, m_pad] (entry e < k' real, INT32_MIN keys past that;
    rows: token ids); head_refs: per axis (keys, cols) scratch [T, h]; positions_refs: per axis [T, k'].
    One bisection, vectorised over both axes and the bucket boundaries r = h, 2h, 4h, ... < k' (one row of
    a [bt, 2 b_pad, m_pad] count each), finds for each r the set of the top r entries (key above the r-th
    largest, or equal to it with a low enough column: a prefix count). Bucket 0, the head, is the top h:
    packed in column order into the head scratch for `_rank_compacted`. An entry of bucket u >= 1 (in the
    top 2^u h, not in the top 2^(u-1) h) goes to position 2^(u-1) h + (its place among the bucket's
    entries in column order) of positions_ref, a difference of two prefix counts.
    """
    tokens, k_axis = positions_refs[0].shape
    head = head_refs[0][0].shape[1]
    bt, m_pad = entries[0][0].shape
    boundaries = (k_axis - 1).bit_length() - (head - 1).bit_length()  # h 2^v < k' for v < boundaries
    b_pad = next_power_of_2(boundaries)
    # Row v of the [bt, 2 b_pad, m_pad] counts is boundary v % b_pad of axis v // b_pad (padded boundaries ask
    # for all k'). Per-row values are [bt, 2 b_pad], expanded with [:, :, None] where they meet the entries:
    # a [bt, 2 b_pad, 1] array carried through the loop takes a layout that costs ~100 registers more (sm_90).
    level2 = lax.broadcasted_iota(jnp.int32, (bt, 2 * b_pad), 1) & (b_pad - 1)
    want = jnp.minimum(jnp.left_shift(jnp.int32(head), level2), k_axis)  # [bt, 2 b_pad]
    row3 = lax.broadcasted_iota(jnp.int32, (bt, 2 * b_pad, m_pad), 1)
    level = row3 & (b_pad - 1)
    of_y = row3 >= b_pad
    entry = lax.broadcasted_iota(jnp.int32, (bt, m_pad), 1)
    real = entry < k_axis
    shift = 32 - key_bits
    # See `_compact_top_of_axis` for the coarse keys.
    coarse = jnp.where(of_y, (entries[1][0] >> shift)[:, None, :], (entries[0][0] >> shift)[:, None, :])

    # Per row: tau = the largest coarse key with count(coarse >= tau) >= r (as in `_compact_top_of_axis`),
    # bisected between the row's smallest real key (count k' >= r) and just above its largest (count 0):
    # ~log2 of the row's key range steps (about 8-10 for bf16 log-probs) rather than key_bits.
    def unresolved(bounds):
        lo, hi = bounds
        return jnp.max((hi > lo + 1).astype(jnp.int32)) > 0

    def halve(bounds):
        lo, hi = bounds  # [bt, 2 b_pad]
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without int32 overflow
        enough = jnp.sum(coarse >= mid[:, :, None], axis=2, dtype=jnp.int32) >= want
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    coarse_max = INT32_MAX >> shift
    lowest = jnp.min(jnp.where(real[:, None, :], coarse, coarse_max), axis=2)  # [bt, 2 b_pad]
    highest = jnp.max(jnp.where(real[:, None, :], coarse, INT32_MIN >> shift), axis=2)
    bounds = (lowest, jnp.where(highest == coarse_max, highest, highest + 1))
    tau, _ = lax.while_loop(unresolved, halve, bounds)  # [bt, 2 b_pad]
    above = coarse > tau[:, :, None]  # [bt, 2 b_pad, m_pad]
    tied = (coarse == tau[:, :, None]).astype(jnp.int32)
    need = want - jnp.sum(above, axis=2, dtype=jnp.int32)  # [bt, 2 b_pad], >= 1
    top = (above | ((tied == 1) & (lax.cumsum(tied, axis=2) <= need[:, :, None]))) & real[:, None, :]
    top = top.astype(jnp.int32)  # [bt, 2 b_pad, m_pad]: 1 where the entry is among the top r of its row
    before = lax.cumsum(top, axis=2) - top  # [bt, 2 b_pad, m_pad] exclusive prefix counts
    inside = real & (entries[0][2] < tokens)
    for axis, ((keys, cols, rows), (head_keys_ref, head_cols_ref), positions_ref) in enumerate(
        zip(entries, head_refs, positions_refs, strict=True)
    ):
        mine = of_y == (axis == 1)  # [bt, 2 b_pad, m_pad]: this axis's rows
        outside = jnp.where(mine, real[:, None, :].astype(jnp.int32) - top, 0)
        bucket = jnp.sum(outside, axis=1)  # [bt, m_pad]: 0 = head, up to `boundaries`
        bucket3 = bucket[:, None, :]  # [bt, 1, m_pad]
        # A bucket's entries before this one: top 2^u h minus top 2^(u-1) h, counted over the earlier
        # columns; past the last boundary the "top k'" count is the entry index itself (real entries first).
        upper = jnp.sum(jnp.where(mine & (level == bucket3), before, 0), axis=1)  # [bt, m_pad]
        upper = jnp.where(bucket >= boundaries, entry, upper)
        lower = jnp.sum(jnp.where(mine & (level == bucket3 - 1), before, 0), axis=1)
        tail_position = jnp.left_shift(jnp.int32(head), jnp.maximum(bucket - 1, 0)) + upper - lower
        in_head = inside & (bucket == 0)
        # Lanes not written point past the row (see `_take_top_k`); no slices in Pallas-Triton: a sum.
        head_slot = jnp.where(in_head, jnp.sum(jnp.where(mine & (level == 0), before, 0), axis=1), head)
        pltriton.store(head_keys_ref.at[rows, head_slot], keys, mask=in_head)
        pltriton.store(head_cols_ref.at[rows, head_slot], cols, mask=in_head)
        in_tail = inside & (bucket > 0)
        pltriton.store(positions_ref.at[rows, jnp.where(in_tail, tail_position, k_axis)], cols, mask=in_tail)


def _load_entries(keys_ref, cols_ref, t0, *, block_tokens: int):
    """The [T, k'] column-ordered top k' of `_compact_top_of_axis`, rows t0...: keys, cols, rows [bt, k_pad]."""
    keys, cols, rows, _ = _load_entries_and_mask(keys_ref, cols_ref, t0, block_tokens=block_tokens)
    return keys, cols, rows


def _load_entries_and_mask(keys_ref, cols_ref, t0, *, block_tokens: int):
    """`_load_entries` and which of its [bt, k_pad] entries are real (a token's, within k')."""
    tokens, k_axis = keys_ref.shape
    k_pad = next_power_of_2(k_axis)
    rows = t0 + lax.broadcasted_iota(jnp.int32, (block_tokens, k_pad), 0)
    entry = lax.broadcasted_iota(jnp.int32, (block_tokens, k_pad), 1)
    real = (rows < tokens) & (entry < k_axis)
    window = (pl.ds(t0, block_tokens), pl.ds(0, k_pad))
    keys = pltriton.load(keys_ref.at[window], mask=real, other=INT32_MIN)
    cols = pltriton.load(cols_ref.at[window], mask=real, other=0)
    return keys, cols, rows, real


def _rank_compacted(keys_ref, cols_ref, positions_ref, t0, *, block_tokens: int, block_j: int):
    """Step 1b by threshold: the k' entries of `_compact_top_of_axis`, sorted -> positions_ref [T, k'].

    The rank of entry i is the number of entries j that beat it: a larger key, or an equal key and a lower
    column (j < i: the entries are in column order). Counted over [bt, k_pad, block_j] chunks of j.
    """
    tokens, k_axis = keys_ref.shape
    k_pad = next_power_of_2(k_axis)
    keys, cols, rows, real = _load_entries_and_mask(keys_ref, cols_ref, t0, block_tokens=block_tokens)
    keys = keys[:, :, None]  # [bt, k_pad, 1]
    j_rows = t0 + lax.broadcasted_iota(jnp.int32, (block_tokens, block_j), 0)
    i = lax.broadcasted_iota(jnp.int32, (1, k_pad, 1), 1)

    def count_beaters(chunk, rank):
        j = chunk * block_j + lax.broadcasted_iota(jnp.int32, (block_tokens, block_j), 1)
        other = pltriton.load(
            keys_ref.at[pl.ds(t0, block_tokens), pl.ds(chunk * block_j, block_j)],
            mask=(j_rows < tokens) & (j < k_axis),
            other=INT32_MIN,
        )[:, None, :]  # [bt, 1, block_j]; padding never beats a real entry (it comes later, with INT32_MIN)
        beats = (other > keys) | ((other == keys) & (j[:, None, :] < i))  # [bt, k_pad, block_j]
        return rank + jnp.sum(beats, axis=2, dtype=jnp.int32)

    rank = lax.fori_loop(0, k_pad // block_j, count_beaters, jnp.zeros((block_tokens, k_pad), jnp.int32))
    rank = jnp.where(real, rank, k_axis)
    pltriton.store(positions_ref.at[rows, rank], cols, mask=real)


def _pair_keys(rank_x, rank_y, lpx_ref, lpy_ref, x_pos_ref, y_pos_ref, t0, *, block_tokens):
    """Order keys of the sums at position pairs (rank_x, rank_y) ([1, slots], -1 = none) for rows t0...

    Returns keys [bt, slots] (INT32_MIN where no pair or no token) and the pairs' experts [bt, slots].
    """
    tokens, n = lpx_ref.shape
    rows = t0 + lax.broadcasted_iota(jnp.int32, (block_tokens, rank_x.shape[1]), 0)
    listed = (rows < tokens) & (rank_x >= 0)  # [bt, slots]: a real pair of a real token
    x_pos = pltriton.load(x_pos_ref.at[rows, rank_x], mask=listed, other=0)  # [bt, slots]
    y_pos = pltriton.load(y_pos_ref.at[rows, rank_y], mask=listed, other=0)
    x_val = pltriton.load(lpx_ref.at[rows, x_pos], mask=listed, other=0.0).astype(jnp.float32)
    y_val = pltriton.load(lpy_ref.at[rows, y_pos], mask=listed, other=0.0).astype(jnp.float32)
    # The f32 sum exactly as the reference forms it, so ties and rounding agree bit for bit.
    keys = jnp.where(listed, order_key(x_val + y_val), INT32_MIN)  # [bt, slots]
    return keys, x_pos * n + y_pos


def _count(selected):
    return jnp.sum(selected, axis=1, dtype=jnp.int32)  # [bt, width] bool -> [bt]


def _halve_keys(keys, top_k):
    """One bisection step for tau = the largest key with count(keys >= tau) >= K, over keys [bt, width].

    Bounds (lo, hi, at_lo), each [bt]: count(>= lo) = at_lo >= K > count(>= hi). Where mid meets K, lo
    moves up and at_lo becomes mid's count.
    """

    def halve(bounds):
        lo, hi, at_lo = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without int32 overflow
        at_mid = _count(keys >= mid[:, None])
        enough = at_mid >= top_k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid), jnp.where(enough, at_mid, at_lo)

    return halve


def _take_top_k(keys, experts, bounds, scores_ref, experts_ref, t0, *, n):
    """Finish step 3 and step 4 over candidates keys, experts [bt, width] that hold, in slot order, every
    candidate of each token with key >= lo of bounds (lo, hi, at_lo) (`_halve_keys`).

    Either all slots or `_select_top_k`'s compacted array: the taken candidates and their order are the
    same, so is the output.
    """
    tokens, top_k = scores_ref.shape
    block_tokens = keys.shape[0]

    def unresolved_keys(bounds):
        lo, hi, _ = bounds
        return jnp.max((hi > lo + 1).astype(jnp.int32)) > 0  # hi - lo itself may overflow int32

    # One halving per bit of the widest interval left in the tile.
    tau, _, _ = lax.while_loop(unresolved_keys, _halve_keys(keys, top_k), bounds)
    tau = tau[:, None]  # [bt, 1]

    # Of the candidates tied at tau take the `need` lowest expert ids: the smallest cut with
    # count(tied, expert <= cut) >= need. Tokens whose ties all fit start resolved at cut = N - 1.
    tied = keys == tau  # [bt, width]
    need = top_k - _count(keys > tau)  # [bt], >= 1
    last = n * n - 1
    cut_bounds = (
        jnp.where(_count(tied) > need, jnp.int32(-1), jnp.int32(last - 1)),
        jnp.full((block_tokens,), last, jnp.int32),
    )

    def unresolved(bounds):
        lo, hi = bounds
        return jnp.max(hi - lo) > 1

    def halve_experts(bounds):
        lo, hi = bounds
        mid = (lo + hi) >> 1
        enough = _count(tied & (experts <= mid[:, None])) >= need
        return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

    _, cut = lax.while_loop(unresolved, halve_experts, cut_bounds)
    taken = (keys > tau) | (tied & (experts <= cut[:, None]))  # [bt, width], exactly K per token
    taken_count = taken.astype(jnp.int32)
    slot = lax.cumsum(taken_count, axis=1) - taken_count  # [bt, width] exclusive prefix count
    rows = t0 + lax.broadcasted_iota(jnp.int32, keys.shape, 0)
    write = taken & (rows < tokens)
    # Lanes not written point past the row: the interpreter scatters every lane (writing back what it read
    # where the mask is off), so they must never alias a real slot.
    slot = jnp.where(write, slot, top_k)
    pltriton.store(scores_ref.at[rows, slot], key_value(keys), mask=write)
    pltriton.store(experts_ref.at[rows, slot], experts, mask=write)


def _compact(keys, experts, bounds, compact_keys_ref, compact_experts_ref, t0, *, barrier):
    """The candidates with key >= lo ((lo, hi, at_lo) = bounds, at_lo <= B for every token of the tile), in
    slot order, -> [bt, B] keys (INT32_MIN past each token's at_lo) and experts, through the [T, B] scratch.
    """
    tokens, width = compact_keys_ref.shape
    lo, _, at_lo = bounds
    rows = t0 + lax.broadcasted_iota(jnp.int32, keys.shape, 0)
    kept = (keys >= lo[:, None]) & (rows < tokens)  # at_lo per token, counted in `_select_top_k`
    kept_count = kept.astype(jnp.int32)
    place = jnp.where(kept, lax.cumsum(kept_count, axis=1) - kept_count, width)  # past the row where not kept
    pltriton.store(compact_keys_ref.at[rows, place], keys, mask=kept)
    pltriton.store(compact_experts_ref.at[rows, place], experts, mask=kept)
    barrier()
    entry = lax.broadcasted_iota(jnp.int32, (keys.shape[0], width), 1)
    filled = (t0 + lax.broadcasted_iota(jnp.int32, entry.shape, 0) < tokens) & (entry < at_lo[:, None])
    window = (pl.ds(t0, keys.shape[0]), pl.ds(0, width))
    compact_keys = pltriton.load(compact_keys_ref.at[window], mask=filled, other=INT32_MIN)
    compact_experts = pltriton.load(compact_experts_ref.at[window], mask=filled, other=0)
    return compact_keys, compact_experts


def _select_top_k(
    rank_x_ref,
    rank_y_ref,
    bound_x_ref,
    bound_y_ref,
    lpx_ref,
    lpy_ref,
    x_pos_ref,
    y_pos_ref,
    scores_ref,
    experts_ref,
    *compact_refs,
    t0,
    block_tokens,
    barrier,
):
    """Steps 2-4 for rows t0... : position lists [T, k'] of the axes -> scores_ref/experts_ref [T, K].

    rank_x_ref, rank_y_ref: the rows of `candidate_table` ([slots] each); bound_x_ref, bound_y_ref: those
    of `bound_table`; lpx_ref, lpy_ref: the log-probs [T, n]; the position lists in the order of
    `rank_floors` (or fully sorted, which is a finer order). Each token's K outputs land in slot order (module
    docstring, step 4). compact_refs: the [T, B] keys and experts scratch of the compacted candidates
    (`compacted_slots`), or none where B is the slot count.
    """
    tokens, top_k = scores_ref.shape
    n = lpx_ref.shape[1]
    gather = functools.partial(
        _pair_keys,
        lpx_ref=lpx_ref,
        lpy_ref=lpy_ref,
        x_pos_ref=x_pos_ref,
        y_pos_ref=y_pos_ref,
        t0=t0,
        block_tokens=block_tokens,
    )
    keys, experts = gather(rank_x_ref[...][None, :], rank_y_ref[...][None, :])  # [bt, slots] each
    slots = keys.shape[1]

    # tau = the largest key with count(keys >= tau) >= K, bisected from lo to hi (`_halve_keys`).
    # hi: just above the largest candidate. lo: the best score of the head pairs of `bound_table`, each
    # beaten by >= K pairs; it is a valid start wherever rounding keeps the sums monotone in each axis (any
    # finite input), and checked by one count, falling back to the bottom of the key range where it is not.
    top = jnp.max(keys, axis=1)  # [bt]
    hi = jnp.where(top == INT32_MAX, top, top + 1)
    bound_keys, _ = gather(bound_x_ref[...][None, :], bound_y_ref[...][None, :])  # [bt, pairs]
    floor = jnp.max(bound_keys, axis=1)  # [bt]
    at_floor = _count(keys >= floor[:, None])
    valid = at_floor >= top_k
    real_token = t0 + lax.broadcasted_iota(jnp.int32, (block_tokens,), 0) < tokens
    # Tokens past the input have nothing to compact (their slots all hold INT32_MIN).
    bounds = (
        jnp.where(valid, floor, INT32_MIN),
        hi,
        jnp.where(real_token, jnp.where(valid, at_floor, slots), 0),
    )
    take = functools.partial(_take_top_k, scores_ref=scores_ref, experts_ref=experts_ref, t0=t0, n=n)
    if not compact_refs:
        take(keys, experts, bounds)
        return
    width = compact_refs[0].shape[1]

    def unfit(bounds):
        lo, hi, at_lo = bounds
        return jnp.max(((hi > lo + 1) & (at_lo > width)).astype(jnp.int32)) > 0

    # Halve over all slots while some unresolved token has more than B candidates >= lo; then, if every
    # token's fit, the rest runs over the compacted array, else (ties at tau beyond B) over all slots.
    bounds = lax.while_loop(unfit, _halve_keys(keys, top_k), bounds)

    def compacted():
        take(*_compact(keys, experts, bounds, *compact_refs, t0, barrier=barrier), bounds)

    # Past the input a token's at_lo does not count: every halving over its INT32_MIN slots sets it to all of
    # them (mid = lo meets K), which would send the last, ragged tile over all slots for nothing.
    fits = jnp.max(jnp.where(real_token, bounds[2], 0)) <= width
    lax.cond(fits, compacted, lambda: take(keys, experts, bounds))


def _barrier(interpret: bool) -> None:
    # Later steps gather what other threads of this program just stored: make the stores visible first.
    # (The interpreter runs a program's ops in order and has no barrier.)
    if not interpret:
        pltriton.debug_barrier()


def _threshold_steps(n: int, k_axis: int, head: int) -> tuple[bool, bool]:
    """Which parts of step 1 "threshold" run: (compact the top k' first, bucket the k' entries).

    The compaction is skipped where k' = n (every entry takes part); the bucketing where k' <= the head
    width, whose compacted entries are then ranked in full.
    """
    return k_axis < n or k_axis <= head, k_axis > head


def _forward_kernel(
    lpx_ref,
    lpy_ref,
    rank_x_ref,
    rank_y_ref,
    bound_x_ref,
    bound_y_ref,
    scores_ref,
    experts_ref,
    x_pos_ref,
    y_pos_ref,
    *scratch_refs,
    bt: int,
    axis_sort: str,
    key_bits: int,
    block_j: int,
    head: int,
    compacts: bool,
    interpret: bool,
):
    """Steps 1-4 for one tile. Outputs past the first two are scratch: the merge gathers from memory.

    scratch_refs: the merge's compacted keys and experts where `compacts` (`_merge_scratch`), then, for
    axis_sort="threshold", keys and columns of x, then of y, of each axis's column-ordered top k' (where
    `_threshold_steps` compacts), then of its head (where it buckets); head = min(h, k').
    """
    t0 = pl.program_id(0) * bt
    n = lpx_ref.shape[1]
    k_axis = x_pos_ref.shape[1]
    barrier = functools.partial(_barrier, interpret)
    merge_refs, scratch_refs = scratch_refs[: 2 * compacts], scratch_refs[2 * compacts :]

    if axis_sort == "select":
        _sort_axis_by_selection(lpx_ref, x_pos_ref, t0, block_tokens=bt)
        _sort_axis_by_selection(lpy_ref, y_pos_ref, t0, block_tokens=bt)
    else:
        compact, bucketed = _threshold_steps(n, k_axis, head)
        refs = iter(scratch_refs)
        compact_refs = [(next(refs), next(refs)) for _ in range(2)] if compact else None
        head_refs = [(next(refs), next(refs)) for _ in range(2)] if bucketed else compact_refs
        if compact:
            for lp_ref, (keys_ref, cols_ref) in zip((lpx_ref, lpy_ref), compact_refs, strict=True):
                _compact_top_of_axis(lp_ref, keys_ref, cols_ref, t0, block_tokens=bt, key_bits=key_bits)
            barrier()
        if bucketed:
            entries = []
            for axis, lp_ref in enumerate((lpx_ref, lpy_ref)):
                if compact:
                    entries.append(_load_entries(*compact_refs[axis], t0, block_tokens=bt))
                else:  # k' = n: every entry of the row takes part, already in column order
                    keys, rows, cols = _row_keys(lp_ref, t0, block_tokens=bt)
                    entries.append((keys, cols, rows))
            _bucket_axes(entries, head_refs, (x_pos_ref, y_pos_ref), key_bits=key_bits)
            barrier()
        for (keys_ref, cols_ref), pos_ref in zip(head_refs, (x_pos_ref, y_pos_ref), strict=True):
            _rank_compacted(keys_ref, cols_ref, pos_ref, t0, block_tokens=bt, block_j=block_j)
    barrier()
    refs = (rank_x_ref, rank_y_ref, bound_x_ref, bound_y_ref, lpx_ref, lpy_ref, x_pos_ref, y_pos_ref)
    _select_top_k(*refs, scores_ref, experts_ref, *merge_refs, t0=t0, block_tokens=bt, barrier=barrier)


def _merge_kernel(*refs, bt, interpret):
    barrier = functools.partial(_barrier, interpret)
    _select_top_k(*refs, t0=pl.program_id(0) * bt, block_tokens=bt, barrier=barrier)


def _merge_scratch(tokens: int, n: int, top_k: int, config: RouterConfig) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The [T, B] keys and experts scratch of step 3's compacted candidates (`compacted_slots`), or none
    (where B is the slot count or `config.compact_merge` is off)."""
    width = compacted_slots(n, top_k)
    if width == candidate_table(n, top_k).shape[1] or not config.compact_merge:
        return ()
    return (jax.ShapeDtypeStruct((tokens, width), jnp.int32),) * 2


def _tables(n: int, top_k: int) -> tuple[jax.Array, ...]:
    """The four [slots] / [pairs] int32 kernel inputs: `candidate_table`'s rows, then `bound_table`'s."""
    return (*jnp.asarray(candidate_table(n, top_k)), *jnp.asarray(bound_table(n, top_k)))


def sort_by_score(scores: jax.Array, experts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each row of ([T, K] f32, [T, K] int32) in the reference order: score descending, then expert id."""
    descending = ~order_key(scores)  # [T, K]; bitwise not reverses the int32 order without overflow
    _, experts, scores = lax.sort((descending, experts, scores), dimension=1, num_keys=2)
    return scores, experts


def _in_order(scores: jax.Array, experts: jax.Array, sort: bool) -> tuple[jax.Array, jax.Array]:
    """The kernels' [T, K] outputs in score order (`sort_by_score`) or as they were written (slot order)."""
    return sort_by_score(scores, experts) if sort else (scores, experts)


def _empty(*shapes: jax.ShapeDtypeStruct) -> tuple[jax.Array, ...]:
    return tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)


def router_forward(
    log_probs_x: jax.Array,
    log_probs_y: jax.Array,
    top_k: int,
    *,
    config: RouterConfig,
    interpret: bool,
    sort_by_score: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Top-K experts per token: scores [T, K] f32 descending and expert ids [T, K] int32 (e = i*n + j).

    log_probs_x, log_probs_y: [T, n] f32 or bf16 (validated by `api`). Equals `omni_router_reference`;
    with sort_by_score=False each row holds the same K (score, expert) pairs in slot order (module docstring,
    step 4), without the final sort.
    """
    tokens, n = log_probs_x.shape
    k_axis = min(top_k, n)
    head = min(head_ranks(n, top_k), k_axis)
    per_axis = jax.ShapeDtypeStruct((tokens, k_axis), jnp.int32)
    scratch = ()
    if config.axis_sort == "threshold":
        compact, bucketed = _threshold_steps(n, k_axis, head)
        scratch = (per_axis,) * (4 if compact else 0) + (jax.ShapeDtypeStruct((tokens, head), jnp.int32),) * (
            4 if bucketed else 0
        )
    merge_scratch = _merge_scratch(tokens, n, top_k, config)
    outputs = (
        jax.ShapeDtypeStruct((tokens, top_k), jnp.float32),  # scores, slot order
        jax.ShapeDtypeStruct((tokens, top_k), jnp.int32),  # experts, slot order
        per_axis,  # positions of x in the order of `rank_floors`
        per_axis,  # and of y
        *merge_scratch,  # step 3's compacted candidates
        *scratch,  # keys and columns of each axis's column-ordered top k' and of its head
    )
    if tokens == 0:
        return _empty(*outputs[:2])
    head_pad = next_power_of_2(head)
    kernel = functools.partial(
        _forward_kernel,
        bt=config.block_tokens,
        axis_sort=config.axis_sort,
        key_bits=16 if log_probs_x.dtype == jnp.bfloat16 else 32,
        block_j=max(1, min(head_pad, ELEMENTS_PER_WARP * config.num_warps // (config.block_tokens * head_pad))),
        head=head,
        compacts=bool(merge_scratch),
        interpret=interpret,
    )
    scores, experts, *_ = pl.pallas_call(
        kernel,
        out_shape=outputs,
        grid=(pl.cdiv(tokens, config.block_tokens),),
        compiler_params=_compiler_params(config),
        interpret=interpret,
        name="omni_router_forward",
    )(log_probs_x, log_probs_y, *_tables(n, top_k))
    return _in_order(scores, experts, sort_by_score)


def router_merge(
    log_probs_x: jax.Array,
    log_probs_y: jax.Array,
    positions_x: jax.Array,
    positions_y: jax.Array,
    *,
    top_k: int,
    config: RouterConfig,
    interpret: bool,
    sort_by_score: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Steps 2-4 from per-axis top-k' lists computed elsewhere; the same outputs as `router_forward`.

    positions_x, positions_y: [T, k'] int32, k' = min(K, n): per token the columns of the k' largest
    log-probs of each axis, largest first, ties by lower column (what step 1 produces).
    """
    tokens, n = log_probs_x.shape
    outputs = (jax.ShapeDtypeStruct((tokens, top_k), jnp.float32), jax.ShapeDtypeStruct((tokens, top_k), jnp.int32))
    if tokens == 0:
        return _empty(*outputs)
    scores, experts, *_ = pl.pallas_call(
        functools.partial(_merge_kernel, bt=config.block_tokens, interpret=interpret),
        out_shape=(*outputs, *_merge_scratch(tokens, n, top_k, config)),
        grid=(pl.cdiv(tokens, config.block_tokens),),
        compiler_params=_compiler_params(config),
        interpret=interpret,
        name="omni_router_merge",
    )(*_tables(n, top_k), log_probs_x, log_probs_y, positions_x, positions_y)
    return _in_order(scores, experts, sort_by_score)


def _backward_kernel(dscores_ref, experts_ref, dx_ref, dy_ref, *, bt: int, block_k: int):
    tokens, top_k = experts_ref.shape
    n = dx_ref.shape[1]
    n_pad = next_power_of_2(n)
    t0 = pl.program_id(0) * bt
    rows = t0 + lax.broadcasted_iota(jnp.int32, (bt, block_k), 0)
    axis = lax.broadcasted_iota(jnp.int32, (1, 1, n_pad), 2)

    def add_chunk(c, acc):
        acc_x, acc_y = acc
        start = c * block_k
        cols = start + lax.broadcasted_iota(jnp.int32, (bt, block_k), 1)
        inside = (rows < tokens) & (cols < top_k)
        window = (pl.ds(t0, bt), pl.ds(start, block_k))
        grad = pltriton.load(dscores_ref.at[window], mask=inside, other=0.0).astype(jnp.float32)
        expert = pltriton.load(experts_ref.at[window], mask=inside, other=0)
        grad = grad[:, :, None]  # [bt, bk, 1]; masked lanes carry 0 and add nothing
        row_hit = (expert // n)[:, :, None] == axis  # [bt, bk, n_pad]
        col_hit = (expert % n)[:, :, None] == axis
        acc_x = acc_x + jnp.sum(jnp.where(row_hit, grad, 0.0), axis=1)  # [bt, n_pad]
        acc_y = acc_y + jnp.sum(jnp.where(col_hit, grad, 0.0), axis=1)
        return acc_x, acc_y

    zeros = jnp.zeros((bt, n_pad), jnp.float32)
    acc_x, acc_y = lax.fori_loop(0, pl.cdiv(top_k, block_k), add_chunk, (zeros, zeros))
    out_rows = t0 + lax.broadcasted_iota(jnp.int32, (bt, n_pad), 0)
    out_cols = lax.broadcasted_iota(jnp.int32, (bt, n_pad), 1)
    inside = (out_rows < tokens) & (out_cols < n)
    window = (pl.ds(t0, bt), pl.ds(0, n_pad))
    pltriton.store(dx_ref.at[window], acc_x.astype(dx_ref.dtype), mask=inside)
    pltriton.store(dy_ref.at[window], acc_y.astype(dy_ref.dtype), mask=inside)


def _split_bf16(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """f32 x -> (head, rest) in bf16 with head + rest = x to 16 significant bits (~2**-17 relative)."""
    head = x.astype(jnp.bfloat16)
    return head, (x - head.astype(jnp.float32)).astype(jnp.bfloat16)


def _factored_backward_kernel(dscores_ref, experts_ref, dx_ref, dy_ref, *, block_k: int):
    # One token per program (Triton dots are 2-D). A position p < n_pad is p = hi * L + lo; the token's row
    # as an [H, L] block is A[hi, lo] = sum_k ds_k [hi_k == hi] [lo_k == lo], i.e. (onehot_hi * ds)^T @
    # onehot_lo over the K. The 0/1 of onehot_lo are exact in bf16; ds is split in two bf16 parts, two
    # products accumulated in f32.
    top_k = experts_ref.shape[1]
    n = dx_ref.shape[1]
    n_pad = next_power_of_2(n)
    lo_size = FACTOR_LO
    hi_size = n_pad // lo_size
    t = pl.program_id(0)
    hi_axis = lax.broadcasted_iota(jnp.int32, (hi_size, block_k), 0)
    lo_axis = lax.broadcasted_iota(jnp.int32, (block_k, lo_size), 1)
    zero = jnp.zeros((), jnp.bfloat16)

    def block_sums(position, grad_head, grad_rest):
        """[H, L] f32: the chunk's cotangents summed by position (`position` [bk] int32 in [0, n))."""
        hi_hit = (position // lo_size)[None, :] == hi_axis  # [H, bk]
        lo_hit = ((position % lo_size)[:, None] == lo_axis).astype(jnp.bfloat16)  # [bk, L]
        head = jnp.where(hi_hit, grad_head[None, :], zero)
        rest = jnp.where(hi_hit, grad_rest[None, :], zero)
        return jnp.dot(head, lo_hit, preferred_element_type=jnp.float32) + jnp.dot(
            rest, lo_hit, preferred_element_type=jnp.float32
        )

    def add_chunk(c, acc):
        acc_x, acc_y = acc
        cols = c * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        inside = cols < top_k
        window = (t, pl.ds(c * block_k, block_k))
        grad = pltriton.load(dscores_ref.at[window], mask=inside, other=0.0).astype(jnp.float32)
        expert = pltriton.load(experts_ref.at[window], mask=inside, other=0)  # masked lanes: grad 0, adds 0
        grad_head, grad_rest = _split_bf16(grad)
        acc_x = acc_x + block_sums(expert // n, grad_head, grad_rest)
        acc_y = acc_y + block_sums(expert % n, grad_head, grad_rest)
        return acc_x, acc_y

    zeros = jnp.zeros((hi_size, lo_size), jnp.float32)
    acc_x, acc_y = lax.fori_loop(0, pl.cdiv(top_k, block_k), add_chunk, (zeros, zeros))
    inside = lax.broadcasted_iota(jnp.int32, (1, n_pad), 1) < n
    window = (pl.ds(t, 1), pl.ds(0, n_pad))
    # Row-major [H, L] -> [n_pad]: element (hi, lo) lands at position hi * L + lo.
    pltriton.store(dx_ref.at[window], acc_x.reshape(1, n_pad).astype(dx_ref.dtype), mask=inside)
    pltriton.store(dy_ref.at[window], acc_y.reshape(1, n_pad).astype(dy_ref.dtype), mask=inside)


def factored_block_k(n: int, top_k: int, num_warps: int) -> int:
    """The chunk of K of the "factored" backward: its [n_pad / 16, chunk] temporaries fill the register
    budget of `num_warps`, at least 16 (the smallest Triton dot) and at most K rounded up to a power of two."""
    hi_size = next_power_of_2(n) // FACTOR_LO
    return max(16, min(next_power_of_2(top_k), ELEMENTS_PER_WARP * num_warps // hi_size))


def uses_factored_backward(n: int, config: RouterConfig) -> bool:
    """Whether the backward runs "factored": asked for, and n_pad >= 256 (else it runs "onehot")."""
    return config.backward == "factored" and next_power_of_2(n) >= MIN_FACTORED_AXIS


def router_backward(
    dscores: jax.Array, experts: jax.Array, *, n: int, dtype, config: RouterConfig, interpret: bool
) -> tuple[jax.Array, jax.Array]:
    """Cotangents of log_probs_x and log_probs_y ([T, n] in `dtype`) from those of the scores.

    dscores: [T, K] float, experts: [T, K] int32 from the forward. Sums in f32, then casts to `dtype`.
    `config.backward` picks the kernel and `config.backward_num_warps` its warps (see `RouterConfig`).
    """
    tokens = experts.shape[0]
    outputs = (jax.ShapeDtypeStruct((tokens, n), dtype),) * 2
    if tokens == 0:
        return _empty(*outputs)
    if uses_factored_backward(n, config):
        kernel = functools.partial(
            _factored_backward_kernel, block_k=factored_block_k(n, experts.shape[1], config.backward_num_warps)
        )
        grid = (tokens,)
    else:
        kernel = functools.partial(_backward_kernel, bt=config.block_tokens, block_k=config.backward_block_k)
        grid = (pl.cdiv(tokens, config.block_tokens),)
    return pl.pallas_call(
        kernel,
        out_shape=outputs,
        grid=grid,
        compiler_params=pltriton.CompilerParams(num_warps=config.backward_num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="omni_router_backward",
    )(dscores, experts)
