"""embedding_bag (PKM's value read on omni_expert's kernels) against its plain-jnp reference: forward and
both gradients in interpret mode on the CPU, natively under the `gpu` marker, the CUDA lowering, and the
errors for inputs it cannot take."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from expert_checks import check_table_op
from helpers import count_triton_calls, lower_for_cuda

from pallas_kernels import _dispatch, embedding_bag, embedding_bag_reference
from pallas_kernels.omni_expert.config import ExpertKernelConfig

F32, BF16 = jnp.float32, jnp.bfloat16

SHAPES = [
    # (T, K, N, d, dtype, hot row)
    (37, 5, 50, 32, F32, None),  # ragged everything
    (40, 4, 16, 32, BF16, 3),  # one row in every token: a segment across several blocks
    (33, 1, 8, 16, F32, None),  # K = 1
    (6, 64, 4, 16, BF16, None),  # K > N
    (64, 40, 49, 64, F32, None),  # PKM's small preset shape: K = h * k, N = n * n
]


def _inputs(seed, tokens, top_k, num_rows, d, dtype, hot=None):
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, num_rows, (tokens, top_k), dtype=np.int32)
    if hot is not None:
        indices[:, 0] = hot
    table = jnp.asarray(rng.standard_normal((num_rows, d), np.float32), dtype)
    weights = jnp.asarray(rng.uniform(-1.0, 1.0, (tokens, top_k)), F32)
    cotangent = jnp.asarray(rng.standard_normal((tokens, d), np.float32), dtype)
    return table, weights, jnp.asarray(indices), cotangent


def _check(seed, tokens, top_k, num_rows, d, dtype, hot, *, interpret):
    table, weights, indices, cotangent = _inputs(seed, tokens, top_k, num_rows, d, dtype, hot)
    check_table_op(
        embedding_bag,
        embedding_bag_reference,
        table,
        weights,
        indices,
        cotangent,
        dtype=dtype,
        value_dtype=table.dtype,
        names=("y", "d_table", "d_weights"),
        interpret=interpret,
    )


@pytest.mark.parametrize(("tokens", "top_k", "num_rows", "d", "dtype", "hot"), SHAPES)
def test_matches_the_reference_in_interpret_mode(tokens, top_k, num_rows, d, dtype, hot, seed):
    _check(seed, tokens, top_k, num_rows, d, dtype, hot, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("tokens", "top_k", "num_rows", "d", "dtype", "hot"),
    [*SHAPES, (512, 2500, 197136, 1024, BF16, None), (1000, 160, 16384, 256, F32, 7)],  # the paper's PKM
)
def test_matches_the_reference_on_gpu(tokens, top_k, num_rows, d, dtype, hot, seed):
    _check(seed, tokens, top_k, num_rows, d, dtype, hot, interpret=False)


def test_xla_is_the_reference_and_auto_falls_back_for_what_the_kernels_do_not_take(seed, monkeypatch):
    table, weights, indices, _ = _inputs(seed, 8, 3, 10, 12, F32)  # d = 12: not a multiple of 16
    expected = embedding_bag_reference(table, weights, indices)
    np.testing.assert_array_equal(embedding_bag(table, weights, indices, implementation="xla"), expected)
    # As on a GPU, where "auto" means the kernels wherever they apply: here they do not, so the reference.
    monkeypatch.setattr(_dispatch, "on_gpu", lambda: True)
    np.testing.assert_array_equal(embedding_bag(table, weights, indices, implementation="auto"), expected)
    with pytest.raises(ValueError, match="d=12; implementation='pallas' needs d a multiple of 16"):
        embedding_bag(table, weights, indices, implementation="pallas")


@pytest.mark.parametrize(("tokens", "top_k", "num_rows", "d", "dtype"), [(4096, 2500, 197136, 1024, BF16)])
def test_lowers_for_cuda_with_four_triton_calls(tokens, top_k, num_rows, d, dtype):
    def loss(table, weights, indices):
        y = embedding_bag(table, weights, indices, implementation="pallas", interpret=False)
        return jnp.sum(y.astype(F32))

    specs = [
        jax.ShapeDtypeStruct((num_rows, d), dtype),
        jax.ShapeDtypeStruct((tokens, top_k), F32),
        jax.ShapeDtypeStruct((tokens, top_k), jnp.int32),
    ]
    text = lower_for_cuda(jax.grad(loss, argnums=(0, 1)), *specs).as_text()
    # token_combine forward; segment_sum's blocks, fix-up and untouched rows backward. No [T, K, d] buffer.
    assert count_triton_calls(text) == 4
    assert f"{tokens}x{top_k}x{d}" not in text, "a [T, K, d] array appears in the lowered program"


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"table": jnp.zeros((4,))}, ValueError, r"table must be \[N, d\], got shape \(4,\)"),
        ({"indices": jnp.zeros((3,), jnp.int32)}, ValueError, r"indices must be \[tokens, K\]"),
        ({"weights": jnp.zeros((3, 3))}, ValueError, r"weights must have the shape of indices \(3, 2\)"),
        ({"indices": jnp.zeros((3, 2))}, TypeError, "indices must be an integer array"),
        ({"weights": jnp.zeros((3, 2), jnp.int32)}, TypeError, "weights must be a float array"),
        (
            {"indices": jnp.full((3, 2), 8, jnp.int32)},
            ValueError,
            r"indices must be in \[0, N=8\), got values in \[8, 8\]",
        ),
        ({"table": jnp.zeros((8, 16), jnp.float16)}, TypeError, "table has dtype float16; implementation='pallas'"),
        ({"config": "fast"}, TypeError, "config must be an ExpertKernelConfig or None, got str"),
        ({"config": ExpertKernelConfig(d_block=32)}, ValueError, "config.d_block=32 must divide d=16"),
    ],
)
def test_bad_input_raises_naming_the_argument(change, error, match):
    args = {"table": jnp.zeros((8, 16)), "weights": jnp.zeros((3, 2)), "indices": jnp.zeros((3, 2), jnp.int32)}
    config = change.get("config")
    args.update({name: value for name, value in change.items() if name != "config"})
    with pytest.raises(error, match=match):
        embedding_bag(**args, implementation="pallas", interpret=True, config=config)
