"""The router kernels compiled for and run on the GPU ("pallas" and "triton") against the jnp reference.

The reference runs on the host CPU (XLA:CPU's `lax.top_k` is the tie order the CPU suite checks), so a
different tie order of a GPU top-k could not hide or fake a difference. Run on the GPU machine:
`python -m pytest -m gpu tests/test_router_gpu.py`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, normal, omni_router_brute_force, router_compaction_cases

from pallas_kernels import omni_router
from pallas_kernels.omni_router import RouterConfig, default_config, kernel

pytestmark = pytest.mark.gpu

# (implementation, axis_sort): both Pallas step-1 methods, and jax-triton's tl.topk (axis_sort unused).
VARIANTS = (("pallas", "threshold"), ("pallas", "select"), ("triton", "threshold"))
CASES = [
    # (T, n, K, dtype): K = n*n, K > n, K < n, ragged tiles, the paper's setting and the largest shapes.
    (1, 2, 4, "float32"),
    (7, 3, 9, "bfloat16"),
    (1000, 16, 256, "float32"),
    (1000, 100, 1, "bfloat16"),
    (1000, 100, 64, "float32"),
    (4096, 256, 16, "bfloat16"),
    (1021, 320, 512, "bfloat16"),
    # The paper's setting, and K > the exact head of step 1 with (n > k') and without (n = k') compaction.
    (4096, 320, 512, "bfloat16"),
    (1024, 320, 1024, "float32"),
    (1021, 1024, 512, "bfloat16"),
    (4096, 1024, 64, "bfloat16"),
    (2048, 64, 1024, "float32"),
    (257, 4096, 1024, "float32"),
    (1031, 4096, 2, "bfloat16"),
    # K > 1024 (a head of 64 or 128): small-omnimoe's router, then 16,384, 32,768 and 65,536 candidate slots.
    (4096, 256, 1280, "bfloat16"),
    (1021, 320, 2048, "float32"),
    (513, 256, 4096, "bfloat16"),
    (129, 4096, 4096, "float32"),
]


@pytest.fixture(scope="module", autouse=True)
def on_gpu():
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")


def log_probs(key, tokens, n, dtype):
    kx, ky, kt = jax.random.split(key, 3)
    temperature = jax.random.uniform(kt, (tokens, 1), minval=0.3, maxval=3.0)
    lpx = jax.nn.log_softmax(temperature * normal(kx, (tokens, n)), axis=-1)
    lpy = jax.nn.log_softmax(temperature * normal(ky, (tokens, n)), axis=-1)
    return lpx.astype(dtype), lpy.astype(dtype)


CPU = jax.devices("cpu")[0]


@functools.partial(jax.jit, static_argnames=("top_k", "implementation", "config", "sort_by_score"))
def route_vjp(lpx, lpy, cotangent, top_k, implementation, config=None, sort_by_score=True):
    route = functools.partial(
        omni_router, top_k=top_k, implementation=implementation, config=config, sort_by_score=sort_by_score
    )
    (scores, indices), vjp = jax.vjp(route, lpx, lpy)
    return (scores, indices), vjp((cotangent, np.zeros(indices.shape, jax.dtypes.float0)))


def assert_routes_equal(got, want, what):
    (scores, indices), (want_scores, want_indices) = got, want
    assert scores.dtype == jnp.float32 and indices.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(indices), np.asarray(want_indices), err_msg=f"{what}: indices")
    np.testing.assert_array_equal(np.asarray(scores), np.asarray(want_scores), err_msg=f"{what}: scores")


def configs(tokens, n, top_k, tiling=None):
    """(implementation, config, name) per variant; `tiling` replaces the default tiling."""
    base = tiling or default_config(tokens, n, top_k)
    return [(impl, dataclasses.replace(base, axis_sort=sort), f"{impl}/{sort}") for impl, sort in VARIANTS]


def check_against_reference(lpx, lpy, cotangent, top_k, tiling=None):
    """Every variant: indices and scores equal to the reference, gradients close to its."""
    (tokens, n), dtype = lpx.shape, lpx.dtype
    want, (want_dx, want_dy) = route_vjp(*jax.device_put((lpx, lpy, cotangent), CPU), top_k, "xla")
    for implementation, config, name in configs(tokens, n, top_k, tiling):
        got, (dx, dy) = route_vjp(lpx, lpy, cotangent, top_k, implementation, config)
        assert_routes_equal(got, want, name)
        assert dx.dtype == dtype and dy.dtype == dtype
        assert_close(dx, want_dx, dtype, what=f"{name}: d log_probs_x")
        assert_close(dy, want_dy, dtype, what=f"{name}: d log_probs_y")


@pytest.mark.parametrize(("tokens", "n", "top_k", "dtype"), CASES)
def test_matches_reference_on_gpu(tokens, n, top_k, dtype, key):
    k1, k2 = jax.random.split(key)
    lpx, lpy = log_probs(k1, tokens, n, dtype)
    check_against_reference(lpx, lpy, normal(k2, (tokens, top_k)), top_k)


@pytest.mark.parametrize(("n", "top_k"), [(6, 5), (6, 13), (64, 64), (160, 512), (160, 1280)])
def test_ties_match_brute_force_on_gpu(n, top_k, seed):
    rng = np.random.default_rng(seed)
    lpx = rng.integers(-3, 1, (512, n)).astype(np.float32)
    lpy = rng.integers(-3, 1, (512, n)).astype(np.float32)
    lpx[:4], lpy[:4] = 0.0, 0.0  # constant rows: every expert ties
    lpx, lpy = jnp.asarray(lpx), jnp.asarray(lpy)
    want = omni_router_brute_force(*jax.device_put((lpx, lpy), CPU), top_k)
    for implementation, config, name in configs(512, n, top_k):
        route = functools.partial(omni_router, top_k=top_k, implementation=implementation, config=config)
        assert_routes_equal(jax.jit(route)(lpx, lpy), want, name)


@pytest.mark.parametrize(("n", "top_k"), [(100, 128), (160, 512), (256, 1280)])
def test_merge_compaction_and_its_fallback_on_gpu(n, top_k, seed):
    # Step 3's compacted finish and its fallback over all slots (tests/helpers.py `router_compaction_cases`:
    # ties at the K-th score on either side of B, a tile of a fitting token beside one that does not),
    # through the whole router (every variant, one and two tokens a tile, the compaction on and off) and
    # through the merge alone on sorted axes, whose outputs in slot order must not depend on the path.
    lpx, lpy = map(jnp.asarray, router_compaction_cases(n, top_k, np.random.default_rng(seed)))
    want = omni_router_brute_force(*jax.device_put((lpx, lpy), CPU), top_k)
    positions = [jax.lax.top_k(kernel.order_key(lp), min(top_k, n))[1].astype(jnp.int32) for lp in (lpx, lpy)]
    merged = []
    for block_tokens, compact_merge in ((1, True), (2, True), (1, False)):
        tiling = dataclasses.replace(
            default_config(len(lpx), n, top_k), block_tokens=block_tokens, compact_merge=compact_merge
        )
        for implementation, config, name in configs(len(lpx), n, top_k, tiling):
            route = functools.partial(omni_router, top_k=top_k, implementation=implementation, config=config)
            assert_routes_equal(jax.jit(route)(lpx, lpy), want, f"{name}, {block_tokens}, {compact_merge}")
        merge = functools.partial(kernel.router_merge, top_k=top_k, config=tiling, interpret=False, sort_by_score=False)
        merged.append([np.asarray(a) for a in jax.jit(merge)(lpx, lpy, *positions)])
    for other in merged[1:]:
        for got, first in zip(other, merged[0], strict=True):
            np.testing.assert_array_equal(got, first)


@pytest.mark.parametrize(("tokens", "n", "top_k"), [(1021, 320, 512), (4096, 256, 1280)])
def test_unsorted_output_is_the_sorted_set_on_gpu(tokens, n, top_k, key):
    # sort_by_score=False: per row the reference's K (index, score) pairs, in slot order (not by score).
    lpx, lpy = log_probs(key, tokens, n, "bfloat16")
    want_scores, want_indices = map(
        np.asarray, omni_router(*jax.device_put((lpx, lpy), CPU), top_k, implementation="xla")
    )
    want_order = np.argsort(want_indices, axis=1)
    for implementation, config, name in configs(tokens, n, top_k):
        route = functools.partial(
            omni_router, top_k=top_k, implementation=implementation, config=config, sort_by_score=False
        )
        scores, indices = map(np.asarray, jax.jit(route)(lpx, lpy))
        assert not np.array_equal(indices, want_indices), f"{name}: the sort was not skipped"
        order = np.argsort(indices, axis=1)
        np.testing.assert_array_equal(
            np.take_along_axis(indices, order, 1), np.take_along_axis(want_indices, want_order, 1), err_msg=name
        )
        np.testing.assert_array_equal(
            np.take_along_axis(scores, order, 1), np.take_along_axis(want_scores, want_order, 1), err_msg=name
        )


@pytest.mark.parametrize(("block_tokens", "num_warps"), [(1, 4), (4, 2), (16, 8)])
def test_other_tilings_on_gpu(block_tokens, num_warps, key):
    tokens, n, top_k = 1001, 128, 32
    lpx, lpy = log_probs(key, tokens, n, "bfloat16")
    config = RouterConfig(block_tokens=block_tokens, num_warps=num_warps, num_stages=1, backward_block_k=4)
    check_against_reference(lpx, lpy, normal(jax.random.fold_in(key, 1), (tokens, top_k)), top_k, config)


@pytest.mark.parametrize(("block_tokens", "num_warps"), [(1, 16), (2, 8), (4, 4)])
def test_bucketed_step_one_with_other_tilings_on_gpu(block_tokens, num_warps, key):
    # The paper's n and K (step 1 buckets the axes: k' = 320 > its exact head) under the sweep's tilings.
    tokens, n, top_k = 1021, 320, 512
    lpx, lpy = log_probs(key, tokens, n, "bfloat16")
    config = RouterConfig(block_tokens=block_tokens, num_warps=num_warps, num_stages=1, backward_block_k=4)
    check_against_reference(lpx, lpy, normal(jax.random.fold_in(key, 1), (tokens, top_k)), top_k, config)


def test_auto_is_pallas_on_gpu(key):
    lpx, lpy = log_probs(key, 64, 32, "float32")
    text = jax.jit(functools.partial(omni_router, top_k=8)).lower(lpx, lpy).as_text()
    assert "triton" in text, "implementation='auto' should run the Pallas kernels on a GPU"


@pytest.mark.parametrize(("top_k", "expect_triton"), [(16, False), (512, True)])
def test_auto_picks_the_measured_faster_kernel(top_k, expect_triton, key):
    lpx, lpy = log_probs(key, 256, 320, "bfloat16")
    jaxpr = str(jax.make_jaxpr(lambda a, b: omni_router(a, b, top_k))(lpx, lpy))
    assert ("triton_kernel_call" in jaxpr) == expect_triton
    scores, indices = jax.jit(lambda a, b: omni_router(a, b, top_k))(lpx, lpy)
    want_scores, want_indices = omni_router_brute_force(jax.device_put(lpx, CPU), jax.device_put(lpy, CPU), top_k)
    np.testing.assert_array_equal(np.asarray(indices), np.asarray(want_indices))
    np.testing.assert_array_equal(np.asarray(scores), np.asarray(want_scores))


@pytest.mark.parametrize(
    ("tokens", "n", "top_k", "dtype"),
    [(32768, 256, 1280, "bfloat16"), (4096, 320, 512, "bfloat16"), (4096, 320, 512, "float32")],
)
def test_factored_backward_matches_onehot_on_gpu(tokens, n, top_k, dtype, key):
    # RouterConfig.backward="factored" (the default at these n) against "onehot": through the router sorted
    # and unsorted, and the backward kernel alone on random, repeated ids in f32.
    k1, k2, k3 = jax.random.split(key, 3)
    lpx, lpy = log_probs(k1, tokens, n, dtype)
    cotangent = normal(k2, (tokens, top_k))
    onehot = dataclasses.replace(default_config(tokens, n, top_k), backward="onehot")
    factored = dataclasses.replace(onehot, backward="factored")
    assert kernel.uses_factored_backward(n, factored)
    for sort_by_score in (True, False):
        want, (want_dx, want_dy) = route_vjp(lpx, lpy, cotangent, top_k, "pallas", onehot, sort_by_score)
        got, (dx, dy) = route_vjp(lpx, lpy, cotangent, top_k, "pallas", factored, sort_by_score)
        assert_routes_equal(got, want, f"sort_by_score={sort_by_score}")
        assert dx.dtype == dy.dtype == jnp.dtype(dtype)
        assert_close(dx, want_dx, dtype, what=f"sort_by_score={sort_by_score}: d log_probs_x")
        assert_close(dy, want_dy, dtype, what=f"sort_by_score={sort_by_score}: d log_probs_y")
    experts = jax.random.randint(k3, (tokens, top_k), 0, 3 * n, jnp.int32)  # rows 0-2 only: many repeats
    backward = {
        name: jax.jit(functools.partial(kernel.router_backward, n=n, dtype=jnp.float32, config=config, interpret=False))
        for name, config in (("onehot", onehot), ("factored", factored))
    }
    want_dx, want_dy = backward["onehot"](cotangent, experts)
    dx, dy = backward["factored"](cotangent, experts)
    assert_close(dx, want_dx, "float32", what="d log_probs_x, repeated ids")
    assert_close(dy, want_dy, "float32", what="d log_probs_y, repeated ids")
