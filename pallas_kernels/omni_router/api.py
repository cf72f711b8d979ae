"""Public entry point of the Cartesian top-K router."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _dispatch
from pallas_kernels.omni_router.reference import omni_router_reference

SUPPORTED_IMPLEMENTATIONS = ("xla",)


def validate_router_inputs(log_probs_x, log_probs_y, top_k) -> None:
    """ValueError/TypeError naming the argument for anything the router cannot take."""
    for name, arr in (("log_probs_x", log_probs_x), ("log_probs_y", log_probs_y)):
        if arr.ndim != 2:
            raise ValueError(f"{name} must be [tokens, n], got shape {arr.shape}")
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise TypeError(f"{name} must be a float array, got dtype {arr.dtype}")
    if log_probs_x.shape != log_probs_y.shape:
        raise ValueError(
            f"log_probs_x and log_probs_y must have the same shape, got {log_probs_x.shape} and {log_probs_y.shape}"
        )
    n = log_probs_x.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be a Python int, got {top_k!r}")
    if not 1 <= top_k <= n * n:
        raise ValueError(f"top_k={top_k} must be in [1, n*n] = [1, {n * n}] for n={n}")


def omni_router(
    log_probs_x: jax.Array,
    log_probs_y: jax.Array,
    top_k: int,
    *,
    implementation: str = "auto",
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Exact top-K of the Cartesian product scores lp_x[i] + lp_y[j] over N = n*n experts.

    | argument | shape | dtype |
    | --- | --- | --- |
    | log_probs_x, log_probs_y | [T, n] | f32 or bf16 |
    | returns scores | [T, K] | f32, descending, ties by lowest expert index |
    | returns indices | [T, K] | int32, e = i * n + j |

    `implementation`: "auto" (Pallas on GPU, XLA elsewhere) or "xla". Differentiable with respect to
    both inputs: the cotangent of each score flows to lp_x[i] and lp_y[j] of its expert.
    """
    validate_router_inputs(log_probs_x, log_probs_y, top_k)
    impl = _dispatch.resolve_implementation(implementation, supported=SUPPORTED_IMPLEMENTATIONS)
    del impl, interpret  # "xla" is the only path so far
    return omni_router_reference(log_probs_x, log_probs_y, top_k)
