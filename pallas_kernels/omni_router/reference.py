"""Plain-jnp Cartesian top-K: the test oracle and the `implementation="xla"` path.

Expert e = i * n + j scores lp_x[i] + lp_y[j]. The top K of the n*n scores only ever uses the top
k' = min(K, n) entries of each axis: a row ranked k' or lower on its axis is beaten by k' >= K rows of the
same column. So the reference forms the k' x k' grid of candidate sums instead of all n*n; when K >= n
that grid is the whole n x n one ([T, n, n] f32: 1.7 GB at T = 4096, n = 320), which the kernels avoid.

Ties are broken by the lowest expert index. `lax.top_k` puts the lower position first among equal values;
sorting each axis's k' chosen indices ascending makes the flattened grid position increase with the
expert index, so the same rule holds for the final pick.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _top_indices_ascending(log_probs: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Indices of the top k entries per row, sorted by index ([T, k] int32), and their values ([T, k])."""
    _, idx = jax.lax.top_k(log_probs, k)  # [T, k]
    idx = jnp.sort(idx, axis=-1)  # [T, k]
    return jnp.take_along_axis(log_probs, idx, axis=-1), idx


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
    k_axis = min(top_k, n)
    acc = jnp.promote_types(log_probs_x.dtype, jnp.float32)  # f32, or f64 for f64 inputs
    vals_x, idx_x = _top_indices_ascending(log_probs_x.astype(acc), k_axis)  # [T, k']
    vals_y, idx_y = _top_indices_ascending(log_probs_y.astype(acc), k_axis)  # [T, k']
    grid = vals_x[:, :, None] + vals_y[:, None, :]  # [T, k', k']
    # [T, k'*k'] spelled out: reshape(T, -1) cannot infer the size when T = 0
    scores, pos = jax.lax.top_k(grid.reshape(grid.shape[0], k_axis * k_axis), top_k)  # [T, K]
    rows = jnp.take_along_axis(idx_x, pos // k_axis, axis=-1)  # [T, K]
    cols = jnp.take_along_axis(idx_y, pos % k_axis, axis=-1)  # [T, K]
    return scores, (rows * n + cols).astype(jnp.int32)


def omni_router_brute_force(log_probs_x: jax.Array, log_probs_y: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Scores all n*n experts and takes the top K (lowest index first on ties). O(n^2): tests only."""
    n = log_probs_x.shape[-1]
    acc = jnp.promote_types(log_probs_x.dtype, jnp.float32)
    full = log_probs_x.astype(acc)[:, :, None] + log_probs_y.astype(acc)[:, None, :]  # [T, n, n]
    scores, idx = jax.lax.top_k(full.reshape(full.shape[0], n * n), top_k)  # [T, K]
    return scores, idx.astype(jnp.int32)
