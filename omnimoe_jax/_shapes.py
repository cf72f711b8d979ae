"""The one reshape every FFN does: any leading dims in, tokens [T, d] inside."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def flatten_tokens(x: jax.Array, hidden_size: int, dtype: Any) -> jax.Array:
    """x [..., d] -> tokens [T, d] in `dtype` (T = product of the leading dims, 1 for a single vector).

    ValueError naming x's shape when the last dim is not `hidden_size`; TypeError for a complex x, whose
    imaginary part the cast would silently drop.
    """
    if x.ndim < 1 or x.shape[-1] != hidden_size:
        raise ValueError(f"x must be [..., hidden_size={hidden_size}], got shape {x.shape}")
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(
            f"x has dtype {x.dtype}: a real input is expected (casting to {jnp.dtype(dtype).name} "
            "would drop its imaginary part)"
        )
    return x.astype(dtype).reshape(-1, hidden_size)  # [T, d]
