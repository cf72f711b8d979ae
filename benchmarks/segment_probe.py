"""Where the segment pass loses its time: the pass taken apart, one piece added at a time (issue 4).

The backward's two segment passes gather at 1.6-2.0 TB/s on an H100 where pair_dots, which gathers the same
rows in the same order, reaches 6 TB/s (NOTES.md, "v2 measured"). This script times, at one setting, a
ladder of kernels that share the segment pass's grid, tile and loads and each add one piece of it:

  gather          the loads (experts, order, coef, the [segment_block, d_block] tile of rows) and a plain
                  weighted sum over the block, one f32 row per program stored: the gather rate of this grid
  + dots          + the segment numbering (cumsum) and the tensor-core products of the first window of
                  slots; their rows summed into one row per program so nothing is elided
  + row stores    the products' rows stored to their experts' rows of the [N, d] output, as the real pass
                  does (scattered rows), first window only, no side buffer
  blocks          the real first pallas_call (every window, the side buffer for cut segments)
  segment_sum     the real pass: blocks + the fix-up of cut segments + zeros in the untouched rows
  zeros [N, d]    a zero fill of the whole [N, d] output, what v2 paid instead of the last kernel

Every rung writes into an uninitialised output, as the real pass does.
  pair_dots       the forward's expert-order score pass at the same setting, the rate to compare with

and two variations, each against the rung it changes:

  dots, one product       "+ dots" with one bf16 product (weights rounded to bf16, not exact enough for the
                          real pass) instead of the two that keep f32 accuracy: what the second one costs
  row stores, contiguous  "+ row stores" writing each program's slot rows to its own consecutive rows of a
                          [blocks * slots, d] buffer instead of its experts' rows: what scattering costs

Each rung's time minus the one before is that piece's cost. Every rung gathers the same bytes (one row
chunk per pair), so the table's TB/s are comparable.

`--sums` times instead the two ways a segment-pass program can sum its segments (ExpertKernelConfig.
segment_sums: "products", tensor-core products of 16 slots a window, or "reductions", one f32 masked sum
and one row store per segment meeting the block) at training's shapes and the paper's: the first
pallas_call alone ("blocks"), the whole pass as d_up runs it ("segment_sum") and as d_down runs it, with
the fused dots ("segment_sum + dots"), each in both modes, in "reductions" with the rows gathered again
for every segment after a block's first (ExpertKernelConfig.segment_regather; d_up's pass only: the pass with
the dots never regathers), and by chunks aligned to the segments ("aligned", whole passes only: it has no
fixed-blocks kernel; at the heuristic's tile and at 128 pairs x 64 columns), beside the "gather" rung (this
grid's loads and one weighted sum per block: what any mode could at best approach). Written to
results/segment_sums.json (`--name` for another file).

`--reductions-ladder` takes the "reductions" blocks kernel apart the same way, at training's three splits
(T = 32768, d = 512; K = 1280, 128 and 32) and the heuristic's config there (`default_config`, segment_sums
"reductions"). Its probe rungs take the real kernel's loads and numbering (kernel._segment_block_prologue)
and store one f32 row per program into an uninitialised [2 * blocks, d] output (the side buffer's size):

  gather                     as above: the grid's loads and one weighted sum per block
  + numbering                + the loads of the block's sorted experts and of those one pair before (after
                             the order load and the row gather, as the kernel issues them), the cumsum
                             numbering the segments and their count; the block's last segment summed
  + head/tail flags          + the experts one pair after and the two block-wide "segment cut" flags, which
                             pick the stored row (2 * block, + 1 where cut)
  + loop                     a dynamic-trip-count loop over the block's segments, one masked f32 sum
                             each, added into the one stored row
  blocks                     the real first pallas_call: the first two segments unrolled, a loop for the
                             rest, a store per segment (kernel.UNROLLED_SEGMENTS), every sum from the tile
  blocks, gathering again    the same with every segment after the first summed from its rows gathered
                             again (ExpertKernelConfig.segment_regather: the tile does not stay live in
                             registers across the sums), against "blocks"

The earlier rungs of results/segment_reductions_ladder.json (the numbering before the gather, the loop over
every segment, both unrolled sums in every block) timed bodies the kernel no longer has.

`--tiles` times the whole pass (d_up's, and d_down's with the fused dots) in "reductions" at training's
three splits over the tiles the heuristic does not try: segment_block 32, 64, 128 x num_warps 4, 8, each
with segment_regather as step 6 would set it for that block, beside the heuristic's own config. A smaller
block meets fewer segments (so one sum, and the tile dies with it) at the price of more cut segments for
the fix-up; a larger one the reverse; more warps spread the same tile over more threads (fewer registers
a thread). Written to results/segment_tiles.json; each row's over_heuristic is its time over the
heuristic config's for the same piece.

Each row's added_ms is its time minus its `compared_with` rung's, over_gather its time over the gather
rung's. With --smoke each rung also lowers for CUDA, the probe rungs' rows are checked against numpy and
"blocks, gathering again"'s output against "blocks"' (to bf16's rounding). Written to
results/segment_reductions_ladder.json.

    PYTHONPATH=. python benchmarks/segment_probe.py               # the paper's setting and N = 65536, GPU
    PYTHONPATH=. python benchmarks/segment_probe.py --sums        # products vs reductions, GPU
    PYTHONPATH=. python benchmarks/segment_probe.py --reductions-ladder --budget-s 150   # GPU, ~1-2 minutes
    PYTHONPATH=. python benchmarks/segment_probe.py --smoke       # tiny, interpret mode: the machinery (CPU)
    PYTHONPATH=. python benchmarks/segment_probe.py --sums --smoke
    PYTHONPATH=. python benchmarks/segment_probe.py --reductions-ladder --smoke
    PYTHONPATH=. python benchmarks/segment_probe.py --tiles --budget-s 150   # GPU, ~2 minutes
    PYTHONPATH=. python benchmarks/segment_probe.py --tiles --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # benchmarks/ is a folder of scripts, not a package

from pallas_kernels.omni_expert import kernel
from pallas_kernels.omni_expert.config import default_config
from pallas_kernels.omni_expert.scheduling import build_schedule

DTYPE = jnp.bfloat16
SETTINGS = [(4096, 512, 102400, 1024), (4096, 32, 65536, 1024)]  # (T, K, N, d): the paper's; the layer's N
SMOKE_SETTINGS = [(64, 8, 256, 64)]
STAGES = ("gather", "dots", "row stores")
# (T, K, N, d) for --sums: training's micro-batch (32,768 tokens, d = 512) at the three splits of
# benchmarks/NOTES.md ("What issue 12's targets ask"), then the paper's setting.
SUMS_SETTINGS = [
    (32768, 32, 16384, 512),
    (32768, 128, 65536, 512),
    (32768, 1280, 65536, 512),
    (4096, 512, 102400, 1024),
]
SUMS_SMOKE_SETTINGS = [(64, 8, 16, 64), (64, 8, 256, 64)]  # long segments, short ones
# --sums' modes: the ExpertKernelConfig fields each sets
SUMS_MODES = {
    "products": {"segment_sums": "products", "segment_regather": False},
    "reductions": {"segment_sums": "reductions", "segment_regather": False},
    "reductions, gathering again": {"segment_sums": "reductions", "segment_regather": True},
    "aligned": {"segment_sums": "aligned", "segment_regather": False},
    # the same chunks twice as long over half the columns: one chunk for most segments of ~64 pairs
    "aligned, 128 pairs x 64 columns": {"segment_sums": "aligned", "segment_block": 128, "d_block": 64},
}
SUMS_PIECES = ("blocks", "segment_sum", "segment_sum + dots")
VARIATIONS = ("dots, one product", "row stores, contiguous")
# --tiles: (segment_block, num_warps) tried at each setting, beside the heuristic's config
TILES = [(block, warps) for block in (32, 64, 128) for warps in (4, 8)]
TILES_PIECES = ("segment_sum", "segment_sum + dots")
# (T, K, N, d) for --reductions-ladder: training's micro-batch at the three splits, the costliest first
LADDER_SETTINGS = [(32768, 1280, 65536, 512), (32768, 128, 65536, 512), (32768, 32, 16384, 512)]
# --reductions-ladder's rungs, each with the rung its added_ms is measured against (module doc)
REDUCTIONS_LADDER = (
    ("gather", None),
    ("+ numbering", "gather"),
    ("+ head/tail flags", "+ numbering"),
    ("+ loop", "+ head/tail flags"),
    ("blocks", "+ loop"),
    ("blocks, gathering again", "blocks"),
)


def _probe_kernel(sorted_expert_ref, order_ref, coef_ref, rows_ref, *refs, stage, num_pairs, top_k, block, slots,
                  d_block, num_experts):  # fmt: skip
    """The segment pass's loads, then as much of its work as `stage` says (see the module doc)."""
    (out_ref,) = refs
    index, chunk = pl.program_id(0), pl.program_id(1)
    lanes = jnp.arange(block, dtype=jnp.int32)
    positions = index * block + lanes
    valid = positions < num_pairs
    expert = pltriton.load(sorted_expert_ref.at[positions], mask=valid, other=-1)
    before = pltriton.load(sorted_expert_ref.at[jnp.maximum(positions - 1, 0)], mask=valid & (positions > 0), other=-1)
    pairs = pltriton.load(order_ref.at[positions], mask=valid, other=0)
    coef = pltriton.load(coef_ref.at[positions], mask=valid, other=0.0)
    cols = kernel._columns(chunk, d_block)
    rows = kernel._load_rows(rows_ref, pairs // top_k, cols, valid)  # [B, Dc] in the rows' dtype
    if stage == "gather":
        total = jnp.sum(coef[:, None] * rows.astype(jnp.float32), axis=0)  # [Dc]
        pltriton.store(out_ref.at[index, cols], total)
        return
    opens = valid & ((expert != before) | (lanes == 0))
    rank = jnp.cumsum(opens.astype(jnp.int32)) - 1
    slot = jnp.arange(slots, dtype=jnp.int32)
    member = (rank[None, :] == slot[:, None]) & valid[None, :]  # [S, B], first window only
    weights = jnp.where(member, coef[None, :], 0.0)  # [S, B] f32
    if stage == "dots, one product":
        sums = jnp.dot(weights.astype(rows.dtype), rows, preferred_element_type=jnp.float32)
    else:
        sums = kernel._weighted_row_sums(weights, rows)  # [S, Dc] f32
    if stage in ("dots", "dots, one product"):
        pltriton.store(out_ref.at[index, cols], jnp.sum(sums, axis=0))
        return
    slot_expert = jnp.max(jnp.where(member, expert[None, :], -1), axis=1)  # [S]
    used = slot_expert >= 0
    out_rows = jnp.where(used, slot_expert, num_experts)
    if stage == "row stores, contiguous":
        out_rows = jnp.where(used, index * slots + slot, out_ref.shape[0])
    pltriton.store(out_ref.at[out_rows[:, None], cols[None, :]], sums.astype(out_ref.dtype), mask=used[:, None])


def probe(stage, coef, rows, sorted_expert, order, like, *, top_k, config, interpret):
    """One rung's pallas_call; `like` [N, d] gives the "row stores" output its shape and dtype."""
    num_pairs, d = sorted_expert.shape[0], rows.shape[1]
    num_blocks = pl.cdiv(num_pairs, config.segment_block)
    body = functools.partial(
        _probe_kernel,
        stage=stage,
        num_pairs=num_pairs,
        top_k=top_k,
        block=config.segment_block,
        slots=config.segment_slots,
        d_block=config.d_block,
        num_experts=like.shape[0],
    )
    # The store rungs write into uninitialised outputs (rows they do not store keep garbage, which nothing
    # reads): a zero fill inside the timed call would add a memset of a different size to each.
    if stage == "row stores":
        out_shape = jax.ShapeDtypeStruct(like.shape, like.dtype)
    elif stage == "row stores, contiguous":
        out_shape = jax.ShapeDtypeStruct((num_blocks * config.segment_slots, d), like.dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((num_blocks, d), jnp.float32)
    return pl.pallas_call(
        body,
        out_shape=out_shape,
        grid=(num_blocks, d // config.d_block),
        compiler_params=kernel._compiler_params(config),
        interpret=interpret,
        name=f"segment_probe_{stage.replace(' ', '_')}",
    )(sorted_expert, order, coef, rows)


def probe_inputs(tokens, top_k, num_experts, d):
    """Random x [T, d], table [N, d], sorted-order coefficients [P] and the ExpertSchedule of uniform
    routing, the same for every probe at one setting."""
    kx, ku, ki, kc = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (tokens, d), DTYPE)
    up = (d**-0.5 * jax.random.normal(ku, (num_experts, d), jnp.float32)).astype(DTYPE)
    indices = jax.random.randint(ki, (tokens, top_k), 0, num_experts, jnp.int32)
    coef = jax.random.normal(kc, (tokens * top_k,), jnp.float32)
    return x, up, coef, jax.jit(build_schedule, static_argnums=1)(indices, num_experts)


def ladder(tokens, top_k, num_experts, d, *, interpret, deadline) -> list[dict]:
    x, up, coef, schedule = probe_inputs(tokens, top_k, num_experts, d)
    config = default_config(tokens, top_k, num_experts, d, DTYPE, variant="sorted")
    common_kwargs = {"top_k": top_k, "config": config, "interpret": interpret}

    def stage_fn(stage):
        return jax.jit(lambda c, r, s: probe(stage, c, r, s.sorted_expert, s.order, up, **common_kwargs))

    rungs = {stage: stage_fn(stage) for stage in STAGES}
    variations = {stage: stage_fn(stage) for stage in VARIATIONS}
    out_shape = jax.ShapeDtypeStruct(up.shape, up.dtype)
    rungs["blocks"] = jax.jit(
        lambda c, r, s: kernel.segment_blocks(
            c, r, s.sorted_expert, s.order, out_shape, dot_table=None, **common_kwargs
        )
    )
    rungs["segment_sum"] = jax.jit(
        lambda c, r, s: kernel.segment_sum(c, r, s.sorted_expert, s.order, out_like=up, **common_kwargs)
    )
    # What v2 paid instead of zeroing the untouched rows: a zero fill of all of [N, d] before the blocks.
    rungs["zeros [N, d]"] = jax.jit(lambda c, r, s: jnp.zeros(up.shape, up.dtype))
    rungs["pair_dots"] = jax.jit(
        lambda c, r, s: kernel.pair_dots(
            up, r, s.sorted_expert, s.sorted_token, s.order, config=config, interpret=interpret
        )
    )
    gathered = tokens * top_k * d * jnp.dtype(DTYPE).itemsize  # one row per pair
    rows, previous = [], None
    for name, fn in [*rungs.items(), *variations.items()]:
        row = {"setting": f"T={tokens} K={top_k} N={num_experts} d={d}", "rung": name, "config": str(config)}
        if time.monotonic() > deadline:
            rows.append({**row, "status": "skipped (time budget)"})
            continue
        try:
            row.update(common.time_fn(fn, [(coef, x, schedule)], reps=3 if interpret else 20))
            if name != "zeros [N, d]":  # the one rung that gathers nothing
                row["gather_TBps"] = gathered / (row["ms"] * 1e-3) / 1e12
            if name in VARIATIONS:
                changed = {"dots, one product": "dots", "row stores, contiguous": "row stores"}[name]
                row["added_ms"] = row["ms"] - next(r["ms"] for r in rows if r["rung"] == changed and "ms" in r)
            elif previous is not None and name not in ("pair_dots", "zeros [N, d]"):
                row["added_ms"] = row["ms"] - previous
            previous = row["ms"]
            row["status"] = "ok"
        except Exception as err:  # one failing rung must not cost the others
            row["status"] = f"error: {type(err).__name__}"
            row["error"] = traceback.format_exc(limit=3)[-2000:]
        print({k: v for k, v in row.items() if k != "config"}, flush=True)
        rows.append(row)
    return rows


def _reductions_rung_kernel(sorted_expert_ref, order_ref, coef_ref, rows_ref, out_ref, *, stage, num_pairs, top_k,
                            block, d_block):  # fmt: skip
    """A --reductions-ladder rung: the blocks kernel's own loads and numbering (kernel.py's prologue), then
    one f32 row per program, stored to row 2 * block (+ 1 where a segment is cut, from "+ head/tail flags" on)."""
    index = pl.program_id(0)
    cols = kernel._columns(pl.program_id(1), d_block)
    cut_flags = stage != "+ numbering"
    got = kernel._segment_block_prologue(
        sorted_expert_ref,
        order_ref,
        coef_ref,
        rows_ref,
        None,
        cols=cols,
        num_pairs=num_pairs,
        top_k=top_k,
        block=block,
        cut_flags=cut_flags,
    )
    rows = got.rows.astype(jnp.float32)  # as the reductions mode converts them, once
    if stage == "+ loop":  # every segment's masked sum, in the real pass's dynamic loop, added into one row

        def add_segment(segment, total):
            return total + kernel._masked_row_sum(got.rank == segment, got.coef, rows)

        total = lax.fori_loop(0, got.num_local, add_segment, jnp.zeros((d_block,), jnp.float32))
    else:  # the block's last segment alone: one masked sum that needs the rank and the count
        total = kernel._masked_row_sum(got.rank == got.num_local - 1, got.coef, rows)
    row = 2 * index
    if cut_flags:
        row = row + (got.head_cut | got.tail_cut).astype(jnp.int32)
    pltriton.store(out_ref.at[row, cols], total)


def reductions_rung(stage, coef, rows, sorted_expert, order, *, top_k, config, interpret):
    """One --reductions-ladder rung's pallas_call on the blocks kernel's grid; an uninitialised [2 * blocks, d]
    f32 output, the size of the real pass's side buffer."""
    num_pairs, d = sorted_expert.shape[0], rows.shape[1]
    num_blocks = pl.cdiv(num_pairs, config.segment_block)
    body = functools.partial(
        _reductions_rung_kernel,
        stage=stage,
        num_pairs=num_pairs,
        top_k=top_k,
        block=config.segment_block,
        d_block=config.d_block,
    )
    return pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct((2 * num_blocks, d), jnp.float32),
        grid=(num_blocks, d // config.d_block),
        compiler_params=kernel._compiler_params(config),
        interpret=interpret,
        name=f"segment_probe_{stage.strip('+ ').replace(' ', '_').replace('/', '_')}",
    )(sorted_expert, order, coef, rows)


def _ladder_rung_fn(name: str, config, *, top_k: int, out_shape, interpret: bool):
    """A --reductions-ladder rung, jitted, as a function of (coef, rows, schedule, table)."""
    kwargs = {"top_k": top_k, "interpret": interpret}
    if name == "gather":
        return jax.jit(lambda c, r, s, t: probe("gather", c, r, s.sorted_expert, s.order, t, config=config, **kwargs))
    if name.startswith("blocks"):
        config = dataclasses.replace(config, segment_regather=name == "blocks, gathering again")
        return jax.jit(
            lambda c, r, s, t: kernel.segment_blocks(
                c, r, s.sorted_expert, s.order, out_shape, dot_table=None, config=config, **kwargs
            )
        )
    return jax.jit(lambda c, r, s, t: reductions_rung(name, c, r, s.sorted_expert, s.order, config=config, **kwargs))


def _check_ladder_rows(rung: str, out, coef, x, schedule, *, top_k: int, block: int) -> None:
    """--smoke's check that a probe rung summed what it says, against numpy in float64: "gather" each block's
    whole weighted sum, "+ numbering" and "+ head/tail flags" its last segment's, "+ loop" all its segments'
    (the whole sum again), in the row the rung stores it to (module doc). AssertionError otherwise."""
    experts = np.asarray(schedule.sorted_expert)
    num_pairs = experts.shape[0]
    weighted = np.asarray(coef, np.float64)[:, None] * np.asarray(x, np.float64)[np.asarray(schedule.order) // top_k]
    out = np.asarray(out, np.float64)
    for index, start in enumerate(range(0, num_pairs, block)):
        stop = min(start + block, num_pairs)
        member = np.ones(stop - start, bool)
        if rung in ("+ numbering", "+ head/tail flags"):
            member = experts[start:stop] == experts[stop - 1]  # sorted: the last segment is the last expert's
        want = weighted[start:stop][member].sum(axis=0)
        head_cut = start > 0 and experts[start - 1] == experts[start]
        tail_cut = stop < num_pairs and experts[stop] == experts[stop - 1]
        row = index if rung == "gather" else 2 * index + (rung != "+ numbering" and (head_cut or tail_cut))
        np.testing.assert_allclose(out[row], want, rtol=1e-5, atol=1e-5, err_msg=f"rung {rung!r}, block {index}")


def reductions_ladder(tokens, top_k, num_experts, d, *, interpret, deadline) -> list[dict]:
    """The rungs from "gather" to the reductions-mode blocks kernel at one setting (see the module doc)."""
    x, up, coef, schedule = probe_inputs(tokens, top_k, num_experts, d)
    heuristic = default_config(tokens, top_k, num_experts, d, DTYPE)
    config = dataclasses.replace(heuristic, segment_sums="reductions")  # the heuristic's own at training's shapes
    setting = {
        "setting": f"T={tokens} K={top_k} N={num_experts} d={d}",
        "heuristic_segment_sums": heuristic.segment_sums,
    }
    setting.update(_segment_counts(schedule.sorted_expert, config.segment_block))
    row_bytes = tokens * top_k * d * jnp.dtype(DTYPE).itemsize  # one gathered row per pair
    out_shape = jax.ShapeDtypeStruct(up.shape, up.dtype)
    block = config.segment_block
    rows, ms, blocks_out = [], {}, None
    for name, against in REDUCTIONS_LADDER:
        row = {**setting, "rung": name, "compared_with": against, "config": str(config)}
        if time.monotonic() > deadline:
            rows.append({**row, "status": "skipped (time budget)"})
            continue
        try:
            fn = _ladder_rung_fn(name, config, top_k=top_k, out_shape=out_shape, interpret=interpret)
            row.update(
                common.time_fn(
                    fn, [(coef, x, schedule, up)], reps=1 if interpret else 20, batches=1 if interpret else 5
                )
            )
            row["gather_TBps"] = row_bytes / (row["ms"] * 1e-3) / 1e12
            if "gather" in ms:
                row["over_gather"] = row["ms"] / ms["gather"]
            if against in ms:
                row["added_ms"] = row["ms"] - ms[against]
            ms[name] = row["ms"]
            if interpret:  # --smoke: each rung lowers for CUDA, and the probe rungs sum what they say
                native = _ladder_rung_fn(name, config, top_k=top_k, out_shape=out_shape, interpret=False)
                native.trace(coef, x, schedule, up).lower(lowering_platforms=("cuda",))
                out = fn(coef, x, schedule, up)
                if not name.startswith("blocks"):  # the kernel's own tests check the real pass
                    _check_ladder_rows(name, out, coef, x, schedule, top_k=top_k, block=block)
                elif name == "blocks":
                    blocks_out = out
                else:  # gathering again: the same sums, up to the last bit (interpret mode's XLA fuses it apart)
                    got, want = (np.asarray(o[0], np.float32) for o in (out, blocks_out))
                    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2, err_msg=name)
            row["status"] = "ok"
        except Exception as err:  # one failing rung must not cost the others
            row["status"] = f"error: {type(err).__name__}"
            row["error"] = traceback.format_exc(limit=3)[-2000:]
        print({k: v for k, v in row.items() if k not in ("config", "error")}, flush=True)
        rows.append(row)
    return rows


def _segment_counts(sorted_expert, block: int) -> dict:
    """Pairs per touched expert, and the mean number of segments meeting a block of `block` sorted pairs
    (a block's first pair opens one, and so does every other pair whose expert differs from the one before)."""
    num_pairs = sorted_expert.shape[0]
    starts = jnp.concatenate([jnp.ones((1,), bool), sorted_expert[1:] != sorted_expert[:-1]])  # [P]
    block_starts = jnp.arange(num_pairs) % block == 0  # [P]
    return {
        "pairs_per_touched_expert": num_pairs / int(jnp.sum(starts)),
        "segments_per_block": int(jnp.sum(starts | block_starts)) / pl.cdiv(num_pairs, block),
    }


def _sums_piece(piece: str, config, *, top_k: int, out_shape, interpret: bool):
    """One piece of the segment pass under `config`, jitted, as a function of (coef, rows, schedule, table)."""
    kwargs = {"top_k": top_k, "config": config, "interpret": interpret}
    if piece == "gather":
        return jax.jit(lambda c, r, s, t: probe("gather", c, r, s.sorted_expert, s.order, t, **kwargs))
    if piece == "blocks":
        return jax.jit(
            lambda c, r, s, t: kernel.segment_blocks(
                c, r, s.sorted_expert, s.order, out_shape, dot_table=None, **kwargs
            )
        )
    with_dots = piece == "segment_sum + dots"
    return jax.jit(
        lambda c, r, s, t: kernel.segment_sum(
            c, r, s.sorted_expert, s.order, out_like=t, dot_table=t if with_dots else None, **kwargs
        )
    )


def _time_piece(piece: str, config, inputs, *, top_k: int, out_shape, interpret: bool) -> dict:
    """ms (median, min, max) of one piece under `config` on inputs (coef, x, schedule, table), and the rate
    at which it gathers: one row of x per pair, with the dots also the pair's expert row (but one row a
    chunk by aligned chunks)."""
    fn = _sums_piece(piece, config, top_k=top_k, out_shape=out_shape, interpret=interpret)
    timed = common.time_fn(fn, [inputs], reps=1 if interpret else 20, batches=1 if interpret else 5)
    coef, x = inputs[0], inputs[1]
    row_bytes = coef.shape[0] * x.shape[1] * x.dtype.itemsize  # one gathered row per pair
    rows_per_pair = 2 if piece == "segment_sum + dots" and config.segment_sums != "aligned" else 1
    return {**timed, "gather_TBps": rows_per_pair * row_bytes / (timed["ms"] * 1e-3) / 1e12}


def _applies(piece: str, mode: str) -> bool:
    """Whether --sums times `mode` for `piece`: the aligned chunks have no fixed-blocks kernel to time alone,
    and the pass with the dots never regathers (so that row would time "reductions" again)."""
    if piece == "blocks" and SUMS_MODES[mode]["segment_sums"] == "aligned":
        return False
    return not (piece == "segment_sum + dots" and SUMS_MODES[mode].get("segment_regather"))


def compare_sums(tokens, top_k, num_experts, d, *, interpret, deadline) -> list[dict]:
    """The segment pass's pieces in both segment_sums modes at one setting (see the module doc)."""
    x, up, coef, schedule = probe_inputs(tokens, top_k, num_experts, d)
    base = default_config(tokens, top_k, num_experts, d, DTYPE)  # the segment pass's tiles, as training runs
    setting = {"setting": f"T={tokens} K={top_k} N={num_experts} d={d}"}
    setting.update(_segment_counts(schedule.sorted_expert, base.segment_block))
    out_shape = jax.ShapeDtypeStruct(up.shape, up.dtype)
    runs = [("gather", None)] + [(piece, mode) for piece in SUMS_PIECES for mode in SUMS_MODES if _applies(piece, mode)]
    rows, ms = [], {}
    for piece, mode in runs:
        config = base if mode is None else dataclasses.replace(base, **SUMS_MODES[mode])
        row = {**setting, "piece": piece, "segment_sums": mode, "config": str(config)}
        if time.monotonic() > deadline:
            rows.append({**row, "status": "skipped (time budget)"})
            continue
        try:
            inputs = (coef, x, schedule, up)
            row.update(_time_piece(piece, config, inputs, top_k=top_k, out_shape=out_shape, interpret=interpret))
            ms[piece, mode] = row["ms"]
            if mode == "reductions" and (piece, "products") in ms:
                row["products_over_reductions"] = ms[piece, "products"] / row["ms"]  # > 1: reductions faster
            if mode not in (None, "products", "reductions") and (piece, "reductions") in ms:
                row["over_reductions"] = row["ms"] / ms[piece, "reductions"]  # < 1: this mode faster
            row["status"] = "ok"
        except Exception as err:  # one failing piece must not cost the others
            row["status"] = f"error: {type(err).__name__}"
            row["error"] = traceback.format_exc(limit=3)[-2000:]
        print({k: v for k, v in row.items() if k not in ("config", "error")}, flush=True)
        rows.append(row)
    return rows


def compare_tiles(tokens, top_k, num_experts, d, *, interpret, deadline) -> list[dict]:
    """The whole segment pass in "reductions" over TILES at one setting (see the module doc)."""
    x, up, coef, schedule = probe_inputs(tokens, top_k, num_experts, d)
    heuristic = dataclasses.replace(default_config(tokens, top_k, num_experts, d, DTYPE), segment_sums="reductions")
    counts = {block: _segment_counts(schedule.sorted_expert, block)["segments_per_block"] for block, _ in TILES}
    per_expert = _segment_counts(schedule.sorted_expert, heuristic.segment_block)["pairs_per_touched_expert"]
    out_shape = jax.ShapeDtypeStruct(up.shape, up.dtype)
    configs = [("heuristic", heuristic)]
    for block, warps in TILES:
        # segment_regather as default_config's step 6 would set it for this block
        regather = per_expert >= 2 * block
        tile = dataclasses.replace(heuristic, segment_block=block, num_warps=warps, segment_regather=regather)
        if tile != heuristic:
            configs.append((f"block {block}, {warps} warps", tile))
    rows, heuristic_ms = [], {}
    for piece in TILES_PIECES:
        for name, config in configs:
            row = {
                "setting": f"T={tokens} K={top_k} N={num_experts} d={d}",
                "piece": piece,
                "tiles": name,
                "segment_block": config.segment_block,
                "num_warps": config.num_warps,
                # what the pass does: the one with the dots never regathers (kernel.segment_blocks)
                "segment_regather": config.segment_regather and piece == "segment_sum",
                "segments_per_block": counts.get(config.segment_block),
                "config": str(config),
            }
            if time.monotonic() > deadline:
                rows.append({**row, "status": "skipped (time budget)"})
                continue
            try:
                inputs = (coef, x, schedule, up)
                row.update(_time_piece(piece, config, inputs, top_k=top_k, out_shape=out_shape, interpret=interpret))
                if name == "heuristic":
                    heuristic_ms[piece] = row["ms"]
                elif piece in heuristic_ms:
                    row["over_heuristic"] = row["ms"] / heuristic_ms[piece]
                if interpret:  # --smoke: every tiling lowers for CUDA and sums what the heuristic's does
                    native = _sums_piece(piece, config, top_k=top_k, out_shape=out_shape, interpret=False)
                    native.trace(coef, x, schedule, up).lower(lowering_platforms=("cuda",))
                    got = _sums_piece(piece, config, top_k=top_k, out_shape=out_shape, interpret=True)(*inputs)
                    want = _sums_piece(piece, heuristic, top_k=top_k, out_shape=out_shape, interpret=True)
                    expected = want(*inputs)
                    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
                        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32), 2e-2, 2e-2)
                row["status"] = "ok"
            except Exception as err:  # one failing tiling must not cost the others
                row["status"] = f"error: {type(err).__name__}"
                row["error"] = traceback.format_exc(limit=3)[-2000:]
            print({k: v for k, v in row.items() if k not in ("config", "error")}, flush=True)
            rows.append(row)
    return rows


def _report(rows: list[dict], columns: list[str], name: str, *, smoke: bool, start: float) -> None:
    """Print the table; on a GPU write results/<name>.json (and $OUT); exit non-zero if any row failed."""
    print()
    common.print_table(rows, [*columns, "gather_TBps", "status"])
    if not smoke:
        path = common.write_results(name, rows, wall_s=round(time.monotonic() - start, 1))
        common.copy_to_out(path)
        print(f"\nwrote {path}")
    failed = [r for r in rows if r["status"].startswith("error")]
    if failed:
        sys.exit(f"{len(failed)} of {len(rows)} rows failed: {[r['status'] for r in failed]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (CPU)")
    parser.add_argument("--sums", action="store_true", help="segment_sums 'products' vs 'reductions' instead")
    parser.add_argument(
        "--reductions-ladder", action="store_true", help="from 'gather' to the reductions-mode blocks, instead"
    )
    parser.add_argument("--tiles", action="store_true", help="the reductions pass over segment blocks and warps")
    parser.add_argument("--budget-s", type=float, default=150.0)
    parser.add_argument("--name", default=None, help="results/<name>.json (default: the mode's own name)")
    args = parser.parse_args()
    start = time.monotonic()
    deadline = start + args.budget_s
    # mode: (its settings, --smoke's, the function timing one setting, the results' name, the table's columns)
    if args.reductions_ladder:
        mode = (LADDER_SETTINGS, SUMS_SMOKE_SETTINGS, reductions_ladder, "segment_reductions_ladder")
        columns = ["setting", "segments_per_block", "rung", "ms", "compared_with", "added_ms", "over_gather"]
    elif args.tiles:
        mode = (LADDER_SETTINGS, SUMS_SMOKE_SETTINGS, compare_tiles, "segment_tiles")
        columns = ["setting", "piece", "tiles", "segment_regather", "segments_per_block", "ms", "over_heuristic"]
    elif args.sums:
        mode = (SUMS_SETTINGS, SUMS_SMOKE_SETTINGS, compare_sums, "segment_sums")
        columns = ["setting", "segments_per_block", "piece", "segment_sums", "ms", "products_over_reductions"]
        columns.append("over_reductions")
    else:
        mode = (SETTINGS, SMOKE_SETTINGS, ladder, "segment_probe")
        columns = ["setting", "rung", "ms", "added_ms"]
    settings, smoke_settings, time_setting, name = mode
    settings = smoke_settings if args.smoke else settings
    rows = [r for s in settings for r in time_setting(*s, interpret=args.smoke, deadline=deadline)]
    _report(rows, columns, args.name or name, smoke=args.smoke, start=start)


if __name__ == "__main__":
    main()
