"""What the router kernels (kernel.py) settle on the host before a launch: the sizes they take, the static
tables of step 2's candidate pairs and step 3's bound, and the tiling (`RouterConfig`, `default_config`).

Everything here is plain Python and numpy over (T, n, K); `kernel.py`'s module docstring explains the
algorithm the tables serve.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from pallas_kernels._checks import is_int, is_power_of_two

MAX_AXIS_SIZE = 4096  # n: the [block_tokens, n] row tile must stay in registers
# K: a token's candidate slots (fewer than K (ln K + 1)) live in the registers of one program: 16,384 at
# K = 2048 (n <= 320) and K = 4096 (n = 256), 32,768 at K = 4096 for n = 320 (see `default_config`).
MAX_TOP_K = 4096
# Step 1 sorts each axis exactly only over its top h entries (an h^2 rank count) and puts the rest in octave
# buckets by rank (`rank_floors`); `head_ranks` picks h among these, one with h^2 >= K (`bound_table`), which
# the largest provides for every K <= MAX_TOP_K.
HEAD_SIZES = (32, 64, 128)
assert HEAD_SIZES[-1] ** 2 >= MAX_TOP_K
AXIS_SORTS = ("threshold", "select")  # see RouterConfig.axis_sort
BACKWARDS = ("onehot", "factored")  # see RouterConfig.backward
# "factored" splits an axis position p < n_pad as p = hi * FACTOR_LO + lo: a [n_pad / FACTOR_LO, FACTOR_LO]
# block per token, both sides >= 16 (the smallest Triton dot), so it needs n_pad >= FACTOR_LO ** 2.
FACTOR_LO = 16
MIN_FACTORED_AXIS = FACTOR_LO * FACTOR_LO


def next_power_of_2(x: int) -> int:
    """Smallest power of two >= x (x >= 1)."""
    return 1 << (x - 1).bit_length()


def _floors(k_axis: int, head: int) -> np.ndarray:
    floors = np.arange(k_axis, dtype=np.int32)
    start = head
    while start < k_axis:
        floors[start : 2 * start] = start
        start *= 2
    return floors


def _region_size(floors: np.ndarray, top_k: int) -> int:
    return int(np.count_nonzero((floors[:, None] + 1) * (floors[None, :] + 1) <= top_k))


@functools.cache
def head_ranks(n: int, top_k: int) -> int:
    """h: how many of an axis's top entries step 1 orders exactly (min(k', h) of them; see `rank_floors`).

    k' itself (an exact order) up to the largest of `HEAD_SIZES`, where a k'^2 rank count is short next to
    the bucketing's bisection; above, the smallest of `HEAD_SIZES` whose candidate region still fits the
    power-of-two slot count of the exact region (a smaller head is a cheaper rank count but a coarser
    order, hence more candidates), among those with h^2 >= K: step 3's lower bound needs a pair of exact
    head ranks (a, b) with (a+1)(b+1) >= K (`bound_table`), which rules out h = 32 for K > 1024.
    """
    k_axis = min(top_k, n)
    if k_axis <= HEAD_SIZES[-1]:
        return k_axis
    heads = [head for head in HEAD_SIZES if head * head >= top_k]
    exact_slots = next_power_of_2(_region_size(np.arange(k_axis), top_k))
    for head in heads:
        if next_power_of_2(_region_size(_floors(k_axis, head), top_k)) <= exact_slots:
            return head
    return heads[-1]


def rank_floors(n: int, top_k: int) -> np.ndarray:
    """[k'] int32: a lower bound on the rank of the entry step 1 puts at each position of its axis order.

    Step 1 orders each axis only partly: the first h = `head_ranks` positions hold the top entries exactly
    by rank, the rest come in buckets of ranks [h, 2h), [2h, 4h), ... (the last one cut at k'), each bucket
    in column order. An entry in bucket [r, 2r) has rank >= r, so its floor is r; in the head the floor is
    the rank itself.
    """
    return _floors(min(top_k, n), head_ranks(n, top_k))


def candidate_table(n: int, top_k: int) -> np.ndarray:
    """[2, slots] int32: the position pairs (a, b), a, b < k' = min(K, n), that step 2 must score.

    With f(p) = `rank_floors` of position p, the entry pair at positions (a, b) is beaten by at least
    (f(a)+1)(f(b)+1) - 1 others (every pair of entries ranked no lower on both axes), so only pairs with
    (f(a)+1)(f(b)+1) <= K can be in the top K (for an exact order, f(p) = p: the region (a+1)(b+1) <= K).
    Row 0 holds a, row 1 holds b; `slots` is the pair count rounded up to a power of two and the padding
    holds -1. The pairs are listed row by row: the order of the kernels' output where the final sort by
    score is skipped ("slot order", kernel.py step 4). The kernels take the two rows as two [slots] inputs.
    """
    floors = rank_floors(n, top_k) + 1  # [k']
    rows, cols = np.nonzero(floors[:, None] * floors[None, :] <= top_k)  # row-major: a, then b
    table = np.full((2, next_power_of_2(len(rows))), -1, np.int32)
    table[0, : len(rows)], table[1, : len(rows)] = rows, cols
    return table


def bound_table(n: int, top_k: int) -> np.ndarray:
    """[2, pairs] int32: head position pairs (a, b) with (a+1)(b+1) >= K, the smallest b for each a.

    Positions below min(h, k') (h = `head_ranks`) are exact ranks, so each such pair scores no more than
    the (a+1)(b+1) >= K pairs ranked no lower on both axes: its score is a lower bound on the K-th largest,
    where step 3's bisection can start. Padded with -1 to a power of two like `candidate_table`. One such
    pair always exists: the head is K wide when K <= n, n wide when n^2 >= K > n and n <= h, and h^2 >= K
    otherwise (`head_ranks`).
    """
    head = min(head_ranks(n, top_k), top_k, n)
    pairs = [(a, -(-top_k // (a + 1)) - 1) for a in range(head)]
    pairs = [(a, b) for a, b in pairs if b < head]
    assert pairs, (n, top_k)
    table = np.full((2, next_power_of_2(len(pairs))), -1, np.int32)
    table[:, : len(pairs)] = np.asarray(pairs, np.int32).T
    return table


# Step 3 compacts its candidates only where a token has at least this many slots: below, a count pass is a
# few registers per thread, short next to the compaction's prefix count, stores, barrier and loads.
MIN_COMPACTED_SLOTS = 1024


@functools.cache
def compacted_slots(n: int, top_k: int) -> int:
    """B: the width of step 3's compacted candidate array, or the slot count itself where it does not compact.

    Step 3 bisects for the K-th largest candidate key between a lower bound lo and the top; every pass
    counts the candidates >= mid, and only those >= lo can ever count. Once each token of a tile has at
    most B of them, they move (in slot order, by a prefix count) to a [block_tokens, B] array, and the
    remaining passes, the ties and the output run over that. No static bound on that count is below the
    slot count: with Zipf-like axes (log-probs -log(rank)) nearly the whole exact region (a+1)(b+1) < K
    lies above `bound_table`'s floor, and with equal scores every candidate ties at it. So the kernel
    checks at run time: a token above B keeps bisecting over all its slots (each success lowers its
    count towards K) until it fits, and a tile where one still does not fit when its K-th score is found
    (ties at it beyond B) finishes over all slots. B is the smallest power of two >= 1.5 K: a few
    halvings bring the count from the floor's to within that of K. The slot count (no compaction) where that
    is not at most half the slots, or the slots are fewer than `MIN_COMPACTED_SLOTS`.
    """
    slots = candidate_table(n, top_k).shape[1]
    size = next_power_of_2(-(-3 * top_k // 2))
    return size if slots >= MIN_COMPACTED_SLOTS and 2 * size <= slots else slots


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """How the router kernels tile the work. `default_config` picks one from (T, n, K).

    Attributes:
      block_tokens: tokens per program (a power of two, at most 64), forward and backward.
      num_warps: warps per program (a power of two, at most 16).
      num_stages: Triton software-pipelining depth (the kernels have no pipelined load loops: 1 suffices).
      backward_block_k: how many of the K routed experts the backward one-hot sums take at once (a power
        of two): its temporary is [block_tokens, backward_block_k, n padded] elements.
      axis_sort: how step 1 finds each axis's sorted top k': "threshold" (bisection for the k'-th largest,
        then a rank count among the k': ~bits + k'^2/n passes over the row's work) or "select" (k' argmax
        passes over the row). `router_merge` does not use it.
      backward: how the backward sums each token's K score cotangents into its two [n] axis rows.
        "onehot" (the default): compare-selects of every chunk of the K against all n_pad positions,
        `block_tokens` tokens per program, K x n_pad per token and axis. "factored": one token per program;
        each position p = hi * 16 + lo, and the token's row, as an [n_pad / 16, 16] block, is a tensor-core
        product onehot_hi^T @ onehot_lo of each chunk of the K (with the cotangents split into two bf16
        parts: about 2^-16 relative error per cotangent where "onehot" sums in f32; a non-finite cotangent
        makes NaN of its whole block row of 16 positions, where "onehot" touches one position):
        K x (n_pad / 16 + 16) compares plus two small products per token and axis
        (8x fewer compares at n = 256). It ignores `block_tokens` and `backward_block_k` (its chunk of K
        fills the same register budget with its [n_pad / 16, chunk] temporary). Where n_pad < 256 (no
        factorisation with both sides >= 16) "factored" runs "onehot". `default_config` picks "factored"
        wherever it applies: it was the faster backward at every shape measured (benchmarks/NOTES.md).
      backward_num_warps: warps per program of the backward kernel (a power of two, at most 16), whichever
        backward runs: its one-hot sums and small products do not gain from the forward's wide programs (at
        K = 1280 either backward ran faster at 4 warps than at the forward's 16; benchmarks/NOTES.md). The
        "factored" chunk of K fills this many warps' register budget; "onehot"'s `backward_block_k` is sized
        by `default_config` for the forward's `num_warps`, not these.
      compact_merge: whether step 3 moves each tile's candidates above its lower bound to a narrower array
        (`compacted_slots`) for its remaining passes once they fit; False keeps every pass over all slots
        (the same result: there to measure what the compaction saves).
    """

    block_tokens: int
    num_warps: int
    num_stages: int = 1
    backward_block_k: int = 1
    axis_sort: str = "threshold"
    backward: str = "onehot"
    backward_num_warps: int = 4
    compact_merge: bool = True

    def __post_init__(self):
        checks = (
            ("block_tokens", self.block_tokens, 64),
            ("num_warps", self.num_warps, 16),
            ("backward_num_warps", self.backward_num_warps, 16),
            ("backward_block_k", self.backward_block_k, MAX_TOP_K),
        )
        for field, value, largest in checks:
            if not is_power_of_two(value):
                raise ValueError(f"RouterConfig.{field}={value!r} must be a power-of-two int")
            if value > largest:
                raise ValueError(f"RouterConfig.{field}={value} must be <= {largest}")
        if not is_int(self.num_stages) or self.num_stages < 1:
            raise ValueError(f"RouterConfig.num_stages={self.num_stages!r} must be a positive int")
        if self.axis_sort not in AXIS_SORTS:
            raise ValueError(f"RouterConfig.axis_sort={self.axis_sort!r} must be one of {AXIS_SORTS}")
        if self.backward not in BACKWARDS:
            raise ValueError(f"RouterConfig.backward={self.backward!r} must be one of {BACKWARDS}")
        if not isinstance(self.compact_merge, bool):
            raise ValueError(f"RouterConfig.compact_merge={self.compact_merge!r} must be a bool")


# Register budget of the heuristic: elements of one working array per warp (16 per thread).
ELEMENTS_PER_WARP = 512
# Aim for at least this many programs (two waves on a 132-SM H100) before packing more tokens per program.
MIN_PROGRAMS = 264


def default_config(tokens: int, n: int, top_k: int) -> RouterConfig:
    """A tiling for T tokens, n experts per axis and K experts per token.

    A token's widest working array is the padded row of the sorting passes or the candidate slots of the
    merge (keys and expert ids). Warps grow with it (4 up to 2048 elements, at most 16) so that no array
    needs more than ~16 registers per thread; tokens are then packed per program up to that budget, but
    never so many that fewer than `MIN_PROGRAMS` programs remain. The "onehot" backward's chunk of K fills the
    same budget (the forward's warps', although the backward runs at `backward_num_warps`) with its
    [block_tokens, chunk, n padded] one-hot temporary. The backward is "factored" where
    n padded >= `MIN_FACTORED_AXIS` (where it applies), "onehot" below.

    Past 8,192 slots (K > 1024 for most n) one token per program at 16 warps is all there is: each slot
    array then takes slots / 512 registers per thread (32 at 16,384 slots, the keys and expert ids together
    half the 128 a thread has at 16 warps), and the compiler spills what does not fit (64 at 32,768 slots).
    """
    n_pad = next_power_of_2(n)
    per_token = max(n_pad, candidate_table(n, top_k).shape[1])
    num_warps = min(16, max(4, per_token // ELEMENTS_PER_WARP))
    budget = ELEMENTS_PER_WARP * num_warps
    block_tokens = max(1, min(16, budget // per_token))
    while block_tokens > 1 and -(-tokens // block_tokens) < MIN_PROGRAMS:
        block_tokens //= 2
    backward_block_k = max(1, min(next_power_of_2(top_k), budget // (block_tokens * n_pad)))
    backward = "factored" if n_pad >= MIN_FACTORED_AXIS else "onehot"
    return RouterConfig(
        block_tokens=block_tokens,
        num_warps=num_warps,
        num_stages=1,
        backward_block_k=backward_block_k,
        backward=backward,
    )
