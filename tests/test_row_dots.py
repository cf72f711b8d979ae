"""row_dots (the atomic experts' score pass alone, for the hidden-dimension expert layout) against its
plain-jnp reference: forward and both gradients in interpret mode on the CPU, natively under the `gpu`
marker, the CUDA lowering, and the errors for inputs it cannot take."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from expert_checks import check_table_op
from helpers import assert_close, count_triton_calls, lower_for_cuda

from pallas_kernels import _dispatch, row_dots, row_dots_reference
from pallas_kernels.omni_expert.config import ExpertKernelConfig

F32, BF16 = jnp.float32, jnp.bfloat16

SHAPES = [
    # (T, K, N, d, dtype, hot row)
    (37, 5, 50, 32, F32, None),  # ragged everything
    (40, 4, 16, 16, BF16, 3),  # one row in every token: a segment across several blocks
    (33, 1, 8, 16, F32, None),  # K = 1
    (6, 40, 4, 16, F32, None),  # K > N: every row repeated within a token
]


def _inputs(seed, tokens, top_k, num_rows, d, dtype, hot=None):
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, num_rows, (tokens, top_k), dtype=np.int32)
    if hot is not None:
        indices[:, 0] = hot
    table = jnp.asarray(rng.standard_normal((num_rows, d), np.float32), dtype)
    x = jnp.asarray(rng.standard_normal((tokens, d), np.float32), dtype)
    cotangent = jnp.asarray(rng.standard_normal((tokens, top_k), np.float32), F32)
    return table, x, jnp.asarray(indices), cotangent


def _check(seed, tokens, top_k, num_rows, d, dtype, hot, *, interpret):
    table, x, indices, cotangent = _inputs(seed, tokens, top_k, num_rows, d, dtype, hot)
    check_table_op(
        row_dots,
        row_dots_reference,
        table,
        x,
        indices,
        cotangent,
        dtype=dtype,
        value_dtype=F32,
        names=("s", "d_table", "d_x"),
        interpret=interpret,
    )


@pytest.mark.parametrize(("tokens", "top_k", "num_rows", "d", "dtype", "hot"), SHAPES)
def test_matches_the_reference_in_interpret_mode(tokens, top_k, num_rows, d, dtype, hot, seed):
    _check(seed, tokens, top_k, num_rows, d, dtype, hot, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("tokens", "top_k", "num_rows", "d", "dtype", "hot"),
    [*SHAPES, (4096, 32, 65536, 256, BF16, None), (1000, 160, 16384, 64, F32, 7)],
)
def test_matches_the_reference_on_gpu(tokens, top_k, num_rows, d, dtype, hot, seed):
    _check(seed, tokens, top_k, num_rows, d, dtype, hot, interpret=False)


def test_reference_is_the_dot_of_each_chosen_row_with_its_token(seed):
    table, x, indices, _ = _inputs(seed, 5, 3, 7, 4, F32)
    # Against a float64 einsum, by the norm-relative error: an elementwise rtol fails on f32 dots that cancel
    # to near zero.
    want = np.einsum("tkd,td->tk", np.asarray(table, np.float64)[np.asarray(indices)], np.asarray(x, np.float64))
    assert_close(row_dots_reference(table, x, indices), want, F32)


def test_xla_is_the_reference_and_auto_falls_back_for_what_the_kernels_do_not_take(seed, monkeypatch):
    table, x, indices, _ = _inputs(seed, 8, 3, 10, 12, F32)  # d = 12: not a multiple of 16
    expected = row_dots_reference(table, x, indices)
    np.testing.assert_array_equal(row_dots(table, x, indices, implementation="xla"), expected)
    monkeypatch.setattr(_dispatch, "on_gpu", lambda: True)  # as on a GPU: the kernels do not apply here
    np.testing.assert_array_equal(row_dots(table, x, indices, implementation="auto"), expected)
    with pytest.raises(ValueError, match="d=12; implementation='pallas' needs d a multiple of 16"):
        row_dots(table, x, indices, implementation="pallas")


def test_lowers_for_cuda_with_four_triton_calls():
    tokens, top_k, num_rows, d = 4096, 32, 65536, 256

    def loss(table, x, indices):
        return jnp.sum(row_dots(table, x, indices, implementation="pallas", interpret=False))

    specs = [
        jax.ShapeDtypeStruct((num_rows, d), BF16),
        jax.ShapeDtypeStruct((tokens, d), BF16),
        jax.ShapeDtypeStruct((tokens, top_k), jnp.int32),
    ]
    text = lower_for_cuda(jax.grad(loss, argnums=(0, 1)), *specs).as_text()
    # pair_dots forward; token_combine (dx) and segment_sum's blocks, fix-up and untouched rows backward.
    assert count_triton_calls(text) == 5
    assert f"{tokens}x{top_k}x{d}" not in text, "a [T, K, d] array appears in the lowered program"


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"table": jnp.zeros((4,))}, ValueError, r"table must be \[N, d\], got shape \(4,\)"),
        ({"x": jnp.zeros((3, 8))}, ValueError, r"x must be \[tokens, d=16\], got shape \(3, 8\)"),
        ({"indices": jnp.zeros((4, 2), jnp.int32)}, ValueError, r"indices must be \[tokens=3, K\]"),
        ({"indices": jnp.zeros((3, 2))}, TypeError, "indices must be an integer array"),
        ({"x": jnp.zeros((3, 16), jnp.int32)}, TypeError, "x must be a float array"),
        ({"indices": jnp.full((3, 2), 8, jnp.int32)}, ValueError, r"indices must be in \[0, N=8\)"),
        ({"x": jnp.zeros((3, 16), BF16)}, TypeError, "table and x have dtypes float32 and bfloat16"),
        ({"config": ExpertKernelConfig(d_block=32)}, ValueError, "config.d_block=32 must divide d=16"),
    ],
)
def test_bad_input_raises_naming_the_argument(change, error, match):
    args = {"table": jnp.zeros((8, 16)), "x": jnp.zeros((3, 16)), "indices": jnp.zeros((3, 2), jnp.int32)}
    config = change.get("config")
    args.update({name: value for name, value in change.items() if name != "config"})
    with pytest.raises(error, match=match):
        row_dots(**args, implementation="pallas", interpret=True, config=config)
