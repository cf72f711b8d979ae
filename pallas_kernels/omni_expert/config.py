"""Tile sizes, warps and the forward variant of the atomic-expert kernels, with the default heuristic.

The kernels (kernel.py) are three passes over the T*K (token, expert) pairs, each memory-bound:

  score pass     s_p = a[i_p] . b[j_p]                 program = a block of `pair_block` pairs
  combine pass   out[t] = sum_k c[t, k] table[e_tk]    program = `token_block` tokens x `d_block` columns
  segment pass   out[e] = sum_{p in seg(e)} c_p rows[t_p]  program = one expert's segment x `d_block` columns

Every pass gathers one side's rows per pair and reuses the other (a token row across its K pairs, or an
expert row across its sorted segment). What decides the speed is where the gathered rows come from: L2
(fast) or HBM. All three grids put the column slice on their slow (second) axis, so the programs running
at any moment share one slice of the gathered table, and a slice of N * d_block elements can sit in L2
even when the whole table cannot. The score pass needs a full-width dot, so it cuts the columns into
`score_splits` slices on its grid and sums the partial dots afterwards.

Default heuristic (`default_config`), a hypothesis to be settled by benchmarks/experts.py on the GPU:
  1. d_block: the widest power of two dividing d, at most 256 bytes of a row (128 bf16 / 64 f32 columns).
  2. If the expert rows are reused (T*K/N >= 2), shrink d_block (down to 32 columns) until one column
     slice of a table, N * d_block * itemsize, fits `L2_BUDGET_BYTES`.
  3. variant "token" (walk pairs in token order: no sort in the forward, x rows reused across the K
     pairs, table rows gathered) with `score_splits` the fewest slices whose table slice fits the budget.
     When even the thinnest slice does not fit and rows are reused, "sorted" (walk pairs in expert order:
     each table row read once per segment, the token rows gathered instead; x is small, so it stays in L2).
  Without reuse (T*K/N < 2) every touched row is read about once whatever the order: "token", one slice.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

# Half of an H100's 50 MB L2: the gathered slice must share the cache with the reused rows and outputs.
L2_BUDGET_BYTES = 24 * 2**20
# Widest row chunk a program gathers per step: two 128-byte lines.
MAX_CHUNK_BYTES = 256
# Narrowest chunk the L2 rule may shrink to (64 bytes in bf16: still whole 32-byte sectors).
MIN_CHUNK_COLUMNS = 32
# Rows are "reused" when each touched expert serves at least this many pairs on average.
REUSE_THRESHOLD = 2.0

VARIANTS = ("token", "sorted")


def _is_power_of_two(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1 and value & (value - 1) == 0


@dataclasses.dataclass(frozen=True)
class ExpertKernelConfig:
    """Static tuning of the expert kernels. Every block size is a power of two (a Triton requirement).

    Attributes:
      variant: order of the pairs in the score passes (s forward, dh backward): "token" (no sort needed)
        or "sorted" (expert order from the schedule).
      d_block: columns per program (combine, segment passes) and per loop step (score pass); divides d.
      score_splits: column slices of the score pass on its grid; divides d // d_block.
      pair_block: pairs per score-pass program.
      token_block: tokens per combine-pass program.
      segment_block: sorted pairs per loop step of a segment-pass program.
      num_warps, num_stages: Triton launch parameters, shared by the three passes.
    """

    variant: str = "token"
    d_block: int = 128
    score_splits: int = 1
    pair_block: int = 32
    token_block: int = 32
    segment_block: int = 32
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r} must be one of {VARIANTS}")
        for name in ("d_block", "score_splits", "pair_block", "token_block", "segment_block", "num_warps"):
            value = getattr(self, name)
            if not _is_power_of_two(value):
                raise ValueError(f"{name}={value!r} must be a power of two (Triton blocks are)")
        if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages!r} must be a positive int")

    def check_width(self, d: int) -> None:
        """ValueError unless this config tiles a row of width d."""
        if d % self.d_block:
            raise ValueError(f"config.d_block={self.d_block} must divide d={d}")
        if (d // self.d_block) % self.score_splits:
            raise ValueError(
                f"config.score_splits={self.score_splits} must divide d // d_block = {d // self.d_block} (d={d})"
            )


def _widest_power_of_two_dividing(d: int, cap: int) -> int:
    block = 1
    while block * 2 <= cap and d % (block * 2) == 0:
        block *= 2
    return block


def default_config(tokens: int, top_k: int, num_experts: int, d: int, dtype) -> ExpertKernelConfig:
    """The heuristic config for x [tokens, d], tables [num_experts, d] of `dtype`, K = top_k (see module doc)."""
    itemsize = jnp.dtype(dtype).itemsize
    d_block = _widest_power_of_two_dividing(d, MAX_CHUNK_BYTES // itemsize)
    reused = tokens * top_k >= REUSE_THRESHOLD * num_experts
    if not reused:
        return ExpertKernelConfig(variant="token", d_block=d_block, score_splits=1)
    while d_block > MIN_CHUNK_COLUMNS and num_experts * d_block * itemsize > L2_BUDGET_BYTES:
        d_block //= 2
    chunks = d // d_block
    splits = 1
    while chunks % (splits * 2) == 0 and num_experts * (d // splits) * itemsize > L2_BUDGET_BYTES:
        splits *= 2
    if num_experts * (d // splits) * itemsize <= L2_BUDGET_BYTES:
        return ExpertKernelConfig(variant="token", d_block=d_block, score_splits=splits)
    # The table does not fit L2 even one chunk wide: stream it once in expert order, gather x (small) instead.
    splits = 1
    while chunks % (splits * 2) == 0 and tokens * (d // splits) * itemsize > L2_BUDGET_BYTES:
        splits *= 2
    return ExpertKernelConfig(variant="sorted", d_block=d_block, score_splits=splits)
