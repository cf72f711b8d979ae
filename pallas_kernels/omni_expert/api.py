"""Public entry point of the atomic-expert computation (dynamic expert assembly)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _dispatch
from pallas_kernels.activations import get_activation
from pallas_kernels.omni_expert.reference import omni_expert_reference

SUPPORTED_IMPLEMENTATIONS = ("xla",)


def validate_expert_inputs(x, up, down, weights, indices, activation) -> None:
    """ValueError/TypeError naming the argument for anything the expert op cannot take."""
    get_activation(activation)
    if x.ndim != 2:
        raise ValueError(f"x must be [tokens, d], got shape {x.shape}")
    tokens, d = x.shape
    for name, table in (("up", up), ("down", down)):
        if table.ndim != 2 or table.shape[1] != d:
            raise ValueError(f"{name} must be [num_experts, d={d}], got shape {table.shape}")
    if up.shape != down.shape:
        raise ValueError(f"up and down must have the same shape, got {up.shape} and {down.shape}")
    if indices.ndim != 2 or indices.shape[0] != tokens:
        raise ValueError(f"indices must be [tokens={tokens}, K], got shape {indices.shape}")
    if weights.shape != indices.shape:
        raise ValueError(f"weights must have the shape of indices {indices.shape}, got {weights.shape}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(f"indices must be an integer array, got dtype {indices.dtype}")
    for name, arr in (("x", x), ("up", up), ("down", down), ("weights", weights)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise TypeError(f"{name} must be a float array, got dtype {arr.dtype}")


def omni_expert(
    x: jax.Array,
    up: jax.Array,
    down: jax.Array,
    weights: jax.Array,
    indices: jax.Array,
    *,
    activation: str = "silu",
    implementation: str = "auto",
    interpret: bool | None = None,
) -> jax.Array:
    """y[t] = sum_k weights[t,k] * act(up[e] . x[t]) * down[e], e = indices[t,k].

    | argument | shape | dtype |
    | --- | --- | --- |
    | x | [T, d] | f32 or bf16 |
    | up, down | [N, d] | f32 or bf16 |
    | weights | [T, K] | float (used in f32) |
    | indices | [T, K] | int32, each in [0, N) |
    | returns y | [T, d] | x.dtype |

    `implementation`: "auto" (Pallas on GPU, XLA elsewhere) or "xla". Differentiable with respect to x,
    up, down and weights.
    """
    validate_expert_inputs(x, up, down, weights, indices, activation)
    impl = _dispatch.resolve_implementation(implementation, supported=SUPPORTED_IMPLEMENTATIONS)
    del impl, interpret  # "xla" is the only path so far
    return omni_expert_reference(x, up, down, weights, indices, activation=activation)
