"""Inputs and the reference comparison shared by the CPU (interpret) and GPU tests of omni_expert's kernels."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from helpers import assert_close

from pallas_kernels import omni_expert, omni_expert_reference
from pallas_kernels.omni_expert import kernel


@dataclasses.dataclass(frozen=True)
class ExpertInputs:
    x: jax.Array  # [T, d]
    up: jax.Array  # [N, d]
    down: jax.Array  # [N, d]
    weights: jax.Array  # [T, K] f32
    indices: jax.Array  # [T, K] int32
    cotangent: jax.Array  # [T, d], a random dy


def expert_inputs(seed, tokens, top_k, num_experts, d, dtype, *, hot_expert=None) -> ExpertInputs:
    """Fresh random inputs from `seed`; `hot_expert` makes every token choose that expert (in its first slot).

    Drawn with numpy: jax.random would compile a program per shape, which dominates these small tests.
    """
    rng = np.random.default_rng(seed)

    def normal(shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape, np.float32), dtype)

    indices = rng.integers(0, num_experts, (tokens, top_k), dtype=np.int32)
    if hot_expert is not None:
        indices[:, 0] = hot_expert
    return ExpertInputs(
        x=normal((tokens, d)),
        # Rows ~ N(0, 1/d), as the layer initialises them: u . x is O(1), so act(s) is far from linear.
        up=normal((num_experts, d), d**-0.5),
        down=normal((num_experts, d), d**-0.5),
        weights=jnp.asarray(rng.uniform(0.1, 1.0, (tokens, top_k)), jnp.float32),
        indices=jnp.asarray(indices),
        cotangent=normal((tokens, d)),
    )


def _value_and_grads(fn, inputs: ExpertInputs, cast=None):
    """y and (dx, d_up, d_down, d_weights) of fn(x, up, down, weights) for the cotangent, in one jit."""
    primals = (inputs.x, inputs.up, inputs.down, inputs.weights)
    cotangent = inputs.cotangent
    if cast is not None:
        primals = tuple(p.astype(cast) for p in primals)
        cotangent = cotangent.astype(cast)

    @jax.jit
    def run(primals, cotangent):
        y, vjp = jax.vjp(fn, *primals)
        return y, vjp(cotangent)

    return run(primals, cotangent)


def check_against_reference(inputs: ExpertInputs, *, interpret: bool, config=None, activation="silu") -> None:
    """Pallas forward and all four gradients vs the f32 reference; untouched table-gradient rows exactly 0.

    The table gradients are compared on the rows some pair touched (gathered on the device) after checking,
    on the device, that every other row is exactly zero in both: together that is the full comparison, but
    the host never converts the dense [N, d] arrays (at N = 1M, d = 1024 that took minutes on a GPU machine).
    """
    indices = inputs.indices

    def pallas(x, up, down, weights):
        return omni_expert(
            x,
            up,
            down,
            weights,
            indices,
            activation=activation,
            implementation="pallas",
            interpret=interpret,
            config=config,
        )

    def reference(x, up, down, weights):
        return omni_expert_reference(x, up, down, weights, indices, activation=activation)

    y, grads = _value_and_grads(pallas, inputs)
    # The reference sees the same (rounded) values in f32; matmuls run at HIGHEST (tests/conftest.py).
    want_y, want_grads = _value_and_grads(reference, inputs, cast=jnp.float32)
    dtype = inputs.x.dtype
    assert y.dtype == dtype
    assert_close(y, want_y, dtype, what="y")
    num_experts = inputs.up.shape[0]
    touched = np.unique(np.asarray(indices))  # [U] sorted expert ids
    untouched = jnp.ones((num_experts,), bool).at[touched].set(False)  # [N]
    names = ("dx", "d_up", "d_down", "d_weights")
    primals = (inputs.x, inputs.up, inputs.down, inputs.weights)
    for name, got, want, primal in zip(names, grads, want_grads, primals, strict=True):
        assert got.dtype == primal.dtype and got.shape == primal.shape, (name, got.dtype, got.shape)
        if name in ("d_up", "d_down"):
            for which, table in (("pallas", got), ("reference", want)):
                stray = _max_abs_where(table, untouched)
                assert stray == 0, f"{name} ({which}): rows of experts no token chose must be exactly 0, got {stray}"
            got, want = jnp.take(got, touched, axis=0), jnp.take(want, touched, axis=0)  # [U, d]
        assert_close(got, want, dtype, what=name)


@jax.jit
def _max_abs_where(table, rows):
    """max |table[e]| over the rows e where `rows` [N] is True (0 if none), computed on the device."""
    return jnp.max(jnp.where(rows[:, None], jnp.abs(table.astype(jnp.float32)), 0.0))


@functools.partial(jax.jit, static_argnames=("top_k", "config", "interpret"))
def segment_sum(coef, rows, table, schedule, *, top_k, config, interpret):
    """`kernel.segment_sum` of coef [P] (in the schedule's sorted order) times rows [T, d] into a table shaped
    like `table` [N, d], with the fused dots against `table`: (out [N, d], dots [P])."""
    return kernel.segment_sum(
        coef,
        rows,
        schedule.sorted_expert,
        schedule.order,
        out_like=table,
        top_k=top_k,
        dot_table=table,
        config=config,
        interpret=interpret,
    )


@functools.partial(jax.jit, static_argnames=("top_k", "config", "interpret", "with_dots"))
def segment_sum_stages(coef, rows, table, schedule, *, top_k, config, interpret, with_dots=True):
    """`segment_sum` kernel by kernel: (the blocks kernel's out [N, d] and side [2 * blocks, d] as it left
    them, the finished out [N, d], dots [P] or None without `with_dots`, d_up's pass). The first two hold
    the uninitialised memory the kernel did not write (NaN in interpret mode)."""
    partial_out, side, dots = kernel.segment_blocks(
        coef,
        rows,
        schedule.sorted_expert,
        schedule.order,
        jax.ShapeDtypeStruct(table.shape, table.dtype),
        top_k=top_k,
        dot_table=table if with_dots else None,
        config=config,
        interpret=interpret,
    )
    out = kernel.segment_fixup(partial_out, side, schedule.sorted_expert, config=config, interpret=interpret)
    out = kernel.zero_untouched_rows(out, schedule.sorted_expert, config=config, interpret=interpret)
    return partial_out, side, out, None if dots is None else jnp.sum(dots, axis=0)


def segments_per_block(sorted_expert, block: int) -> np.ndarray:
    """[blocks] how many segments meet each block of `block` sorted pairs (a block's first pair opens one, and
    so does every other pair whose expert differs from the one before)."""
    experts = np.asarray(sorted_expert)
    opens = np.ones(experts.shape, bool)
    opens[1:] = experts[1:] != experts[:-1]
    opens[::block] = True
    return np.add.reduceat(opens.astype(np.int64), np.arange(0, experts.size, block))


def check_segment_sum(out, dots, *, coef, rows, table, indices, order, dtype) -> None:
    """segment_sum's outputs against a float64 sum: `out` [N, d] holds sum_p coef_p rows[t_p] in every row
    some pair touched and exact zeros everywhere else (the kernels write every row of an uninitialised
    output: NaN in interpret mode, whatever memory held on a GPU); `dots` [P] the fused table . row dots
    (None: a pass without them, not checked)."""
    num_experts, top_k = table.shape[0], indices.shape[1]
    out = np.asarray(out.astype(jnp.float32))
    order = np.asarray(order)
    expert_at, token_at = indices.reshape(-1)[order], order // top_k  # [P] each, in sorted order
    touched = np.isin(np.arange(num_experts), expert_at)
    assert np.all(np.isfinite(out)), "a row no kernel wrote (uninitialised memory)"
    np.testing.assert_array_equal(out[~touched], 0.0)
    rows64 = np.asarray(rows.astype(jnp.float32), np.float64)
    table64 = np.asarray(table.astype(jnp.float32), np.float64)
    want = np.zeros(out.shape)
    np.add.at(want, expert_at, coef.astype(np.float64)[:, None] * rows64[token_at])
    assert_close(out[touched], want[touched], dtype)
    if dots is None:
        return
    want_dots = np.einsum("pd,pd->p", table64[expert_at], rows64[token_at])
    assert_close(dots, want_dots, jnp.float32, what="dots")  # from the operands as given: f32 sums either way


def check_table_op(op, reference, table, operand, indices, cotangent, *, dtype, value_dtype, names, interpret):
    """A kernel op `op(table, operand, indices, implementation=..., interpret=...)` of one table [N, d] and
    one per-token operand (embedding_bag's weights, row_dots' x) against `reference` computed in f32 from the
    same (possibly bf16-rounded) inputs: its value and both gradients from one VJP with `cotangent`, each
    within `dtype`'s tolerance, the value of `value_dtype` and each gradient of its input's dtype, and
    exactly 0 in the table gradient's rows no index chose. `names`: (value, d_table, d_operand) for messages."""

    def value_and_grads(fn, table, operand, cotangent):
        value, vjp = jax.vjp(lambda t, o: fn(t, o, indices), table, operand)
        return value, vjp(cotangent)

    kernel = functools.partial(op, implementation="pallas", interpret=interpret)
    value, (d_table, d_operand) = jax.jit(lambda *a: value_and_grads(kernel, *a))(table, operand, cotangent)
    ref_value, (ref_table, ref_operand) = jax.jit(lambda *a: value_and_grads(reference, *a))(
        table.astype(jnp.float32), operand.astype(jnp.float32), cotangent.astype(jnp.float32)
    )
    assert value.dtype == value_dtype and d_table.dtype == table.dtype and d_operand.dtype == operand.dtype
    for got, want, name in zip((value, d_table, d_operand), (ref_value, ref_table, ref_operand), names, strict=True):
        assert_close(got, want, dtype, what=name)
    untouched = np.setdiff1d(np.arange(table.shape[0]), np.asarray(indices))
    assert np.all(np.asarray(d_table.astype(jnp.float32))[untouched] == 0), "rows no index chose must get exactly 0"
