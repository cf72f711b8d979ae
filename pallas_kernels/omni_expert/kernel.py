"""The three Pallas (Triton) passes of the atomic-expert op. pallas_calls only: no autodiff, no dispatch.

With pairs p = t * K + k, expert e_p = indices[t, k], every forward and backward quantity is one of:

  pair_dots       out[dest_p] = a[a_p] . b[b_p]                  s (forward)
  token_combine   out[t] = sum_k coef[t, k] * table[e_tk]        y (forward), dx (backward)
  segment_sum     out[e] = sum_{p in seg(e)} coef_p * rows[t_p]  d_up, and d_down with dh fused (backward)

No atomics anywhere: each output element is written by exactly one program, so the kernels are
deterministic and CPU interpret mode (whose atomics drop repeated indices) checks them faithfully.

Every gather or scatter indexes with full integer arrays (`ref.at[rows[:, None], cols[None, :]]`): that is
what both the Triton lowering and interpret mode's masked loads accept. Masked-off lanes of a gather read
nothing on the GPU (`other` fills them) and are excluded from every sum. All arithmetic is f32; results are
cast to the output dtype once, at the store. No `jnp.dot` is used (the dots are row-wise: one row pair per
output, nothing a matrix unit could batch), so Triton's >= 16 dot-dimension limit never applies.

Grids: the big dimension (pair blocks, token tiles, segments) is axis 0, CUDA's x axis (up to 2**31 - 1
programs); the column slice is axis 1 (at most d / 16 = 512), so CUDA's 65,535 limit on y is never near.
Blocks along axis 0 run before axis 1 advances, so programs in flight share one column slice of the
gathered table (see config.py).
"""

from __future__ import annotations

import functools

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


def _gather_rows(ref, row_ids, cols, valid) -> jax.Array:
    """ref[row_ids, cols] as f32 [*row_ids.shape, C]; where `valid` (row_ids' shape) is False: 0, not read."""
    cols = cols.reshape((1,) * row_ids.ndim + cols.shape)  # [1, ..., 1, C]
    rows = pltriton.load(ref.at[row_ids[..., None], cols], mask=valid[..., None], other=0)
    return rows.astype(jnp.float32)


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
    tile, chunk = pl.program_id(0), pl.program_id(1)
    tokens = tile * token_block + jnp.arange(token_block, dtype=jnp.int32)  # [BT]
    token_valid = tokens < num_tokens  # the last tile is ragged
    cols = _columns(chunk, d_block)  # [Dc]

    def step(i, acc):
        # k_block of each token's K pairs at once: many independent gathers in flight, contiguous id loads.
        ks = i * k_block + jnp.arange(k_block, dtype=jnp.int32)  # [KB]
        valid = token_valid[:, None] & (ks < top_k)[None, :]  # [BT, KB]: K need not be a multiple of KB
        pairs = tokens[:, None] * top_k + ks[None, :]  # [BT, KB]
        experts = pltriton.load(ids_ref.at[pairs], mask=valid, other=0)  # [BT, KB]
        coef = pltriton.load(coef_ref.at[pairs], mask=valid, other=0.0)  # [BT, KB]
        rows = _gather_rows(table_ref, experts, cols, valid)  # [BT, KB, Dc]
        return acc + jnp.sum(coef[:, :, None] * rows, axis=1)  # [BT, Dc]

    acc = lax.fori_loop(0, pl.cdiv(top_k, k_block), step, jnp.zeros((token_block, d_block), jnp.float32))
    pltriton.store(out_ref.at[tokens[:, None], cols[None, :]], acc.astype(out_ref.dtype), mask=token_valid[:, None])


def token_combine(
    coef: jax.Array,
    ids: jax.Array,
    table: jax.Array,
    *,
    out_dtype,
    config: ExpertKernelConfig,
    interpret: bool,
) -> jax.Array:
    """out[t] = sum_k coef[t, k] * table[ids[t, k]], accumulated in f32, written once per row.

    | argument | shape | dtype |
    | --- | --- | --- |
    | coef | [T, K] | f32 |
    | ids | [T, K] | int32, rows of table |
    | table | [N, d] | f32 or bf16 |
    | returns | [T, d] | out_dtype |

    One program per (`config.token_block` tokens, `config.d_block` columns); it walks its tokens' K pairs
    `config.k_block` at a time, so every output row is complete in registers before its single store.
    """
    tokens, top_k = ids.shape
    d = table.shape[1]
    kernel = functools.partial(
        _token_combine_kernel,
        num_tokens=tokens,
        top_k=top_k,
        token_block=config.token_block,
        k_block=config.k_block,
        d_block=config.d_block,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((tokens, d), out_dtype),
        grid=(pl.cdiv(tokens, config.token_block), d // config.d_block),
        compiler_params=_compiler_params(config),
        interpret=interpret,
        name="omni_expert_token_combine",
    )(ids.reshape(-1), coef.reshape(-1), table)  # flat [P] pair arrays


# ---------------------------------------------------------------------------------------------------------
# segment_sum: out[e] = sum_{p in seg(e)} coef[p] * rows[t_p]


def _segment_sum_kernel(
    bounds_ref,
    sorted_expert_ref,
    sorted_token_ref,
    order_ref,
    coef_ref,
    rows_ref,
    *refs,
    num_slots: int,
    num_pairs: int,
    num_experts: int,
    segment_group: int,
    segment_block: int,
    d_block: int,
    with_dots: bool,
):
    # refs: [dot_table_ref,] zeros_ref, out_ref[, dots_ref]: the dot table and its output only with_dots.
    if with_dots:
        dot_table_ref, zeros_ref, out_ref, dots_ref = refs
    else:
        (zeros_ref, out_ref), dot_table_ref, dots_ref = refs, None, None
    del zeros_ref  # aliased to out_ref: rows of experts no pair chose keep its zeros
    group, chunk = pl.program_id(0), pl.program_id(1)
    slots = group * segment_group + jnp.arange(segment_group, dtype=jnp.int32)  # [G]
    slot_valid = slots < num_slots  # the last group is ragged
    # Padding slots past the distinct experts hold start == end == P: empty, like the ragged group's tail.
    start = pltriton.load(bounds_ref.at[slots], mask=slot_valid, other=num_pairs)  # [G]
    end = pltriton.load(bounds_ref.at[slots + 1], mask=slot_valid, other=num_pairs)  # [G]
    nonempty = start < end  # [G]
    experts = pltriton.load(sorted_expert_ref.at[start], mask=nonempty, other=0)  # [G]
    cols = _columns(chunk, d_block)  # [Dc]
    if with_dots:
        expert_rows = _gather_rows(dot_table_ref, experts, cols, nonempty)  # [G, Dc], read once per segment

    def step(i, acc):
        # segment_block pairs of each of the G segments at once; the shorter segments are masked.
        offsets = i * segment_block + jnp.arange(segment_block, dtype=jnp.int32)  # [SB]
        positions = start[:, None] + offsets[None, :]  # [G, SB]
        valid = positions < end[:, None]  # [G, SB]
        tokens = pltriton.load(sorted_token_ref.at[positions], mask=valid, other=0)  # [G, SB]
        # Masked-off lanes point past the end (see pair_dots): this index also addresses the dots' store.
        pairs = pltriton.load(order_ref.at[positions], mask=valid, other=num_pairs)  # [G, SB]
        coef = pltriton.load(coef_ref.at[pairs], mask=valid, other=0.0)  # [G, SB], token order -> sorted
        rows = _gather_rows(rows_ref, tokens, cols, valid)  # [G, SB, Dc]
        if with_dots:
            # The same gathered rows also give this column chunk's share of each pair's dot with its expert.
            dots = jnp.sum(expert_rows[:, None, :] * rows, axis=2)  # [G, SB]
            pltriton.store(dots_ref.at[chunk, pairs], dots, mask=valid)
        return acc + jnp.sum(coef[:, :, None] * rows, axis=1)  # [G, Dc]

    # A segment of any length (one expert chosen by every token: T pairs) is walked to its end; the group
    # takes as many steps as its longest segment needs.
    steps = pl.cdiv(jnp.max(end - start), segment_block)
    acc = lax.fori_loop(0, steps, step, jnp.zeros((segment_group, d_block), jnp.float32))
    # Empty slots are masked off; they also point past the table, so that interpret mode (which writes
    # masked lanes back with their old values) cannot touch a real row either.
    targets = jnp.where(nonempty, experts, num_experts)  # [G]
    pltriton.store(out_ref.at[targets[:, None], cols[None, :]], acc.astype(out_ref.dtype), mask=nonempty[:, None])


def segment_sum(
    coef: jax.Array,
    rows: jax.Array,
    segment_bounds: jax.Array,
    sorted_expert: jax.Array,
    sorted_token: jax.Array,
    order: jax.Array,
    zeros: jax.Array,
    *,
    dot_table: jax.Array | None = None,
    config: ExpertKernelConfig,
    interpret: bool,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """out[e] = sum over sorted positions q of expert e of coef[order[q]] * rows[sorted_token[q]].

    With `dot_table`, also dots[order[q]] = dot_table[e] . rows[sorted_token[q]] from the same gathered rows:
    the backward's dh_p = v_e . dy_t comes free with dV_e = sum h_p dy_t (one pass over dy's rows, not two).

    | argument | shape | dtype |
    | --- | --- | --- |
    | coef | [P] | f32, in pair (token) order |
    | rows | [T, d] | f32 or bf16 |
    | segment_bounds | [S + 1] | int32, from the ExpertSchedule |
    | sorted_expert, sorted_token, order | [P] | int32, from the ExpertSchedule |
    | zeros | [N, d] | the output dtype; the output's storage (aliased), so untouched rows keep it |
    | dot_table (optional) | [N, d] | f32 or bf16 |
    | returns out | [N, d] | zeros.dtype |
    | returns dots (with dot_table) | [P] | f32, in pair (token) order |

    One program per (`config.segment_group` segment slots, `config.d_block` columns), walking its segments
    `config.segment_block` pairs per step: each touched row is summed in f32 registers and written once, and
    the grid is S / segment_group long, never N. The dots are summed over the column chunks by XLA
    ([d / d_block, P] f32 partials).
    """
    d = rows.shape[1]
    slots = segment_bounds.shape[0] - 1
    num_pairs = sorted_expert.shape[0]
    chunks = d // config.d_block
    with_dots = dot_table is not None
    kernel = functools.partial(
        _segment_sum_kernel,
        num_slots=slots,
        num_pairs=num_pairs,
        num_experts=zeros.shape[0],
        segment_group=config.segment_group,
        segment_block=config.segment_block,
        d_block=config.d_block,
        with_dots=with_dots,
    )
    inputs = [segment_bounds, sorted_expert, sorted_token, order, coef, rows]
    out_shape = [jax.ShapeDtypeStruct(zeros.shape, zeros.dtype)]
    if with_dots:
        inputs.append(dot_table)
        out_shape.append(jax.ShapeDtypeStruct((chunks, num_pairs), jnp.float32))
    inputs.append(zeros)
    results = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(slots, config.segment_group), chunks),
        input_output_aliases={len(inputs) - 1: 0},  # zeros -> out
        compiler_params=_compiler_params(config),
        interpret=interpret,
        name="omni_expert_segment_sum",
    )(*inputs)
    if not with_dots:
        return results[0]
    out, partial_dots = results
    return out, jnp.sum(partial_dots, axis=0)  # [N, d], [P]
