"""Plain-jnp weighted bag of rows: the test oracle and the `implementation="xla"` path.

    y[t] = sum_k weights[t, k] * table[indices[t, k]]

It gathers the K rows of every token ([T, K, d], materialised by XLA on CPU and GPU alike), then sums them
in f32: simple and obviously right, and the memory the kernel path avoids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def embedding_bag_reference(table: jax.Array, weights: jax.Array, indices: jax.Array) -> jax.Array:
    """y: [T, d] in table.dtype, summed in f32 (f64 for f64 tables)."""
    acc = jnp.promote_types(table.dtype, jnp.float32)
    rows = jnp.take(table, indices, axis=0).astype(acc)  # [T, K, d]
    return jnp.sum(weights.astype(acc)[..., None] * rows, axis=1).astype(table.dtype)  # [T, d]
