"""The router's reference path: exact against brute force over all n*n experts, ties, gradients, errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import normal, omni_router_brute_force

from pallas_kernels import omni_router
from pallas_kernels.omni_router import omni_router_reference


def log_probs(key, tokens, n, dtype=jnp.float32):
    kx, ky = jax.random.split(key)
    lpx = jax.nn.log_softmax(normal(kx, (tokens, n), scale=2.0), axis=-1)
    lpy = jax.nn.log_softmax(normal(ky, (tokens, n), scale=2.0), axis=-1)
    return lpx.astype(dtype), lpy.astype(dtype)


CASES = [(n, k) for n in (2, 3, 8, 64) for k in sorted({1, n, n * n})]


@pytest.mark.parametrize(("n", "top_k"), CASES)
def test_reference_equals_brute_force(n, top_k, key):
    lpx, lpy = log_probs(key, 37, n)
    scores, indices = omni_router_reference(lpx, lpy, top_k)
    want_scores, want_indices = omni_router_brute_force(lpx, lpy, top_k)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(scores, want_scores)
    assert scores.dtype == jnp.float32 and indices.dtype == jnp.int32
    assert bool(jnp.all(scores[:, :-1] >= scores[:, 1:])), "scores must be descending"


@pytest.mark.parametrize("top_k", [1, 5, 25])
def test_zero_tokens_give_empty_results(top_k):
    # T = 0 (an empty batch): the reference and the xla path return [0, K], as the Pallas path does.
    empty = jnp.zeros((0, 5), jnp.float32)
    for scores, indices in (
        omni_router_reference(empty, empty, top_k),
        omni_router_brute_force(empty, empty, top_k),
        omni_router(empty, empty, top_k, implementation="xla"),
    ):
        assert scores.shape == indices.shape == (0, top_k)
        assert scores.dtype == jnp.float32 and indices.dtype == jnp.int32


def test_scores_are_the_sums_of_the_chosen_axes(key):
    lpx, lpy = log_probs(key, 16, 10)
    scores, indices = omni_router(lpx, lpy, 7)
    rows, cols = indices // 10, indices % 10
    want = jnp.take_along_axis(lpx, rows, 1) + jnp.take_along_axis(lpy, cols, 1)
    np.testing.assert_array_equal(scores, want)


def test_ties_go_to_the_lowest_expert_index():
    # Every score ties: the top K must be experts 0..K-1, in that order.
    n = 6
    flat = jnp.zeros((3, n))
    for top_k in (1, 5, 13, n * n):
        _, indices = omni_router(flat, flat, top_k)
        np.testing.assert_array_equal(indices, np.tile(np.arange(top_k), (3, 1)))
    # Integer-valued scores with many ties, checked against brute force and a numpy lexsort.
    rng = np.random.default_rng(0)
    lpx = jnp.asarray(rng.integers(-3, 1, (50, n)).astype(np.float32))
    lpy = jnp.asarray(rng.integers(-3, 1, (50, n)).astype(np.float32))
    for top_k in (1, 4, 9, 20):
        _, indices = omni_router(lpx, lpy, top_k)
        full = np.asarray(lpx)[:, :, None] + np.asarray(lpy)[:, None, :]
        for t in range(50):
            flat_scores = full[t].ravel()
            want = np.lexsort((np.arange(n * n), -flat_scores))[:top_k]
            np.testing.assert_array_equal(indices[t], want)


@pytest.mark.parametrize(("n", "top_k"), [(3, 4), (8, 8), (16, 40)])
def test_gradient_flows_to_the_chosen_positions(n, top_k, key):
    k1, k2 = jax.random.split(key)
    lpx, lpy = log_probs(k1, 12, n)
    cotangent = normal(k2, (12, top_k))
    _, vjp = jax.vjp(lambda a, b: omni_router(a, b, top_k)[0], lpx, lpy)
    dx, dy = vjp(cotangent)
    _, indices = omni_router(lpx, lpy, top_k)
    want_dx, want_dy = np.zeros((12, n)), np.zeros((12, n))
    for t, k in itertools.product(range(12), range(top_k)):
        e = int(indices[t, k])
        want_dx[t, e // n] += cotangent[t, k]
        want_dy[t, e % n] += cotangent[t, k]
    np.testing.assert_allclose(dx, want_dx, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dy, want_dy, rtol=1e-6, atol=1e-6)


def test_bf16_inputs_give_f32_scores(key):
    lpx, lpy = log_probs(key, 9, 16, jnp.bfloat16)
    scores, indices = omni_router(lpx, lpy, 5)
    want_scores, want_indices = omni_router_brute_force(lpx, lpy, 5)
    assert scores.dtype == jnp.float32
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(scores, want_scores)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((jnp.zeros((4, 3)), jnp.zeros((4, 3)), 0), ValueError, r"top_k=0 must be in \[1, n\*n\] = \[1, 9\]"),
        ((jnp.zeros((4, 3)), jnp.zeros((4, 3)), 10), ValueError, "top_k=10"),
        ((jnp.zeros((4, 3)), jnp.zeros((4, 3)), 2.0), TypeError, "top_k must be a Python int"),
        ((jnp.zeros((4, 3)), jnp.zeros((4, 4)), 2), ValueError, "same shape"),
        ((jnp.zeros((4, 3, 1)), jnp.zeros((4, 3, 1)), 2), ValueError, r"log_probs_x must be \[tokens, n\]"),
        ((jnp.zeros((4, 3), jnp.int32), jnp.zeros((4, 3)), 2), TypeError, "log_probs_x must be a float array"),
    ],
)
def test_bad_inputs_are_refused(args, error, match):
    with pytest.raises(error, match=match):
        omni_router(*args)


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="implementation='cuda'"):
        omni_router(jnp.zeros((2, 3)), jnp.zeros((2, 3)), 2, implementation="cuda")
