"""The Pallas (Triton) passes of the atomic-expert op. pallas_calls only: no autodiff, no dispatch.

With pairs p = t * K + k, expert e_p = indices[t, k], every forward and backward quantity is one of:

  pair_dots       out[dest_p] = a[a_p] . b[b_p]                  s (forward)
  token_combine   out[t] = sum_k coef[t, k] * table[e_tk]        y (forward), dx (backward)
  segment_sum     out[e] = sum_{p in seg(e)} coef_p * rows[t_p]  d_up, and d_down with dh fused (backward)

No atomics anywhere: each output element is written by exactly one program, so the kernels are
deterministic and CPU interpret mode (whose atomics drop repeated indices) checks them faithfully.

Every gather or scatter indexes with full integer arrays (`ref.at[rows[:, None], cols[None, :]]`): that is
what both the Triton lowering and interpret mode's masked loads accept. Masked-off lanes of a gather read
nothing on the GPU (`other` fills them) and are excluded from every sum; masked-off lanes of a scatter point
past the end of the output, because interpret mode writes masked lanes back with their old values, which
must not land on an element a valid lane writes. All sums are f32; results are cast to the output dtype
once, at the store.

The combine and segment passes gather their whole tile in one step (no loop over dependent loads), which
config.py explains: in v1 loops of dependent loads ran several times slower (benchmarks/NOTES.md).

Grids: the big dimension (pair blocks, token tiles) is axis 0, CUDA's x axis (up to 2**31 - 1 programs);
the column slice is the last axis (at most d / 16 = 512) and any other axis is small (K / k_block <= 64),
so CUDA's 65,535 limit on y and z is never near. Axis 0 runs before the last axis advances, so programs in
flight share one column slice of the gathered table (see config.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.omni_expert.config import ExpertKernelConfig


def _compiler_params(config: ExpertKernelConfig) -> pltriton.CompilerParams:
    return pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def _columns(chunk, d_block: int) -> jax.Array:
    """Column ids [d_block] of chunk `chunk`."""
    return chunk * d_block + jnp.arange(d_block, dtype=jnp.int32)


def _load_rows(ref, row_ids, cols, valid) -> jax.Array:
    """ref[row_ids, cols] in ref's dtype, [*row_ids.shape, C]; where `valid` (row_ids' shape) is False: 0, not read."""
    cols = cols.reshape((1,) * row_ids.ndim + cols.shape)  # [1, ..., 1, C]
    return pltriton.load(ref.at[row_ids[..., None], cols], mask=valid[..., None], other=0)


def _gather_rows(ref, row_ids, cols, valid) -> jax.Array:
    """_load_rows in f32."""
    return _load_rows(ref, row_ids, cols, valid).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------------
# pair_dots: out[dest_p] = a[a_p] . b[b_p]


def _pair_dots_kernel(
    a_ids_ref,
    b_ids_ref,
    dest_ref,
    a_ref,
    b_ref,
    out_ref,
    *,
    num_pairs: int,
    pair_block: int,
    d_block: int,
    chunks_per_split: int,
):
    block, split = pl.program_id(0), pl.program_id(1)
    pairs = block * pair_block + jnp.arange(pair_block, dtype=jnp.int32)  # [BP]
    valid = pairs < num_pairs  # the last block is ragged
    a_ids = pltriton.load(a_ids_ref.at[pairs], mask=valid, other=0)  # [BP]
    b_ids = pltriton.load(b_ids_ref.at[pairs], mask=valid, other=0)  # [BP]

    def step(i, acc):
        cols = _columns(split * chunks_per_split + i, d_block)  # [Dc]
        a = _gather_rows(a_ref, a_ids, cols, valid)  # [BP, Dc]
        b = _gather_rows(b_ref, b_ids, cols, valid)  # [BP, Dc]
        return acc + jnp.sum(a * b, axis=1)  # [BP]

    acc = lax.fori_loop(0, chunks_per_split, step, jnp.zeros((pair_block,), jnp.float32))
    # Masked-off lanes point past the end, never at a real destination: the GPU skips them anyway, but
    # interpret mode writes masked lanes back with their old values, which must not land on a valid pair.
    dest = pltriton.load(dest_ref.at[pairs], mask=valid, other=num_pairs)  # [BP]
    pltriton.store(out_ref.at[split, dest], acc, mask=valid)


def pair_dots(
    a: jax.Array,
    b: jax.Array,
    a_ids: jax.Array,
    b_ids: jax.Array,
    dest: jax.Array,
    *,
    config: ExpertKernelConfig,
    interpret: bool,
) -> jax.Array:
    """out[dest[p]] = a[a_ids[p]] . b[b_ids[p]] in f32, for p in [0, P).

    | argument | shape | dtype |
    | --- | --- | --- |
    | a | [Na, d] | f32 or bf16 |
    | b | [Nb, d] | f32 or bf16 |
    | a_ids, b_ids | [P] | int32, rows of a and b |
    | dest | [P] | int32, a permutation of 0..P-1 (each output written once) |
    | returns | [P] | f32 |

    Programs take `config.pair_block` consecutive pairs, so work is balanced whatever the order. The
    columns are cut into `config.score_splits` slices on the grid's second axis; the partial dots
    ([splits, P], f32) are summed here.
    """
    num_pairs = a_ids.shape[0]
    d = a.shape[1]
    chunks = d // config.d_block
    kernel = functools.partial(
        _pair_dots_kernel,
        num_pairs=num_pairs,
        pair_block=config.pair_block,
        d_block=config.d_block,
        chunks_per_split=chunks // config.score_splits,
    )
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((config.score_splits, num_pairs), jnp.float32),
        grid=(pl.cdiv(num_pairs, config.pair_block), config.score_splits),
        compiler_params=_compiler_params(config),
        interpret=interpret,
        name="omni_expert_pair_dots",
    )(a_ids, b_ids, dest, a, b)  # [splits, P]
    return jnp.sum(partial, axis=0)  # [P]


# ---------------------------------------------------------------------------------------------------------
# token_combine: out[t] = sum_k coef[t, k] * table[ids[t, k]]


def _token_combine_kernel(
    ids_ref,
    coef_ref,
    table_ref,
    out_ref,
    *,
    num_tokens: int,
    top_k: int,
    token_block: int,
    k_block: int,
    d_block: int,
):
    tile, k_slice, chunk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    tokens = tile * token_block + jnp.arange(token_block, dtype=jnp.int32)  # [BT]; past T in the ragged last tile
    token_valid = tokens < num_tokens
    ks = k_slice * k_block + jnp.arange(k_block, dtype=jnp.int32)  # [KB]: K need not be a multiple of KB
    valid = token_valid[:, None] & (ks < top_k)[None, :]  # [BT, KB]
    pairs = tokens[:, None] * top_k + ks[None, :]  # [BT, KB]
    experts = pltriton.load(ids_ref.at[pairs], mask=valid, other=0)  # [BT, KB]
    coef = pltriton.load(coef_ref.at[pairs], mask=valid, other=0.0)  # [BT, KB]
    cols = _columns(chunk, d_block)  # [Dc]
    rows = _gather_rows(table_ref, experts, cols, valid)  # [BT, KB, Dc]: the whole tile in flight at once
    acc = jnp.sum(coef[:, :, None] * rows, axis=1)  # [BT, Dc]
    pltriton.store(
        out_ref.at[k_slice, tokens[:, None], cols[None, :]], acc.astype(out_ref.dtype), mask=token_valid[:, None]
    )


def token_combine(
    coef: jax.Array,
    ids: jax.Array,
    table: jax.Array,
    *,
    out_dtype,
    config: ExpertKernelConfig,
    interpret: bool,
) -> jax.Array:
    """out[t] = sum_k coef[t, k] * table[ids[t, k]], accumulated in f32.

    | argument | shape | dtype |
    | --- | --- | --- |
    | coef | [T, K] | f32 |
    | ids | [T, K] | int32, rows of table |
    | table | [N, d] | f32 or bf16 |
    | returns | [T, d] | out_dtype |

    One program per (`config.token_block` tokens, `config.k_block` of their pairs, `config.d_block`
    columns), gathering its [token_block, k_block, d_block] tile in one step. When K fits one k_block the
    programs write `out` directly (each row once); otherwise each of the cdiv(K, k_block) slices writes
    f32 partial sums ([slices, T, d]) that XLA adds in a fixed order, then casts once.
    """
    tokens, top_k = ids.shape
    d = table.shape[1]
    k_slices = pl.cdiv(top_k, config.k_block)
    kernel = functools.partial(
        _token_combine_kernel,
        num_tokens=tokens,
        top_k=top_k,
        token_block=config.token_block,
        k_block=config.k_block,
        d_block=config.d_block,
    )
    partial_dtype = out_dtype if k_slices == 1 else jnp.float32
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((k_slices, tokens, d), partial_dtype),
        grid=(pl.cdiv(tokens, config.token_block), k_slices, d // config.d_block),
        compiler_params=_compiler_params(config),
        interpret=interpret,
        name="omni_expert_token_combine",
    )(ids.reshape(-1), coef.reshape(-1), table)  # flat [P] pair arrays -> [slices, T, d]
    if k_slices == 1:
        return partial[0]  # [T, d]
    return jnp.sum(partial, axis=0).astype(out_dtype)  # [T, d]


# ---------------------------------------------------------------------------------------------------------
# segment_sum: out[e] = sum_{p in seg(e)} coef[p] * rows[t_p], over the expert-sorted pairs
#
# Programs own FIXED blocks of `segment_block` consecutive sorted pairs (so work is balanced whatever the
# segment lengths, and every lane of a tile is a real pair). Within a block the pairs of one expert are
# consecutive; the block numbers its segments 0, 1, ... (a cumulative sum of "a segment opens here" flags)
# and sums each one's contributions in one of two ways (`config.segment_sums`). "products": a tensor-core
# product of weights [slots, block] (coef where the pair belongs to the slot's segment, else 0) and the
# gathered rows [block, Dc]; a block with more segments than `segment_slots` takes several products.
# "reductions": per segment, an f32 masked sum over the block's pairs and one row store, so a block pays
# for the segments it meets and nothing for empty slots; the first UNROLLED_SEGMENTS segments in
# straight-line code, a loop only for a block that meets more. Both write the same rows: each segment lying
# wholly inside a block is written by that block. A segment cut by a block boundary leaves one f32 partial
# row per block it touches in a side buffer (the block's first segment as its "head" partial, its last as
# its "tail"), and a second, small kernel adds those up: the block where such a segment starts walks the
# following blocks' head partials until the segment ends, then writes the row. A third kernel writes zeros
# into the rows no pair touched (the output starts uninitialised: zero-filling all of it first cost more
# wherever most rows are touched). Every row is written exactly once, in a fixed order: deterministic, no atomics.


def _weighted_row_sums(weights: jax.Array, rows: jax.Array) -> jax.Array:
    """weights [S, B] f32 @ rows [B, C] -> [S, C] f32 on the tensor cores, to f32 accuracy.

    bf16 rows are exact operands; the f32 weights are split into a bf16 head and a bf16 remainder
    (together 16 significant bits, an error of ~2**-17 relative, far under bf16's own 2**-9), so two bf16
    products with f32 accumulation replace one f32 product. f32 rows use an IEEE f32 product (Triton's
    default for f32 is TF32, ~1e-3 relative: too coarse).
    """
    if rows.dtype == jnp.float32:
        return jnp.dot(weights, rows, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    head = weights.astype(rows.dtype)
    rest = (weights - head.astype(jnp.float32)).astype(rows.dtype)
    return jnp.dot(head, rows, preferred_element_type=jnp.float32) + jnp.dot(
        rest, rows, preferred_element_type=jnp.float32
    )


def _any(flags: jax.Array) -> jax.Array:
    """Scalar bool: is any element of the bool vector `flags` set (Triton has no reduce_or)."""
    return jnp.max(flags.astype(jnp.int32)) > 0


def _experts_at(sorted_expert_ref, positions, num_pairs: int) -> jax.Array:
    """sorted_expert[positions] [B], -1 where no pair is (outside [0, num_pairs); real experts are >= 0)."""
    inside = (positions >= 0) & (positions < num_pairs)
    return pltriton.load(sorted_expert_ref.at[jnp.clip(positions, 0, num_pairs - 1)], mask=inside, other=-1)


def _number_segments(expert, before, lanes, valid) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(starts [B]: a segment starts at this pair, rank [B]: the block-local number of each pair's segment,
    num_local: the segments meeting the block, >= 1) from the block's experts and those one pair before."""
    starts = valid & (expert != before)
    opens = valid & (starts | (lanes == 0))  # first pair of a segment within this block
    rank = jnp.cumsum(opens.astype(jnp.int32)) - 1
    return starts, rank, jnp.sum(opens.astype(jnp.int32))


def _cut_flags(expert, after, starts, lanes, positions, valid, *, block: int, num_pairs: int):
    """(head_cut, tail_cut): the block's first segment began in an earlier block; its last goes on into the next."""
    ends = valid & (expert != after)  # a segment ends at this pair
    head_cut = _any((lanes == 0) & valid & ~starts)
    last_lane = (lanes == block - 1) | (positions == num_pairs - 1)
    return head_cut, _any(last_lane & valid & ~ends)


class _Block(NamedTuple):
    """What a segment-pass program loads and numbers before it sums ([B] per pair, [B, Dc] per row chunk)."""

    valid: jax.Array  # the lane holds a pair (the last block is ragged)
    expert: jax.Array  # the pair's expert, -1 where no pair is
    coef: jax.Array  # f32, 0 where no pair is
    rows: jax.Array  # [B, Dc] the pairs' token rows in their dtype (a dot operand as is)
    table_rows: jax.Array | None  # [B, Dc] f32 the pairs' experts' rows of the dot table, with the dots only
    rank: jax.Array  # the block-local number of the pair's segment
    num_local: jax.Array  # the segments meeting the block (>= 1)
    head_cut: jax.Array | None  # the block's first segment began in an earlier block (None: not asked for)
    tail_cut: jax.Array | None  # the block's last segment goes on into the next block


def _segment_block_prologue(
    sorted_expert_ref,
    order_ref,
    coef_ref,
    rows_ref,
    dot_table_ref,
    *,
    cols,
    num_pairs: int,
    top_k: int,
    block: int,
    cut_flags: bool = True,
) -> _Block:
    """The loads and the segment numbering of program pl.program_id(0)'s block of sorted pairs, column
    chunk `cols`; `dot_table_ref` None for no dots. Shared with benchmarks/segment_probe.py, whose rungs
    also take it without the cut flags (`cut_flags=False`: head_cut and tail_cut None, `after` not loaded).

    The gathers are issued before anything waits on the experts: a warp issues in order, and the
    numbering's block-wide scan and reductions wait for the experts' loads, so with the numbering first
    every program's row gather waited one more load round trip and four block-wide steps (measured: the
    pass was ~1.1x slower, benchmarks/NOTES.md "Segment sums by reductions")."""
    lanes = jnp.arange(block, dtype=jnp.int32)  # [B]
    positions = pl.program_id(0) * block + lanes  # [B] sorted positions; past P in the ragged last block
    valid = positions < num_pairs

    def experts():  # the block's pairs' experts and those of their neighbours (after: with the cut flags)
        shifts = (0, -1, 1) if cut_flags else (0, -1)
        return [_experts_at(sorted_expert_ref, positions + shift, num_pairs) for shift in shifts]

    def pair_ids():  # the pairs in sorted order and their coefficients (already in sorted order)
        pairs = pltriton.load(order_ref.at[positions], mask=valid, other=0)
        return pairs, pltriton.load(coef_ref.at[positions], mask=valid, other=0.0)

    def numbering(expert, before, after=None):
        starts, rank, num_local = _number_segments(expert, before, lanes, valid)
        if not cut_flags:
            return rank, num_local, None, None
        cuts = _cut_flags(expert, after, starts, lanes, positions, valid, block=block, num_pairs=num_pairs)
        return rank, num_local, *cuts

    def gather(pairs, expert):
        rows = _load_rows(rows_ref, pairs // top_k, cols, valid)
        if dot_table_ref is None:
            return rows, None
        return rows, _gather_rows(dot_table_ref, jnp.maximum(expert, 0), cols, valid)

    pairs, coef = pair_ids()
    neighbours = experts()
    gathered = gather(pairs, neighbours[0])
    numbered = numbering(*neighbours)
    return _Block(valid, neighbours[0], coef, *gathered, *numbered)


def _masked_row_sum(member, coef, rows) -> jax.Array:
    """[Dc] f32: the sum over the block's pairs of coef * rows where `member` [B] (rows [B, Dc] f32)."""
    return jnp.sum(jnp.where(member, coef, 0.0)[:, None] * rows, axis=0)


# The reductions body sums and stores a block's first UNROLLED_SEGMENTS segments in straight-line code; only a
# block meeting more runs a (dynamic-trip-count) loop, for the rest. Two, because a block of the heuristic's
# 64 sorted pairs at training's shapes meets one or two segments (uniform routing, T = 32768: at K = 1280 one
# in 90% of blocks and two in the rest; at K = 32 and 128, ~6% one, ~90% two, ~4% three). Measured on an H200
# against the loop over every segment (benchmarks/NOTES.md "A fixed count of segments"): 0.95-0.98x. What
# the loop cost was not its trips but the tile it kept live for a second sum (twice the registers, fewer
# programs an SM), which the unrolled second sum keeps as well; `segment_regather` is what frees it.
UNROLLED_SEGMENTS = 2


def _segment_refs(refs, with_dots: bool):
    """(dot_table_ref, out_ref, side_ref, dots_ref) from a segment pass's first kernel's refs after its
    inputs: [dot_table_ref,] out_ref, side_ref[, dots_ref]; the dot table and dots None without dots."""
    if with_dots:
        return refs
    out_ref, side_ref = refs
    return None, out_ref, side_ref, None


def _segment_pass_call(
    kernel, inputs, *, out_shape, num_pairs, side_rows, dot_table, grid_rows, config, interpret, name
):
    """The first pallas_call of a segment pass (fixed blocks or aligned chunks): `kernel` over `inputs` (then
    the dot table, with dots) on a (grid_rows, d / d_block) grid -> (out as the kernel left it, side
    [side_rows, d] f32 for the partial rows, dots per column chunk [d / d_block, P] f32 or None)."""
    d = out_shape.shape[1]
    chunks = d // config.d_block
    # The side buffer's rows are written only where a segment is cut and read only there: no initialisation.
    outputs = [out_shape, jax.ShapeDtypeStruct((side_rows, d), jnp.float32)]
    if dot_table is not None:
        inputs = [*inputs, dot_table]
        outputs.append(jax.ShapeDtypeStruct((chunks, num_pairs), jnp.float32))
    results = pl.pallas_call(
        kernel,
        out_shape=outputs,
        grid=(grid_rows, chunks),
        compiler_params=_compiler_params(config),
        interpret=interpret,
        name=name,
    )(*inputs)
    return results[0], results[1], results[2] if dot_table is not None else None


def _segment_blocks_kernel(
    sorted_expert_ref,
    order_ref,
    coef_ref,
    rows_ref,
    *refs,
    num_pairs: int,
    top_k: int,
    num_experts: int,
    block: int,
    slots: int,
    d_block: int,
    with_dots: bool,
    segment_sums: str,
    regather: bool,
):
    # out_ref starts uninitialised: this kernel writes the uncut segments' rows, the fix-up the cut ones and
    # zero_untouched_rows the rest.
    dot_table_ref, out_ref, side_ref, dots_ref = _segment_refs(refs, with_dots)
    index, chunk = pl.program_id(0), pl.program_id(1)
    cols = _columns(chunk, d_block)  # [Dc]
    valid, expert, coef, rows, table_rows, rank, num_local, head_cut, tail_cut = _segment_block_prologue(
        sorted_expert_ref,
        order_ref,
        coef_ref,
        rows_ref,
        dot_table_ref,
        cols=cols,
        num_pairs=num_pairs,
        top_k=top_k,
        block=block,
    )
    positions = index * block + jnp.arange(block, dtype=jnp.int32)  # [B]

    if with_dots:
        # The same gathered rows give this column chunk's share of each pair's dot with its expert's row.
        dots = jnp.sum(table_rows * rows.astype(jnp.float32), axis=1)  # [B]
        pltriton.store(dots_ref.at[chunk, positions], dots, mask=valid)  # sorted order: contiguous

    if segment_sums == "reductions":
        rows = rows.astype(jnp.float32)  # [B, Dc]: converted once for all the block's segments

        def sum_segment(segment, gather_again=regather):
            """The block's `segment`-th segment (int32 scalar, < num_local): one f32 row, stored once;
            `gather_again`: from its rows gathered anew instead of the prologue's tile."""
            member = rank == segment  # [B]; lanes past P share the last segment's rank but add 0 (coef 0)
            tile = rows  # [B, Dc] f32
            if gather_again:
                # The same pairs and columns as the prologue's gather, so the same values, from L1 or L2 (this
                # program just loaded them): the first gather's tile then dies after the first sum instead of
                # holding registers through every later one (config.segment_regather).
                pairs = pltriton.load(order_ref.at[positions], mask=valid, other=0)  # [B]
                tile = _gather_rows(rows_ref, pairs // top_k, cols, valid)  # [B, Dc] f32
            total = _masked_row_sum(member, coef, tile)  # [Dc] f32
            head = (segment == 0) & head_cut  # (a segment cut at both ends counts as the head)
            tail = (segment == num_local - 1) & tail_cut & ~head

            @pl.when(~head & ~tail)
            def _():
                segment_expert = jnp.max(jnp.where(member & valid, expert, -1))  # the segment's expert, >= 0
                pltriton.store(out_ref.at[segment_expert, cols], total.astype(out_ref.dtype))

            # Side row 2 * index for the head, + 1 for the tail. Not jnp.where(head, 0, 1): Pallas's Triton
            # select_n gives weak literals the predicate's type, so scalar ones come out i1 (jax 0.10).
            @pl.when(head | tail)
            def _():
                pltriton.store(side_ref.at[2 * index + tail.astype(jnp.int32), cols], total)

        def loop_from(first):  # segments first .. num_local - 1, one loop trip each
            def trip(segment, carry):
                sum_segment(segment)
                return carry

            lax.fori_loop(first, num_local, trip, 0)

        # The first UNROLLED_SEGMENTS segments at constant numbers, each where the block meets it (segment 0
        # is in every block: num_local >= 1); a loop only for a block meeting more.
        sum_segment(jnp.int32(0), gather_again=False)
        for segment in range(1, UNROLLED_SEGMENTS):
            number = jnp.int32(segment)
            pl.when(number < num_local)(functools.partial(sum_segment, number))
        pl.when(num_local > UNROLLED_SEGMENTS)(functools.partial(loop_from, UNROLLED_SEGMENTS))
        return

    side_rows = side_ref.shape[0]

    def sum_slots(window, carry):
        slot = window * slots + jnp.arange(slots, dtype=jnp.int32)  # [S] block-local segment numbers
        member = (rank[None, :] == slot[:, None]) & valid[None, :]  # [S, B]
        sums = _weighted_row_sums(jnp.where(member, coef[None, :], 0.0), rows)  # [S, Dc] f32
        slot_expert = jnp.max(jnp.where(member, expert[None, :], -1), axis=1)  # [S]; -1 for unused slots
        real = slot < num_local
        head = real & (slot == 0) & head_cut  # (a segment cut at both ends counts as the head)
        tail = real & (slot == num_local - 1) & tail_cut & ~head
        whole = real & ~head & ~tail
        # Rows of unused slots and partials point past the end (see the module doc on masked scatters).
        out_rows = jnp.where(whole, slot_expert, num_experts)  # [S]
        pltriton.store(out_ref.at[out_rows[:, None], cols[None, :]], sums.astype(out_ref.dtype), mask=whole[:, None])
        cut = head | tail
        partial_rows = jnp.where(cut, 2 * index + jnp.where(head, 0, 1), side_rows)  # [S]
        pltriton.store(side_ref.at[partial_rows[:, None], cols[None, :]], sums, mask=cut[:, None])
        return carry

    lax.fori_loop(0, pl.cdiv(num_local, slots), sum_slots, 0)


def _segment_fixup_kernel(
    sorted_expert_ref,
    side_ref,
    partial_sums_ref,
    out_ref,
    *,
    num_pairs: int,
    block: int,
    d_block: int,
):
    del partial_sums_ref  # aliased to out_ref: the rows the blocks kernel wrote stay as they are
    index, chunk = pl.program_id(0), pl.program_id(1)
    block_start = index * block
    next_start = block_start + block
    expert = sorted_expert_ref[jnp.minimum(next_start, num_pairs) - 1]  # the block's last pair's expert
    continues = (next_start < num_pairs) & (sorted_expert_ref[jnp.minimum(next_start, num_pairs - 1)] == expert)
    began_here = (index == 0) | (sorted_expert_ref[jnp.maximum(block_start - 1, 0)] != expert)

    # The block where a cut segment starts finishes it: its tail partial plus the following blocks' heads.
    @pl.when(continues & began_here)
    def _():
        cols = _columns(chunk, d_block)  # [Dc]

        def add_next_head(carry):
            following, total, _ = carry
            total = total + pltriton.load(side_ref.at[2 * following, cols])  # [Dc]
            after = (following + 1) * block
            going_on = (after < num_pairs) & (sorted_expert_ref[jnp.minimum(after, num_pairs - 1)] == expert)
            return following + 1, total, going_on

        tail = pltriton.load(side_ref.at[2 * index + 1, cols])  # [Dc] f32
        _, total, _ = lax.while_loop(lambda carry: carry[2], add_next_head, (index + 1, tail, jnp.bool_(True)))
        pltriton.store(out_ref.at[expert, cols], total.astype(out_ref.dtype))


def segment_sum(
    coef: jax.Array,
    rows: jax.Array,
    sorted_expert: jax.Array,
    order: jax.Array,
    *,
    out_like,
    top_k: int,
    dot_table: jax.Array | None = None,
    config: ExpertKernelConfig,
    interpret: bool,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """out[e] = sum over sorted positions q with sorted_expert[q] == e of coef[q] * rows[order[q] // top_k],
    and exactly 0 in the rows of experts no pair chose.

    With `dot_table`, also dots[q] = dot_table[sorted_expert[q]] . rows[order[q] // top_k] from the same
    gathered rows: the backward's dh = v_e . dy_t comes free with dV_e = sum h_p dy_t (one pass, not two).

    | argument | shape | dtype |
    | --- | --- | --- |
    | coef | [P] | f32, in sorted order |
    | rows | [T, d] | f32 or bf16 |
    | sorted_expert, order | [P] | int32, from the ExpertSchedule |
    | out_like | [N, d] | the output's shape and dtype (anything with .shape and .dtype; never read) |
    | dot_table (optional) | [N, d] | f32 or bf16 |
    | returns out | [N, d] | out_like.dtype |
    | returns dots (with dot_table) | [P] | f32, in sorted order |

    Three pallas_calls (see the section comment above), each writing its own rows of one uninitialised
    output: blocks of `config.segment_block` sorted pairs x `config.d_block` columns; the fix-up of the
    segments cut by block boundaries, from an f32 side buffer of two rows per block; zeros in the untouched
    rows (cheaper than zero-filling all of [N, d] first, a pass of its own over the whole output,
    benchmarks/NOTES.md "v3": at ~20 pairs per expert almost no row is untouched). The dots are summed over
    the column chunks by XLA. `config.segment_sums` "aligned" cuts the pairs into chunks that start where
    segments do instead of fixed blocks (`aligned_chunk_sums`).
    """
    out_shape = jax.ShapeDtypeStruct(out_like.shape, out_like.dtype)
    args = (coef, rows, sorted_expert, order, out_shape)
    kwargs = {"top_k": top_k, "dot_table": dot_table, "config": config, "interpret": interpret}
    if config.segment_sums == "aligned":
        out, dots = aligned_chunk_sums(*args, **kwargs)
    else:
        partial_out, side, dots = segment_blocks(*args, **kwargs)
        out = segment_fixup(partial_out, side, sorted_expert, config=config, interpret=interpret)
    out = zero_untouched_rows(out, sorted_expert, config=config, interpret=interpret)
    if dots is None:
        return out
    return out, jnp.sum(dots, axis=0)  # [N, d], [P] sorted order


def segment_blocks(
    coef: jax.Array,
    rows: jax.Array,
    sorted_expert: jax.Array,
    order: jax.Array,
    out_shape: jax.ShapeDtypeStruct,
    *,
    top_k: int,
    dot_table: jax.Array | None,
    config: ExpertKernelConfig,
    interpret: bool,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """segment_sum's first pallas_call: (out with the uncut segments' rows written and the others not,
    side [2 * blocks, d] f32, dots or None).

    dots, with `dot_table`, are per column chunk: [d / d_block, P] f32. Public so that
    benchmarks/segment_probe.py can time this call apart from the fix-up.
    """
    if config.segment_sums == "aligned":
        raise ValueError(
            "segment_blocks sums fixed blocks; config.segment_sums='aligned' sums by aligned chunks: "
            "kernel.aligned_chunk_sums (or segment_sum, which takes either)"
        )
    num_pairs = sorted_expert.shape[0]
    num_experts = out_shape.shape[0]
    block = config.segment_block
    num_blocks = pl.cdiv(num_pairs, block)
    with_dots = dot_table is not None
    kernel = functools.partial(
        _segment_blocks_kernel,
        num_pairs=num_pairs,
        top_k=top_k,
        num_experts=num_experts,
        block=block,
        slots=config.segment_slots,
        d_block=config.d_block,
        with_dots=with_dots,
        segment_sums=config.segment_sums,
        # With the fused dots the tile is live for them anyway: gathering again only adds the refetch there
        # (measured, config.segment_regather), so the pass with dots never regathers.
        regather=config.segment_regather and not with_dots,
    )
    # The side buffer: rows 2b and 2b + 1 hold block b's head and tail partials.
    return _segment_pass_call(
        kernel,
        [sorted_expert, order, coef, rows],
        out_shape=out_shape,
        num_pairs=num_pairs,
        side_rows=2 * num_blocks,
        dot_table=dot_table,
        grid_rows=num_blocks,
        config=config,
        interpret=interpret,
        name="omni_expert_segment_blocks",
    )


def segment_fixup(
    partial_out: jax.Array, side: jax.Array, sorted_expert: jax.Array, *, config: ExpertKernelConfig, interpret: bool
) -> jax.Array:
    """segment_sum's second pallas_call: partial_out with the rows of the segments cut by block boundaries."""
    num_pairs = sorted_expert.shape[0]
    block = config.segment_block
    grid = (pl.cdiv(num_pairs, block), partial_out.shape[1] // config.d_block)
    fixup = functools.partial(_segment_fixup_kernel, num_pairs=num_pairs, block=block, d_block=config.d_block)
    return pl.pallas_call(
        fixup,
        out_shape=jax.ShapeDtypeStruct(partial_out.shape, partial_out.dtype),
        grid=grid,
        input_output_aliases={2: 0},  # the blocks kernel's output -> out
        compiler_params=_compiler_params(config),
        interpret=interpret,
        name="omni_expert_segment_fixup",
    )(sorted_expert, side, partial_out)


# ---------------------------------------------------------------------------------------------------------
# segment_sum by aligned chunks (config.segment_sums "aligned")
#
# The fixed blocks above meet one to several segments each: a program numbers them (a block-wide scan),
# sums each by a masked reduction, and keeps its tile live for the second; d_down's dots gather the expert
# row of every pair. Here the programs own CHUNKS of at most `segment_block` consecutive sorted pairs that
# begin where a segment begins and every `segment_block` pairs inside it, so every chunk holds pairs of
# one expert: one plain weighted sum over the tile, one expert (the dots read its row once, not per pair),
# no numbering. A chunk that is its segment whole writes the row; the chunks of a longer segment each leave
# an f32 partial row in a side buffer, one row per chunk, and the chunk where the segment starts adds up
# the following ones (a second, small kernel, as for the blocks). The price: a static grid of at most
# m + (P - m) // segment_block chunks, m = min(P, N) (the chunk starts and experts come from XLA: a cummax,
# a cumsum and a scatter over the P sorted experts), partly filled lanes (a segment of L pairs fills
# ceil(L / B) chunks), and programs past the last chunk that exit at once. Each expert's pairs form one
# segment, so consecutive chunks of one expert are one segment's: a program learns whether its chunk opens
# or ends its segment from its neighbours' experts, loads that do not wait on each other.


class AlignedChunks(NamedTuple):
    """The chunks of `aligned_chunk_sums`, each field [C + 1] int32 (see `aligned_chunks`)."""

    starts: jax.Array  # the sorted position where the chunk starts; P for unused chunks and at the end
    experts: jax.Array  # the chunk's expert; -1 for unused chunks and at the end
    counts: jax.Array  # at a segment's first chunk, the segment's number of chunks (elsewhere: unused)


def aligned_chunks(sorted_expert: jax.Array, *, block: int, num_experts: int) -> AlignedChunks:
    """The chunks of P sorted pairs: each starts at a segment's start or `block` pairs into it, one entry
    a chunk and, for every unused chunk and once more at the end (so chunk c ends where c + 1 starts),
    P / -1. C = m + (P - m) // block with m = min(P, N): S segments of P pairs fill at most
    S + (P - S) // block chunks, which grows with S <= m."""
    num_pairs = sorted_expert.shape[0]
    positions = jnp.arange(num_pairs, dtype=jnp.int32)
    opens = jnp.concatenate([jnp.ones((1,), bool), sorted_expert[1:] != sorted_expert[:-1]])  # [P]
    segment_start = lax.cummax(jnp.where(opens, positions, 0))  # [P] where each pair's segment starts
    chunk_opens = (positions - segment_start) % block == 0  # [P]
    chunk_id = jnp.cumsum(chunk_opens.astype(jnp.int32)) - 1  # [P] the chunk each pair falls in
    segments = min(num_pairs, num_experts)
    num_chunks = segments + (num_pairs - segments) // block
    # One scatter of the chunk-opening pairs (distinct chunks: no collisions, so deterministic); the rest drop.
    slots = jnp.where(chunk_opens, chunk_id, num_chunks + 1)
    starts = jnp.full((num_chunks + 1,), num_pairs, jnp.int32)
    starts = starts.at[slots].set(positions, mode="drop", unique_indices=True)
    experts = jnp.full((num_chunks + 1,), -1, jnp.int32)
    experts = experts.at[slots].set(sorted_expert, mode="drop", unique_indices=True)
    # A segment's chunks run from its first chunk to the next segment's first (the unused tail is one more).
    chunk_index = jnp.arange(num_chunks + 1, dtype=jnp.int32)
    opens_segment = jnp.concatenate([jnp.ones((1,), bool), experts[1:] != experts[:-1]])
    firsts = jnp.where(opens_segment, chunk_index, num_chunks + 1)
    next_first = jnp.concatenate([lax.cummin(firsts, reverse=True)[1:], jnp.full((1,), num_chunks + 1, jnp.int32)])
    return AlignedChunks(starts, experts, next_first - chunk_index)


def _aligned_chunk(starts_ref, experts_ref, index):
    """(start, length, expert, opens its segment, ends its segment) of chunk `index`; length 0 past the last.
    The five loads depend on `index` alone (none waits for another)."""
    start, end = starts_ref[index], starts_ref[index + 1]
    expert = experts_ref[index]
    opens = (index == 0) | (experts_ref[jnp.maximum(index - 1, 0)] != expert)
    ends = experts_ref[index + 1] != expert
    return start, end - start, expert, opens, ends


def _aligned_blocks_kernel(
    starts_ref,
    experts_ref,
    order_ref,
    coef_ref,
    rows_ref,
    *refs,
    num_pairs: int,
    top_k: int,
    block: int,
    d_block: int,
    with_dots: bool,
):
    dot_table_ref, out_ref, side_ref, dots_ref = _segment_refs(refs, with_dots)
    index, chunk = pl.program_id(0), pl.program_id(1)
    start, length, expert, opens, ends = _aligned_chunk(starts_ref, experts_ref, index)

    @pl.when(length > 0)  # programs past the last chunk do nothing more
    def _():
        lanes = jnp.arange(block, dtype=jnp.int32)  # [B]
        valid = lanes < length
        # [B] sorted positions; past the end where no pair is (masked lanes must not land on a written element)
        positions = jnp.where(valid, start + lanes, num_pairs)
        cols = _columns(chunk, d_block)  # [Dc]
        pairs = pltriton.load(order_ref.at[positions], mask=valid, other=0)  # [B]
        coef = pltriton.load(coef_ref.at[positions], mask=valid, other=0.0)  # [B] f32, 0 where no pair is
        rows = _gather_rows(rows_ref, pairs // top_k, cols, valid)  # [B, Dc] f32
        if with_dots:  # every pair of the chunk has the same expert: its row read once
            table_row = pltriton.load(dot_table_ref.at[expert, cols]).astype(jnp.float32)  # [Dc]
            dots = jnp.sum(rows * table_row[None, :], axis=1)  # [B]
            pltriton.store(dots_ref.at[chunk, positions], dots, mask=valid)
        total = jnp.sum(coef[:, None] * rows, axis=0)  # [Dc] f32

        @pl.when(opens & ends)  # the segment whole: its row
        def _():
            pltriton.store(out_ref.at[expert, cols], total.astype(out_ref.dtype))

        @pl.when(~(opens & ends))  # a piece of a longer segment: the chunk's partial row
        def _():
            pltriton.store(side_ref.at[index, cols], total)


def _aligned_fixup_kernel(starts_ref, experts_ref, counts_ref, side_ref, partial_ref, out_ref, *, d_block: int):
    del partial_ref  # aliased to out_ref: the rows the chunks kernel wrote stay as they are
    index, chunk = pl.program_id(0), pl.program_id(1)
    _, length, expert, opens, ends = _aligned_chunk(starts_ref, experts_ref, index)

    # The chunk where a segment of several chunks starts adds up its partial and the following chunks', a
    # counted loop whose loads wait on nothing but the count (not on the chunk before, as a search would).
    @pl.when((length > 0) & opens & ~ends)
    def _():
        cols = _columns(chunk, d_block)  # [Dc]

        def add_next(following, total):
            return total + pltriton.load(side_ref.at[index + following, cols])  # [Dc]

        first = pltriton.load(side_ref.at[index, cols])  # [Dc] f32
        total = lax.fori_loop(1, counts_ref[index], add_next, first)
        pltriton.store(out_ref.at[expert, cols], total.astype(out_ref.dtype))


def aligned_chunk_sums(
    coef: jax.Array,
    rows: jax.Array,
    sorted_expert: jax.Array,
    order: jax.Array,
    out_shape: jax.ShapeDtypeStruct,
    *,
    top_k: int,
    dot_table: jax.Array | None,
    config: ExpertKernelConfig,
    interpret: bool,
) -> tuple[jax.Array, jax.Array | None]:
    """segment_sum's first two pallas_calls by chunks aligned to the segments (the section comment above):
    (out with every touched row written and the untouched ones not, dots per column chunk [d / d_block, P]
    f32 or None). The chunks kernel, then the fix-up of the segments longer than one chunk."""
    num_pairs = sorted_expert.shape[0]
    chunked = aligned_chunks(sorted_expert, block=config.segment_block, num_experts=out_shape.shape[0])
    num_chunks = chunked.starts.shape[0] - 1
    kernel = functools.partial(
        _aligned_blocks_kernel,
        num_pairs=num_pairs,
        top_k=top_k,
        block=config.segment_block,
        d_block=config.d_block,
        with_dots=dot_table is not None,
    )
    # The side buffer: row c holds chunk c's partial, where its segment has several chunks.
    partial_out, side, dots = _segment_pass_call(
        kernel,
        [chunked.starts, chunked.experts, order, coef, rows],
        out_shape=out_shape,
        num_pairs=num_pairs,
        side_rows=num_chunks,
        dot_table=dot_table,
        grid_rows=num_chunks,
        config=config,
        interpret=interpret,
        name="omni_expert_aligned_blocks",
    )
    fixup = functools.partial(_aligned_fixup_kernel, d_block=config.d_block)
    out = pl.pallas_call(
        fixup,
        out_shape=out_shape,
        grid=(num_chunks, rows.shape[1] // config.d_block),
        input_output_aliases={4: 0},  # the chunks kernel's output -> out
        compiler_params=_compiler_params(config),
        interpret=interpret,
        name="omni_expert_aligned_fixup",
    )(chunked.starts, chunked.experts, chunked.counts, side, partial_out)
    return out, dots


def _zero_untouched_kernel(touched_ref, partial_ref, out_ref, *, num_rows: int, rows_per_program: int, d_block: int):
    del partial_ref  # aliased to out_ref: the rows the segment kernels wrote stay as they are
    index, chunk = pl.program_id(0), pl.program_id(1)
    row_ids = index * rows_per_program + jnp.arange(rows_per_program, dtype=jnp.int32)  # [R] consecutive rows
    in_table = row_ids < num_rows
    untouched = in_table & (pltriton.load(touched_ref.at[row_ids], mask=in_table, other=1) == 0)  # [R]
    row_ids = jnp.where(untouched, row_ids, num_rows)  # masked lanes point past the end (module doc)
    cols = _columns(chunk, d_block)  # [Dc]
    zeros = jnp.zeros((rows_per_program, d_block), out_ref.dtype)
    pltriton.store(out_ref.at[row_ids[:, None], cols[None, :]], zeros, mask=untouched[:, None])


def zero_untouched_rows(
    out: jax.Array, sorted_expert: jax.Array, *, config: ExpertKernelConfig, interpret: bool
) -> jax.Array:
    """out [N, d] with exact zeros in the rows no sorted pair names, the other rows as they are.

    The touched flags [N] are one XLA scatter of the P sorted experts; the kernel walks the rows in
    consecutive runs of `config.segment_block` and writes only the untouched ones.
    """
    num_rows, d = out.shape
    touched = jnp.zeros((num_rows,), jnp.int32).at[sorted_expert].set(1, mode="drop")  # [N]
    rows_per_program = config.segment_block
    kernel = functools.partial(
        _zero_untouched_kernel, num_rows=num_rows, rows_per_program=rows_per_program, d_block=config.d_block
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(out.shape, out.dtype),
        grid=(pl.cdiv(num_rows, rows_per_program), d // config.d_block),
        input_output_aliases={1: 0},  # out -> out
        compiler_params=_compiler_params(config),
        interpret=interpret,
        name="omni_expert_zero_untouched",
    )(touched, out)
