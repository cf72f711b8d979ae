"""Plain-jnp Cartesian top-K: the test oracle and the `implementation="xla"` path.

Expert e = i * n + j scores lp_x[i] + lp_y[j]. With each axis sorted descending (ties: lower index first),
write a candidate by its ranks (a, b) on the two axes. Every (a', b') with a' <= a and b' <= b scores at
least as much and, on a tie, has the lower expert index, so it precedes (a, b) in the final order: (a, b)
can be among the top K only if (a + 1)(b + 1) <= K. That leaves about K (ln K + 1) candidates per token
(the static rank pairs `dominance_candidates`) instead of n*n, so no [T, n, n] grid is formed (at T = 32768,
n = 256 it would be 8.6 GB of f32 per layer, more again inside `lax.top_k`).

Ties are broken by the lowest expert index: the candidates are sorted by (score descending, expert index
ascending), exactly the order of scoring all n*n experts (the tests' `omni_router_brute_force`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=64)
def dominance_candidates(top_k: int, k_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The rank pairs (a, b), a, b < k_axis, with (a + 1)(b + 1) <= top_k: two [C] int32 arrays."""
    ranks_a, ranks_b = [], []
    for a in range(k_axis):
        width = min(k_axis, top_k // (a + 1))
        if width == 0:
            break
        ranks_a.extend([a] * width)
        ranks_b.extend(range(width))
    return np.asarray(ranks_a, np.int32), np.asarray(ranks_b, np.int32)


def omni_router_reference(log_probs_x: jax.Array, log_probs_y: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Top-K experts by lp_x[i] + lp_y[j].

    Args:
      log_probs_x: [T, n] per-axis log-probabilities (bf16/f32 computed in f32, f64 in f64).
      log_probs_y: [T, n].
      top_k: K, 1 <= K <= n*n.

    Returns:
      scores: [T, K] f32 (f64 for f64 inputs), descending; ties ordered by expert index.
      indices: [T, K] int32, e = i * n + j.
    """
    n = log_probs_x.shape[-1]
    k_axis = min(top_k, n)  # a row ranked k' or lower on its axis is beaten by k' >= K rows of its column
    acc = jnp.promote_types(log_probs_x.dtype, jnp.float32)  # f32, or f64 for f64 inputs
    # lax.top_k orders equal values by lower index first: the rank order the pruning argument needs.
    vals_x, idx_x = jax.lax.top_k(log_probs_x.astype(acc), k_axis)  # [T, k'] descending
    vals_y, idx_y = jax.lax.top_k(log_probs_y.astype(acc), k_axis)  # [T, k'] descending
    ranks_a, ranks_b = dominance_candidates(top_k, k_axis)  # [C] each
    scores = vals_x[:, ranks_a] + vals_y[:, ranks_b]  # [T, C]
    experts = idx_x[:, ranks_a].astype(jnp.int32) * n + idx_y[:, ranks_b].astype(jnp.int32)  # [T, C]
    # One sort by (score descending, expert ascending); negation is exact, so -(-s) is s bit for bit.
    neg_scores, experts = jax.lax.sort((-scores, experts), dimension=-1, num_keys=2)  # [T, C] each
    return -neg_scores[:, :top_k], experts[:, :top_k]
