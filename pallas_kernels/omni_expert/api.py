"""Public entry point of the atomic-expert computation (dynamic expert assembly).

The "pallas" implementation, with pairs p = (t, k), e = indices[t, k], and s, h, dh, ds all [T, K] f32:

  forward   s = up[e] . x[t]                           pair_dots (token or expert order: config.variant)
            h = act(s) * w                             XLA, elementwise on [T, K]
            y[t] = sum_k h * down[e]                   token_combine
  backward  d_down[e] = sum_{p in seg(e)} h_p dy[t_p]  segment_sum over the expert-sorted schedule, which
            dh = down[e] . dy[t]                       also forms dh from the same gathered dy rows
            d_weights = act(s) * dh                    XLA, elementwise
            ds = dh * w * act'(s)                      XLA, elementwise
            dx[t] = sum_k ds * up[e]                   token_combine
            d_up[e] = sum_{p in seg(e)} ds_p x[t_p]    segment_sum

The residuals are the inputs, s (P floats) and, when the forward sorted the pairs, its schedule;
act(s) and act'(s) are recomputed, never stored. The "token" forward builds no schedule at all.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _dispatch
from pallas_kernels._checks import check_concrete_indices, check_float_arrays, check_integer_array, check_kernel_dtype
from pallas_kernels.activations import get_activation
from pallas_kernels.omni_expert import kernel
from pallas_kernels.omni_expert.config import ExpertKernelConfig, check_kernel_limits, default_config
from pallas_kernels.omni_expert.reference import omni_expert_reference
from pallas_kernels.omni_expert.scheduling import ExpertSchedule, build_schedule

SUPPORTED_IMPLEMENTATIONS = ("xla", "pallas")


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
    check_integer_array("indices", indices)
    check_float_arrays(x=x, up=up, down=down, weights=weights)
    check_concrete_indices(indices, up.shape[0])


def validate_kernel_inputs(x, up, down, indices, config) -> None:
    """What the Pallas kernels need beyond the op's own contract (the "xla" path takes any of these)."""
    for name, arr in (("x", x), ("up", up), ("down", down)):
        check_kernel_dtype(name, arr)
    if not x.dtype == up.dtype == down.dtype:
        # The layer casts all three to its compute dtype; mixed inputs are a path nobody tests.
        raise TypeError(
            f"x, up and down have dtypes {x.dtype}, {up.dtype}, {down.dtype}; implementation='pallas' "
            "needs one dtype for all three"
        )
    check_kernel_limits("x", x.shape[1], indices, up.shape[0], "experts", config)


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
    config: ExpertKernelConfig | None = None,
) -> jax.Array:
    """y[t] = sum_k weights[t,k] * act(up[e] . x[t]) * down[e], e = indices[t,k].

    | argument | shape | dtype |
    | --- | --- | --- |
    | x | [T, d] | f32 or bf16 |
    | up, down | [N, d] | x.dtype |
    | weights | [T, K] | float (used in f32) |
    | indices | [T, K] | int, each in [0, N) |
    | returns y | [T, d] | x.dtype |

    Indices out of [0, N) raise ValueError when they are concrete; under jit nothing can check them and the
    Pallas kernels would read outside the tables.

    `implementation`: "auto" (the kernels on a GPU where they apply, XLA elsewhere and for inputs they do
    not take), "xla" (plain jnp, any float dtypes) or "pallas" (the kernels: d a multiple of 16 up to 8192;
    x and both tables all f32 or all bf16; anything else raises).
    `interpret`: run the Pallas kernels in interpret mode (None: only off a GPU). `config`: tile sizes and
    the forward variant (None: the heuristic `default_config`). Differentiable with respect to x, up, down
    and weights; the gradients of
    up and down are dense [N, d] with exact zeros in rows no token chose.
    """
    validate_expert_inputs(x, up, down, weights, indices, activation)
    impl = _dispatch.choose_implementation(
        "pallas" if config is not None else implementation,  # a config asks for the kernels by name
        supported=SUPPORTED_IMPLEMENTATIONS,
        check_kernel_inputs=lambda _: validate_kernel_inputs(x, up, down, indices, config),
    )
    if impl == "xla":
        return omni_expert_reference(x, up, down, weights, indices, activation=activation)
    interpret = _dispatch.resolve_interpret(interpret)
    if config is None:
        tokens, d = x.shape
        config = default_config(tokens, indices.shape[1], up.shape[0], d, up.dtype)
    return _omni_expert_pallas(x, up, down, weights, indices.astype(jnp.int32), activation, config, interpret)


def _pair_scores(table, token_rows, indices, schedule: ExpertSchedule | None, config, interpret) -> jax.Array:
    """[T, K] f32: table[indices[t, k]] . token_rows[t], walking pairs in token order or expert order."""
    tokens, top_k = indices.shape
    num_pairs = tokens * top_k
    if schedule is None:
        pair = jnp.arange(num_pairs, dtype=jnp.int32)  # [P]
        a_ids, b_ids, dest = indices.reshape(num_pairs), pair // top_k, pair
    else:
        a_ids, b_ids, dest = schedule.sorted_expert, schedule.sorted_token, schedule.order  # [P] each
    scores = kernel.pair_dots(table, token_rows, a_ids, b_ids, dest, config=config, interpret=interpret)  # [P]
    return scores.reshape(tokens, top_k)  # [T, K]


def _forward(x, up, down, weights, indices, activation, config, interpret):
    act = get_activation(activation)
    schedule = build_schedule(indices, up.shape[0]) if config.variant == "sorted" else None
    s = _pair_scores(up, x, indices, schedule, config, interpret)  # [T, K] f32
    h = act.forward(s) * weights.astype(jnp.float32)  # [T, K]
    y = kernel.token_combine(h, indices, down, out_dtype=x.dtype, config=config, interpret=interpret)  # [T, d]
    return y, (x, up, down, weights, indices, s, schedule)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _omni_expert_pallas(x, up, down, weights, indices, activation, config, interpret):
    y, _ = _forward(x, up, down, weights, indices, activation, config, interpret)
    return y


def _backward(activation, config, interpret, residuals, dy):
    x, up, down, weights, indices, s, schedule = residuals
    act = get_activation(activation)
    if schedule is None:
        schedule = build_schedule(indices, up.shape[0])
    w = weights.astype(jnp.float32)  # [T, K]
    a = act.forward(s)  # [T, K]
    h = a * w  # [T, K]

    def table_gradient(coef, rows, like, dot_table=None):  # [N, d]: segment sums of coef * rows per expert
        return kernel.segment_sum(
            schedule.to_sorted(coef),  # [P] in sorted order: the kernel reads it contiguously
            rows,
            schedule.sorted_expert,
            schedule.order,
            out_like=like,
            top_k=schedule.top_k,
            dot_table=dot_table,
            config=config,
            interpret=interpret,
        )

    # One pass over dy's rows in expert order gives d_down and dh = down[e] . dy[t] together.
    d_down, dh_sorted = table_gradient(h, dy, down, dot_table=down)
    dh = schedule.to_pairs(dh_sorted)  # [T, K] f32
    ds = dh * w * act.derivative(s)  # [T, K]
    dx = kernel.token_combine(ds, indices, up, out_dtype=x.dtype, config=config, interpret=interpret)  # [T, d]
    d_up = table_gradient(ds, x, up)
    d_weights = (a * dh).astype(weights.dtype)
    return dx, d_up, d_down, d_weights, None  # indices are integers: no cotangent


_omni_expert_pallas.defvjp(_forward, _backward)
