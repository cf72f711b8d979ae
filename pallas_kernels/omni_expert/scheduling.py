"""The expert-centric schedule: the T*K (token, expert) pairs sorted by expert.

Pair p = t * K + k stands for token t's k-th routed expert, e_p = indices[t, k]. Sorting the pairs by
expert (stably, so each expert's pairs list its tokens in increasing order) turns the scattered lookups
into runs ("segments"): all pairs of one expert are consecutive, so a program that walks a run of sorted
pairs meets each expert row once per run, and the backward forms d_up[e] and d_down[e] as segment sums.

One XLA sort of P (expert, pair) int32 pairs under jit, static shapes, no host round trip; on a GPU XLA
hands a sort this size to CUB's radix sort. Nothing else: the segment-sum kernel finds the segment
boundaries itself by comparing neighbouring experts, so no compaction of segment starts (v1 computed
one with jnp.nonzero, whose cumulative sum cost more on an H100 than the sort itself).

The inverse permutation is never materialised: values move between the two orders through `order`
itself (gathering a token-order value for sorted position q reads `order[q]`; scattering a sorted-order
result writes position `order[q]`), and since `order` is a permutation each destination is written once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["order", "sorted_expert"],
    meta_fields=["num_experts", "top_k"],
)
@dataclasses.dataclass(frozen=True)
class ExpertSchedule:
    """The (token, expert) pairs in expert order. P = T * K pairs.

    | field | shape | dtype | meaning |
    | --- | --- | --- | --- |
    | order | [P] | int32 | pair id p = t * K + k at sorted position q (a permutation of 0..P-1); token t = p // K |
    | sorted_expert | [P] | int32 | e at sorted position q: non-decreasing; a segment is a run of equal values |

    Static (pytree metadata): `num_experts` N and `top_k` K.
    """

    order: jax.Array
    sorted_expert: jax.Array
    num_experts: int
    top_k: int

    @property
    def num_pairs(self) -> int:
        return self.order.shape[0]

    @property
    def sorted_token(self) -> jax.Array:
        """[P] int32: token t at sorted position q (increasing within a segment)."""
        return self.order // self.top_k

    def to_sorted(self, values: jax.Array) -> jax.Array:
        """[T, K] (or [P]) values in pair order -> [P] in sorted order (a gather through `order`)."""
        return values.reshape(self.num_pairs)[self.order]

    def to_pairs(self, sorted_values: jax.Array) -> jax.Array:
        """[P] values in sorted order -> [T, K] in pair order (a scatter through `order`, each slot once)."""
        flat = jnp.zeros((self.num_pairs,), sorted_values.dtype).at[self.order].set(sorted_values, unique_indices=True)
        return flat.reshape(self.num_pairs // self.top_k, self.top_k)


def build_schedule(indices: jax.Array, num_experts: int) -> ExpertSchedule:
    """Sort the pairs of `indices` [T, K] (int, each in [0, num_experts)) by expert; see ExpertSchedule."""
    tokens, top_k = indices.shape
    num_pairs = tokens * top_k
    flat_expert = indices.reshape(num_pairs).astype(jnp.int32)  # [P], pair p = t * K + k
    pair_ids = lax.iota(jnp.int32, num_pairs)  # [P]
    # Stable, so equal experts keep pair order: segments list tokens increasingly (deterministic sums). The
    # sort returns the sorted keys too, so sorted_expert costs no gather.
    sorted_expert, order = lax.sort((flat_expert, pair_ids), num_keys=1, is_stable=True)  # [P], [P]
    return ExpertSchedule(order=order, sorted_expert=sorted_expert, num_experts=num_experts, top_k=top_k)
