"""The expert-centric schedule: the T*K (token, expert) pairs sorted by expert, with their segments.

Pair p = t * K + k stands for token t's k-th routed expert, e_p = indices[t, k]. Sorting the pairs by
expert (stably, so a segment lists its tokens in increasing order) turns the scattered lookups into runs:
all pairs of one expert are consecutive, so a program that walks a run of sorted pairs reads each expert
row once and reuses it, and the backward can form d_up[e] and d_down[e] as segment sums, each row written
by exactly one program (no atomics, a dense result).

Everything here is plain XLA under jit with static shapes: one argsort of P int32 keys and a compaction of
the segment starts, no host round trip. The number of distinct experts is data-dependent, so the segment
list is padded to its static bound min(N, P) with empty segments at the end.

The inverse permutation is never materialised: the kernels only move values between the two orders
through `order` itself (gathering a token-order value for sorted position q reads `order[q]`; scattering a
sorted-order result writes position `order[q]`), and since `order` is a permutation each destination is
written exactly once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["order", "sorted_expert", "sorted_token", "segment_bounds", "num_segments"],
    meta_fields=["num_experts", "top_k"],
)
@dataclasses.dataclass(frozen=True)
class ExpertSchedule:
    """The (token, expert) pairs in expert order. P = T * K pairs, S = min(N, P) segment slots.

    | field | shape | dtype | meaning |
    | --- | --- | --- | --- |
    | order | [P] | int32 | pair id p = t * K + k at sorted position q (a permutation of 0..P-1) |
    | sorted_expert | [P] | int32 | e at sorted position q: non-decreasing |
    | sorted_token | [P] | int32 | t at sorted position q (= order // K); increasing within a segment |
    | segment_bounds | [S + 1] | int32 | segment i is sorted positions [bounds[i], bounds[i+1]); padding: P, P |
    | num_segments | [] | int32 | distinct experts among the pairs; segments i >= num_segments are empty |

    Static (pytree metadata): `num_experts` N and `top_k` K.
    """

    order: jax.Array
    sorted_expert: jax.Array
    sorted_token: jax.Array
    segment_bounds: jax.Array
    num_segments: jax.Array
    num_experts: int
    top_k: int

    @property
    def num_pairs(self) -> int:
        return self.order.shape[0]

    @property
    def num_segment_slots(self) -> int:
        """S = min(N, P): the static bound on distinct experts, the segment-sum grid's first axis."""
        return self.segment_bounds.shape[0] - 1


def build_schedule(indices: jax.Array, num_experts: int) -> ExpertSchedule:
    """Sort the pairs of `indices` [T, K] (int, each in [0, num_experts)) by expert; see ExpertSchedule."""
    tokens, top_k = indices.shape
    num_pairs = tokens * top_k
    flat_expert = indices.reshape(num_pairs).astype(jnp.int32)  # [P], pair p = t * K + k
    # Stable, so equal experts keep pair order: segments list tokens increasingly (deterministic sums).
    order = jnp.argsort(flat_expert, stable=True).astype(jnp.int32)  # [P]
    sorted_expert = flat_expert[order]  # [P]
    sorted_token = order // top_k  # [P]
    is_start = jnp.concatenate([jnp.ones((1,), bool), sorted_expert[1:] != sorted_expert[:-1]])  # [P]
    slots = min(num_experts, num_pairs)
    # Positions where a new expert begins, compacted to the front; unused slots get P (empty segments).
    (starts,) = jnp.nonzero(is_start, size=slots, fill_value=num_pairs)  # [S]
    segment_bounds = jnp.concatenate([starts.astype(jnp.int32), jnp.full((1,), num_pairs, jnp.int32)])  # [S + 1]
    return ExpertSchedule(
        order=order,
        sorted_expert=sorted_expert,
        sorted_token=sorted_token,
        segment_bounds=segment_bounds,
        num_segments=jnp.sum(is_start, dtype=jnp.int32),
        num_experts=num_experts,
        top_k=top_k,
    )
