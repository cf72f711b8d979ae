"""Public entry point of the weighted bag of rows, on the atomic-expert op's kernels.

The "pallas" implementation, with pairs p = (t, k), e = indices[t, k]:

  forward   y[t] = sum_k w[t, k] table[e]                 token_combine (no sort)
  backward  d_table[e] = sum_{p in seg(e)} w_p dy[t_p]    segment_sum over the expert-sorted schedule, which
            d_w[t, k] = table[e] . dy[t]                  also forms these dots from the same gathered dy rows

One gathered pass each way: nothing of size [T, K, d] is ever stored, where the reference (and XLA's own
lowering of a gather followed by a sum, measured on an H100) writes all of it: 20 GiB for PKM at the
paper's setting (T = 4096, K = 2500, d = 1024, bf16).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _dispatch
from pallas_kernels._checks import check_concrete_indices, check_float_arrays, check_integer_array, check_kernel_dtype
from pallas_kernels.embedding_bag.reference import embedding_bag_reference
from pallas_kernels.omni_expert import kernel
from pallas_kernels.omni_expert.config import ExpertKernelConfig, check_kernel_limits, default_config
from pallas_kernels.omni_expert.scheduling import build_schedule

SUPPORTED_IMPLEMENTATIONS = ("xla", "pallas")


def validate_inputs(table, weights, indices) -> None:
    """ValueError/TypeError naming the argument for anything the op cannot take."""
    if table.ndim != 2:
        raise ValueError(f"table must be [N, d], got shape {table.shape}")
    if indices.ndim != 2:
        raise ValueError(f"indices must be [tokens, K], got shape {indices.shape}")
    if weights.shape != indices.shape:
        raise ValueError(f"weights must have the shape of indices {indices.shape}, got {weights.shape}")
    check_integer_array("indices", indices)
    check_float_arrays(table=table, weights=weights)
    check_concrete_indices(indices, table.shape[0])


def validate_kernel_inputs(table, indices, config) -> None:
    """What the kernels need beyond the op's own contract (the "xla" path takes any of these)."""
    check_kernel_dtype("table", table)
    check_kernel_limits("table", table.shape[1], indices, table.shape[0], "rows", config)


def embedding_bag(
    table: jax.Array,
    weights: jax.Array,
    indices: jax.Array,
    *,
    implementation: str = "auto",
    interpret: bool | None = None,
    config: ExpertKernelConfig | None = None,
) -> jax.Array:
    """y[t] = sum_k weights[t, k] * table[indices[t, k]], summed in f32 (torch's EmbeddingBag with
    mode="sum" and per-sample weights).

    | argument | shape | dtype |
    | --- | --- | --- |
    | table | [N, d] | f32 or bf16 (any float for "xla") |
    | weights | [T, K] | float (used in f32) |
    | indices | [T, K] | int, each in [0, N) |
    | returns y | [T, d] | table.dtype |

    Indices out of [0, N) raise ValueError when they are concrete; under jit nothing can check them and the
    kernels would read outside the table.

    `implementation`: "auto" (the kernels on a GPU where they apply, XLA elsewhere and for inputs they do
    not take), "xla" (`embedding_bag_reference`) or "pallas" (the kernels: d a multiple of 16 up to 8192,
    f32 or bf16; anything else raises). `interpret`: Pallas interpret mode (None: only off a GPU).
    `config`: tile sizes (None: omni_expert's heuristic). Differentiable with respect to table and weights;
    the table's gradient is dense [N, d] with exact zeros in rows no index chose.
    """
    validate_inputs(table, weights, indices)
    impl = _dispatch.choose_implementation(
        "pallas" if config is not None else implementation,  # a config asks for the kernels by name
        supported=SUPPORTED_IMPLEMENTATIONS,
        check_kernel_inputs=lambda _: validate_kernel_inputs(table, indices, config),
    )
    if impl == "xla":
        return embedding_bag_reference(table, weights, indices)
    interpret = _dispatch.resolve_interpret(interpret)
    if config is None:
        tokens, top_k = indices.shape
        config = default_config(tokens, top_k, table.shape[0], table.shape[1], table.dtype, variant="token")
    return _embedding_bag_pallas(table, weights, indices.astype(jnp.int32), config, interpret)


def _forward(table, weights, indices, config, interpret):
    w = weights.astype(jnp.float32)  # [T, K]
    y = kernel.token_combine(w, indices, table, out_dtype=table.dtype, config=config, interpret=interpret)
    return y, (table, weights, indices)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _embedding_bag_pallas(table, weights, indices, config, interpret):
    y, _ = _forward(table, weights, indices, config, interpret)
    return y


def _backward(config, interpret, residuals, dy):
    table, weights, indices = residuals
    schedule = build_schedule(indices, table.shape[0])
    d_table, dots_sorted = kernel.segment_sum(
        schedule.to_sorted(weights.astype(jnp.float32)),  # [P] in sorted order
        dy.astype(table.dtype),
        schedule.sorted_expert,
        schedule.order,
        out_like=table,
        top_k=schedule.top_k,
        dot_table=table,  # d_w = table[e] . dy[t] from the same gathered dy rows
        config=config,
        interpret=interpret,
    )
    d_weights = schedule.to_pairs(dots_sorted).astype(weights.dtype)  # [T, K]
    return d_table, d_weights, None  # indices are integers: no cotangent


_embedding_bag_pallas.defvjp(_forward, _backward)
