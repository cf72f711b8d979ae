"""Public entry point of the row dots, on the atomic-expert op's kernels.

The "pallas" implementation, with pairs p = (t, k), e = indices[t, k], and s, ds [T, K] f32:

  forward   s = table[e] . x[t]                            pair_dots, in token order (no sort)
  backward  dx[t] = sum_k ds * table[e]                    token_combine
            d_table[e] = sum_{p in seg(e)} ds_p x[t_p]     segment_sum over the expert-sorted schedule

These are the score pass of `omni_expert` and its two table-side backward passes, without the activation
and the combine: what each device runs on its column slice when the expert tables are sharded on the hidden
dimension (`omnimoe_jax.parallel`), whose partial dots are summed across devices before the activation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _dispatch
from pallas_kernels._checks import check_concrete_indices, check_float_arrays, check_integer_array, check_kernel_dtype
from pallas_kernels.omni_expert import kernel
from pallas_kernels.omni_expert.config import ExpertKernelConfig, check_kernel_limits, default_config
from pallas_kernels.omni_expert.scheduling import build_schedule
from pallas_kernels.row_dots.reference import row_dots_reference

SUPPORTED_IMPLEMENTATIONS = ("xla", "pallas")


def validate_inputs(table, x, indices) -> None:
    """ValueError/TypeError naming the argument for anything the op cannot take."""
    if table.ndim != 2:
        raise ValueError(f"table must be [N, d], got shape {table.shape}")
    if x.ndim != 2 or x.shape[1] != table.shape[1]:
        raise ValueError(f"x must be [tokens, d={table.shape[1]}], got shape {x.shape}")
    if indices.ndim != 2 or indices.shape[0] != x.shape[0]:
        raise ValueError(f"indices must be [tokens={x.shape[0]}, K], got shape {indices.shape}")
    check_integer_array("indices", indices)
    check_float_arrays(table=table, x=x)
    check_concrete_indices(indices, table.shape[0])


def validate_kernel_inputs(table, x, indices, config) -> None:
    """What the kernels need beyond the op's own contract (the "xla" path takes any of these)."""
    check_kernel_dtype("table", table)
    check_kernel_dtype("x", x)
    if table.dtype != x.dtype:
        raise TypeError(f"table and x have dtypes {table.dtype} and {x.dtype}; implementation='pallas' needs one")
    check_kernel_limits("table", table.shape[1], indices, table.shape[0], "rows", config)


def row_dots(
    table: jax.Array,
    x: jax.Array,
    indices: jax.Array,
    *,
    implementation: str = "auto",
    interpret: bool | None = None,
    config: ExpertKernelConfig | None = None,
) -> jax.Array:
    """s[t, k] = table[indices[t, k]] . x[t], accumulated and returned in f32.

    | argument | shape | dtype |
    | --- | --- | --- |
    | table | [N, d] | f32 or bf16 (any float for "xla") |
    | x | [T, d] | table.dtype ("pallas"), any float ("xla") |
    | indices | [T, K] | int, each in [0, N) |
    | returns s | [T, K] | f32 (f64 for f64 inputs on "xla") |

    Indices out of [0, N) raise ValueError when they are concrete; under jit nothing can check them and the
    kernels would read outside the table.

    `implementation`: "auto" (the kernels on a GPU where they apply, XLA elsewhere and for inputs they do
    not take), "xla" (`row_dots_reference`) or "pallas" (the kernels: d a multiple of 16 up to 8192, f32 or
    bf16, one dtype for both; anything else raises). `interpret`: Pallas interpret mode (None: only off a
    GPU). `config`: tile sizes (None: omni_expert's heuristic, token order). Differentiable with respect to
    table and x; the table's gradient is dense [N, d] with exact zeros in rows no index chose.
    """
    validate_inputs(table, x, indices)
    impl = _dispatch.choose_implementation(
        "pallas" if config is not None else implementation,  # a config asks for the kernels by name
        supported=SUPPORTED_IMPLEMENTATIONS,
        check_kernel_inputs=lambda _: validate_kernel_inputs(table, x, indices, config),
    )
    if impl == "xla":
        return row_dots_reference(table, x, indices)
    interpret = _dispatch.resolve_interpret(interpret)
    if config is None:
        tokens, top_k = indices.shape
        config = default_config(tokens, top_k, table.shape[0], table.shape[1], table.dtype, variant="token")
    return _row_dots_pallas(table, x, indices.astype(jnp.int32), config, interpret)


def _forward(table, x, indices, config, interpret):
    tokens, top_k = indices.shape
    pair = jnp.arange(tokens * top_k, dtype=jnp.int32)  # [P], pair p = t * K + k
    # Token order: pair p dots table row e_p with token row p // K and lands at p.
    s = kernel.pair_dots(
        table, x, indices.reshape(-1), pair // top_k, pair, config=config, interpret=interpret
    )  # [P] f32
    return s.reshape(tokens, top_k), (table, x, indices)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _row_dots_pallas(table, x, indices, config, interpret):
    s, _ = _forward(table, x, indices, config, interpret)
    return s


def _backward(config, interpret, residuals, ds):
    table, x, indices = residuals
    ds = ds.astype(jnp.float32)  # [T, K]
    dx = kernel.token_combine(ds, indices, table, out_dtype=x.dtype, config=config, interpret=interpret)  # [T, d]
    schedule = build_schedule(indices, table.shape[0])
    d_table = kernel.segment_sum(
        schedule.to_sorted(ds),  # [P] in sorted order: the kernel reads it contiguously
        x,
        schedule.sorted_expert,
        schedule.order,
        out_like=table,
        top_k=schedule.top_k,
        config=config,
        interpret=interpret,
    )  # [N, d]
    return d_table, dx, None  # indices are integers: no cotangent


_row_dots_pallas.defvjp(_forward, _backward)
