"""Plain-jnp atomic-expert computation: the test oracle and the `implementation="xla"` path.

    y[t] = sum_k weights[t, k] * act(up[e] . x[t]) * down[e],   e = indices[t, k]

It gathers the K rows of both tables for every token, materialising [T, K, d] twice: simple and obviously
right, and exactly the memory traffic the Pallas kernels avoid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.activations import get_activation


def omni_expert_reference(
    x: jax.Array,
    up: jax.Array,
    down: jax.Array,
    weights: jax.Array,
    indices: jax.Array,
    *,
    activation: str = "silu",
) -> jax.Array:
    """y: [T, d] in x.dtype; dots accumulate in f32 (f64 for f64 inputs), as does the gate act(s) * w."""
    act = get_activation(activation)
    acc = jnp.promote_types(x.dtype, jnp.float32)  # f32 accumulation (f64 for f64 inputs)
    up_rows = jnp.take(up, indices, axis=0)  # [T, K, d]
    down_rows = jnp.take(down, indices, axis=0)  # [T, K, d]
    s = jnp.einsum("tkd,td->tk", up_rows, x.astype(up.dtype), preferred_element_type=acc)  # [T, K]
    h = act.forward(s) * weights.astype(acc)  # [T, K]
    y = jnp.einsum("tk,tkd->td", h.astype(down.dtype), down_rows, preferred_element_type=acc)  # [T, d]
    return y.astype(x.dtype)
