"""Tile sizes, warps, the forward variant and the segment sums of the atomic-expert kernels, with the
default heuristic, and the sizes the kernels take (`check_kernel_limits`, for every op built on them:
omni_expert, embedding_bag).

The kernels (kernel.py) are three passes over the T*K (token, expert) pairs, each memory-bound:

  score pass     s_p = a[i_p] . b[j_p]                      program = `pair_block` pairs
  combine pass   out[t] = sum_k c[t, k] table[e_tk]         program = `token_block` tokens x `k_block` of their
                                                                      pairs x `d_block` columns, in one step
  segment pass   out[e] = sum_{p in seg(e)} c_p rows[t_p]   program = `segment_block` consecutive sorted pairs x
                                                                      `d_block` columns, in one step; its
                                                                      segments summed `segment_slots` at a time
                                                                      ("products") or one at a time
                                                                      ("reductions"): `segment_sums`

Every pass gathers one side's rows per pair and reuses the other (a token row across its K pairs, or an
expert row across its sorted segment). Four things decide the speed:

- Where the gathered rows come from: L2 (fast) or HBM. All grids put the column slice on their slowest
  axis, so the programs running at any moment share one column slice of the gathered table, and a slice
  of N * d_block elements can sit in L2 when the whole table cannot. The score pass needs full-width dots,
  so it cuts the columns into `score_splits` slices on its grid and sums the partial dots afterwards.
- How many bytes are in flight: every program gathers one tile of about `TILE_BYTES` in ONE step (no
  loop), because in v1 loops of dependent loads (ids, then rows) ran several times slower than single-step
  programs (benchmarks/NOTES.md, "v1 measured"): the GPU hides latency across programs, not within one.
- Registers: segments are summed by tensor-core products whose result has `segment_slots` rows of the
  column chunk; 16 slots (the fewest a Triton dot allows) keep the segment pass's registers per thread
  lowest, and each doubling costs many more (benchmarks/kernel_resources.py reports them). A block with
  more segments loops over windows of slots: more products and stores, no more loads.
- How the segment pass sums its tile (`segment_sums`). "products" (above) pays the same per block whatever
  its segments: per window, two [segment_slots, segment_block] x [segment_block, d_block] products (for
  f32-accurate weights) and 2 x segment_slots row stores, most of them masked. "reductions" sums each
  segment meeting the block by an f32 masked sum over the block's pairs (CUDA cores, in the layout the
  rows were loaded in) and stores one row per segment, so its cost grows with the segments per block,
  about segment_block / (pairs per touched expert) + 1. Measured on an H200 (`benchmarks/segment_probe.py
  --sums`, results/segment_sums.json, NOTES.md "Segment sums by reductions"): "reductions" is faster where
  a block meets about two segments or fewer (training's 64 and 640 pairs per expert in 64-pair blocks) and
  slower where it meets ~7 (the paper's ~20 pairs per expert in 128-pair blocks); step 5 below. "aligned"
  cuts the pairs into chunks that start where segments start instead of fixed blocks: one expert per
  program, one sum, the dots' expert row read once (kernel.py's section on it); not measured yet, so the
  heuristic never picks it.
- Whether "reductions" keeps its tile live (`segment_regather`). Summing a second segment from the tile the
  block gathered keeps that f32 tile in registers through the first sum: compiled for sm_90 about twice
  the registers of a one-sum program, so fewer programs an SM. Gathering the block's rows again for every
  segment after the first (from L1 or L2: the program just loaded them) frees it, at the cost of that
  second gather where a block meets a second segment. Measured on an H200 (`benchmarks/segment_probe.py
  --reductions-ladder`, results/segment_reductions_ladder_bodies.json): 0.82x the pass's first kernel where 10% of
  blocks meet a second segment (K = 1280, 640 pairs per expert), 1.03-1.07x where 90% do (64 per expert).
  Only the pass without the fused dots (d_up's) does it: with the dots the tile is live for them anyway, and
  gathering again there measured 1.03x at K = 1280 and 1.18-1.19x at 64 pairs per expert
  (results/segment_sums_regather.json).

Default heuristic (`default_config`), hypotheses for benchmarks/experts.py on the GPU to settle:
  1. d_block: the widest power of two dividing d, at most 256 bytes of a row (128 bf16 / 64 f32 columns).
  2. If the expert rows are reused (T*K/N >= 2), shrink d_block (down to 32 columns) until one column
     slice of a table, N * d_block * itemsize, fits `L2_BUDGET_BYTES`.
  3. variant "sorted" (walk pairs in expert order: each table row read once per segment, the token rows
     gathered instead, from an x slice small enough for L2) when each touched expert serves at least
     `SORTED_REUSE` pairs on average AND the table does not fit L2 whole: at the paper's setting (~20
     pairs per expert, a 210 MB table) the expert-order score pass beat the token order, and the schedule
     is one sort that the backward reuses (benchmarks/NOTES.md, "Variants"). Otherwise "token" (no sort
     in the forward, x rows reused across the K pairs, table rows gathered; at ~2 pairs per expert the two
     orders tied, and between 2 and 16 nothing was measured apart) with `score_splits` the fewest slices
     whose table slice fits the budget; but when even the thinnest slice does not fit and rows are reused,
     "sorted" again (x is small, so it stays in L2). Without reuse (T*K/N < 2) every touched row is read
     about once whatever the order: "token", one slice.
  4. Tiles of `TILE_BYTES` per gather: R = TILE_BYTES / (d_block * itemsize) rows (at least 16).
     pair_block = R; k_block = min(K rounded up to a power of two, R), token_block = R / k_block (K is
     split over several programs when it exceeds R: their f32 partial sums are added by XLA);
     segment_block = R (at most 128); segment_slots = 16.
  5. segment_sums "reductions" when the pairs per touched expert are at least segment_block (a block then
     meets about two segments or fewer), else "products". Measured on both sides of that line, not at it:
     nothing between ~0.16 and 1 segment_block of pairs per expert has been timed.
  6. segment_regather where "reductions" and the pairs per touched expert are at least 2 x segment_block
     (at most about half the blocks meet a second segment): between the two measured points (1 and 10
     blocks of pairs per expert), interpolated, not timed.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from pallas_kernels._checks import is_int, is_power_of_two

# Half of an H100's 50 MB L2: the gathered slice must share the cache with the reused rows and outputs.
L2_BUDGET_BYTES = 24 * 2**20
# Widest row chunk a program gathers: two 128-byte lines.
MAX_CHUNK_BYTES = 256
# Narrowest chunk the L2 rule may shrink to (64 bytes in bf16: still whole 32-byte sectors).
MIN_CHUNK_COLUMNS = 32
# Rows are "reused" when the pairs number at least this many per expert of the table (T*K/N).
REUSE_THRESHOLD = 2.0
# From this many pairs per touched expert on, the forward walks the pairs in expert order (step 3).
SORTED_REUSE = 16.0
# Bytes one program gathers in its single step: 64 elements per thread at 4 warps, no spills.
TILE_BYTES = 16 * 2**10
# jnp.dot inside a Triton kernel needs every dimension >= 16 (smaller ones give wrong results silently).
MIN_DOT_DIM = 16
# Sorted pairs per segment-pass program at most: its [segment_slots, segment_block] f32 weights and the
# [segment_block, d_block] tile stay in registers when rows are narrow.
MAX_SEGMENT_BLOCK = 128

VARIANTS = ("token", "sorted")
SEGMENT_SUMS = ("products", "reductions", "aligned")
MAX_WIDTH = 8192  # the widest d the kernels are tested for
INT32_LIMIT = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class ExpertKernelConfig:
    """Static tuning of the expert kernels. Every block size is a power of two (a Triton requirement).

    Attributes:
      variant: order of the pairs in the forward score pass: "token" (no sort needed) or "sorted" (expert
        order from the schedule, which the backward then reuses).
      d_block: columns per program (combine, segment passes) and per loop step (score pass); divides d.
      score_splits: column slices of the score pass on its grid; divides d // d_block.
      pair_block: pairs per score-pass program.
      token_block: tokens per combine-pass program.
      k_block: pairs of each token per combine-pass program; K > k_block splits K over programs.
      segment_block: consecutive expert-sorted pairs per segment-pass program (a dot dimension: >= 16).
      segment_slots: segments summed per tensor-core product in a segment-pass program (>= 16, <=
        segment_block); a block with more segments takes several products. Unused by "reductions".
      segment_sums: how a segment-pass program sums its segments: "products" (tensor-core products of
        `segment_slots` segments at a time, 16 slot rows stored per window), "reductions" (one f32 masked
        sum over the block's pairs and one row store per segment meeting the block), or "aligned" (chunks of
        at most segment_block pairs that start where segments do, so one expert and one sum a program;
        not chosen by the heuristic until measured); see the module doc.
      segment_regather: with "reductions", sum every segment after a block's first from the block's rows
        gathered again rather than from the tile of the first gather (which then needs no registers past
        the first sum); the same sums of the same values. Unused by "products" and by the segment pass
        with the fused dots (see the module doc).
      num_warps, num_stages: Triton launch parameters, shared by the passes.
    """

    variant: str = "token"
    d_block: int = 128
    score_splits: int = 1
    pair_block: int = 64
    token_block: int = 4
    k_block: int = 16
    segment_block: int = 64
    segment_slots: int = 16
    segment_sums: str = "products"
    segment_regather: bool = False
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r} must be one of {VARIANTS}")
        if self.segment_sums not in SEGMENT_SUMS:
            raise ValueError(f"segment_sums={self.segment_sums!r} must be one of {SEGMENT_SUMS}")
        if not isinstance(self.segment_regather, bool):
            raise TypeError(f"segment_regather={self.segment_regather!r} must be a bool")
        blocks = ("d_block", "score_splits", "pair_block", "token_block", "k_block", "segment_block", "segment_slots")
        for name in (*blocks, "num_warps"):
            value = getattr(self, name)
            if not is_power_of_two(value):
                raise ValueError(f"{name}={value!r} must be a power of two (Triton blocks are)")
        for name in ("d_block", "segment_block", "segment_slots"):  # dimensions of the segment pass's jnp.dot
            if getattr(self, name) < MIN_DOT_DIM:
                raise ValueError(
                    f"{name}={getattr(self, name)} must be >= {MIN_DOT_DIM} (a dot dimension in the segment pass)"
                )
        if self.segment_slots > self.segment_block:
            raise ValueError(
                f"segment_slots={self.segment_slots} must be <= segment_block={self.segment_block} "
                "(a block holds at most one segment per pair)"
            )
        if not is_int(self.num_stages) or self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages!r} must be a positive int")

    def check_width(self, d: int) -> None:
        """ValueError unless this config tiles a row of width d."""
        if d % self.d_block:
            raise ValueError(f"config.d_block={self.d_block} must divide d={d}")
        if (d // self.d_block) % self.score_splits:
            raise ValueError(
                f"config.score_splits={self.score_splits} must divide d // d_block = {d // self.d_block} (d={d})"
            )


def check_kernel_limits(width_of: str, d: int, indices, num_rows: int, rows_are: str, config) -> None:
    """ValueError/TypeError for sizes or a config the kernels cannot take, shared by every op built on them:
    rows of width d (the argument `width_of`'s), [T, K] indices into `num_rows` rows (`rows_are` names them)."""
    tokens, top_k = indices.shape
    if d % 16 or not 16 <= d <= MAX_WIDTH:
        raise ValueError(f"{width_of} has d={d}; implementation='pallas' needs d a multiple of 16 in [16, {MAX_WIDTH}]")
    if tokens < 1 or top_k < 1:
        raise ValueError(f"indices has shape {indices.shape}; implementation='pallas' needs T >= 1 and K >= 1")
    if tokens * top_k > INT32_LIMIT or num_rows > INT32_LIMIT:
        raise ValueError(
            f"T*K={tokens * top_k} pairs and N={num_rows} {rows_are} must each fit int32 for implementation='pallas'"
        )
    if config is not None:
        if not isinstance(config, ExpertKernelConfig):
            raise TypeError(f"config must be an ExpertKernelConfig or None, got {type(config).__name__}")
        config.check_width(d)


def _widest_power_of_two_dividing(d: int, cap: int) -> int:
    block = 1
    while block * 2 <= cap and d % (block * 2) == 0:
        block *= 2
    return block


def _next_power_of_two(value: float) -> int:
    block = 1
    while block < value:
        block *= 2
    return block


def _tiles(top_k: int, d_block: int, itemsize: int) -> dict:
    """Step 4 of the heuristic: block sizes that gather about TILE_BYTES in one step."""
    rows = max(MIN_DOT_DIM, TILE_BYTES // (d_block * itemsize))  # a power of two: every factor is
    k_block = min(_next_power_of_two(top_k), rows)
    return {
        "pair_block": rows,
        "token_block": max(1, rows // k_block),
        "k_block": k_block,
        "segment_block": min(rows, MAX_SEGMENT_BLOCK),
        "segment_slots": MIN_DOT_DIM,
    }


def default_config(
    tokens: int, top_k: int, num_experts: int, d: int, dtype, *, variant: str | None = None
) -> ExpertKernelConfig:
    """The heuristic config for x [tokens, d], tables [num_experts, d] of `dtype`, K = top_k (see module doc).

    `variant` ("token" or "sorted") overrides the rule's choice of variant; the column slices are then the
    ones that variant needs (its gathered side: the table for "token", x for "sorted").
    """
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} must be None or one of {VARIANTS}")
    itemsize = jnp.dtype(dtype).itemsize
    d_block = _widest_power_of_two_dividing(d, MAX_CHUNK_BYTES // itemsize)
    reused = tokens * top_k >= REUSE_THRESHOLD * num_experts
    if reused:
        while d_block > MIN_CHUNK_COLUMNS and num_experts * d_block * itemsize > L2_BUDGET_BYTES:
            d_block //= 2
    tiles = _tiles(top_k, d_block, itemsize)
    chunks = d // d_block

    def fewest_splits(gathered_rows: int) -> int:  # column slices so that gathered_rows x slice fit L2
        splits = 1
        while chunks % (splits * 2) == 0 and gathered_rows * (d // splits) * itemsize > L2_BUDGET_BYTES:
            splits *= 2
        return splits

    pairs = tokens * top_k
    # pairs per touched expert (0 for no pairs: then nothing runs and either sum mode serves)
    per_expert = pairs / (num_experts * -math.expm1(-pairs / num_experts)) if pairs else 0.0
    if variant is None:
        token_splits = fewest_splits(num_experts)
        table_fits = num_experts * (d // token_splits) * itemsize <= L2_BUDGET_BYTES
        heavy_reuse = per_expert >= SORTED_REUSE and token_splits > 1
        # "sorted": table rows read once per segment, x (small) gathered instead.
        variant = "sorted" if reused and (heavy_reuse or not table_fits) else "token"
    if not reused:
        splits = 1  # every touched row is read about once whatever the slicing: keep full-width programs
    elif variant == "token":
        splits = fewest_splits(num_experts)
    else:
        splits = fewest_splits(tokens)
    segment_sums = "reductions" if per_expert >= tiles["segment_block"] else "products"  # step 5
    regather = segment_sums == "reductions" and per_expert >= 2 * tiles["segment_block"]  # step 6
    return ExpertKernelConfig(
        variant=variant,
        d_block=d_block,
        score_splits=splits,
        segment_sums=segment_sums,
        segment_regather=regather,
        **tiles,
    )
