"""Plain-jnp row dots: the test oracle and the `implementation="xla"` path.

    s[t, k] = table[indices[t, k]] . x[t]

It gathers the K rows of every token ([T, K, d], materialised by XLA), then dots them in f32: simple and
obviously right, and the memory the kernel path avoids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_dots_reference(table: jax.Array, x: jax.Array, indices: jax.Array) -> jax.Array:
    """s: [T, K] in f32 (f64 for f64 inputs), the dots accumulated in that precision."""
    acc = jnp.promote_types(jnp.promote_types(table.dtype, x.dtype), jnp.float32)
    rows = jnp.take(table, indices, axis=0)  # [T, K, d]
    return jnp.einsum("tkd,td->tk", rows.astype(acc), x.astype(acc), preferred_element_type=acc)  # [T, K]
