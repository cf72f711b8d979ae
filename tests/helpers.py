"""Shared test helpers: random inputs, meshes, Triton call counts, the router's brute force and a host model of
its merge; the numerics come from omnimoe_jax.testing."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from omnimoe_jax.testing import TOLERANCE, assert_close, rel_error, tolerance
from train.config import apply_overrides, parse_overrides
from train.presets import get_preset

__all__ = [
    "SHRUNK",
    "TOLERANCE",
    "assert_close",
    "assert_trees_close",
    "check_gradients_by_finite_differences",
    "count_triton_calls",
    "cpu_mesh",
    "lower_for_cuda",
    "normal",
    "omni_router_brute_force",
    "rel_error",
    "router_compaction_cases",
    "router_merge_outcomes",
    "run_readme_block",
    "shrunk_config",
    "tolerance",
]

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A Pallas kernel in lowered StableHLO: jax 0.10 names the custom call one way, 0.11 the other.
_TRITON_CALL = re.compile(r"custom_call @(__gpu\$xla\.gpu\.triton|triton_kernel_call_ffi)")


def assert_trees_close(got, want, dtype, *, what: str = "") -> None:
    """assert_close leaf by leaf over two pytrees of one structure, each leaf named `what` + its path; integer
    leaves (counts, steps) must be equal."""
    for (path, leaf), reference in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        name = f"{what}{jax.tree_util.keystr(path)}"
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert_close(leaf, reference, dtype, what=name)
        else:
            np.testing.assert_array_equal(leaf, reference, err_msg=name)


def count_triton_calls(lowered_text: str) -> int:
    """How many Triton kernel launches a program lowered for CUDA (`.lower(...).as_text()`) contains."""
    return len(_TRITON_CALL.findall(lowered_text))


def check_gradients_by_finite_differences(loss, params, tokens) -> None:
    """loss(params, tokens)'s reverse-mode gradients against finite differences in float64 (call it under
    `jax.enable_x64(True)`), and no parameter's gradient identically zero.

    Routing is piecewise constant, so the step is small (1e-6) and the inputs must route decisively (a margin
    above 1e-4 between the K-th and the (K+1)-th score, as the layer tests' `decisive_inputs` draw them).
    """
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    tokens = jnp.asarray(tokens, jnp.float64)
    check_grads(loss, (params, tokens), order=1, modes=["rev"], eps=1e-6, atol=1e-5, rtol=1e-5)
    grads = jax.grad(loss)(params, tokens)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert float(jnp.abs(g).max()) > 0, f"gradient of {jax.tree_util.keystr(path)} is identically zero"


def run_readme_block(tag: str) -> str:
    """Runs README.md's one ```python <tag> block in a fresh interpreter; returns its stdout once it exited 0."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(rf"^```python {tag}\n(.*?)^```$", readme, flags=re.S | re.M)
    assert len(blocks) == 1, f"README.md must hold exactly one ```python {tag} block"
    result = subprocess.run([sys.executable, "-c", blocks[0]], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def normal(key, shape, dtype=jnp.float32, scale=1.0):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def cpu_mesh(spec):
    """A ("data", "expert") mesh from a spec such as "data=2,expert=4" over the 8 CPU devices of
    tests/conftest.py (also on a GPU machine, where they are not the default devices)."""
    from omnimoe_jax import parallel

    return parallel.make_mesh(spec, devices=jax.devices("cpu"))


def omni_router_brute_force(log_probs_x: jax.Array, log_probs_y: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Scores all n*n experts and takes the top K (lowest index first on ties). O(n^2): tests only."""
    n = log_probs_x.shape[-1]
    acc = jnp.promote_types(log_probs_x.dtype, jnp.float32)
    full = log_probs_x.astype(acc)[:, :, None] + log_probs_y.astype(acc)[:, None, :]  # [T, n, n]
    scores, idx = jax.lax.top_k(full.reshape(full.shape[0], n * n), top_k)  # [T, K]
    return scores, idx.astype(jnp.int32)


def _sorted_axis_positions(log_probs, k_axis: int) -> np.ndarray:
    """[T, k'] columns of each row's top k', largest first, ties by lower column (`lax.top_k`'s order)."""
    from pallas_kernels.omni_router.kernel import order_key

    return np.asarray(jax.lax.top_k(order_key(jnp.asarray(log_probs, jnp.float32)), k_axis)[1])


def router_merge_outcomes(log_probs_x, log_probs_y, top_k: int, block_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """A host model of the router merge's step 3 (kernel.py, `_select_top_k`) on fully sorted axes (what
    `router_merge` gets from a sort, and the forward where k' <= the head): per tile whether it finishes over
    the compacted array, and per token its count of candidates >= the bisection's lower end then.
    """
    from pallas_kernels.omni_router.config import bound_table, candidate_table, compacted_slots
    from pallas_kernels.omni_router.kernel import INT32_MIN, order_key

    tokens, n = log_probs_x.shape
    k_axis = min(top_k, n)
    x, y = np.asarray(log_probs_x, np.float32), np.asarray(log_probs_y, np.float32)
    px, py = _sorted_axis_positions(x, k_axis), _sorted_axis_positions(y, k_axis)
    token = np.arange(tokens)[:, None]

    def keys(table):
        a, b = np.maximum(table, 0)
        sums = jnp.asarray(x[token, px[:, a]] + y[token, py[:, b]])  # f32, as the kernel adds them
        return np.where(table[0] >= 0, np.asarray(order_key(sums)), INT32_MIN).astype(np.int64)

    candidates, floor = keys(candidate_table(n, top_k)), keys(bound_table(n, top_k)).max(axis=1)
    width = compacted_slots(n, top_k)
    at_floor = np.sum(candidates >= floor[:, None], axis=1)
    lo = np.where(at_floor >= top_k, floor, INT32_MIN)
    at_lo = np.where(at_floor >= top_k, at_floor, candidates.shape[1])
    hi = candidates.max(axis=1) + 1
    fits = []
    for t0 in range(0, tokens, block_tokens):
        tile = slice(t0, t0 + block_tokens)
        while np.any((hi[tile] > lo[tile] + 1) & (at_lo[tile] > width)):
            mid = (lo[tile] + hi[tile]) // 2
            at_mid = np.sum(candidates[tile] >= mid[:, None], axis=1)
            enough = at_mid >= top_k
            lo[tile], hi[tile] = np.where(enough, mid, lo[tile]), np.where(enough, hi[tile], mid)
            at_lo[tile] = np.where(enough, at_mid, at_lo[tile])
        fits.append(at_lo[tile].max() <= width)
    return np.asarray(fits), at_lo


def router_compaction_cases(n: int, top_k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """[10, n] f32 log-probs (x, y) around the router merge's compaction bound B (`compacted_slots`).

    Six values per axis put the K-th score inside runs of ties; of a pool of such tokens come those
    closest to B on either side (`router_merge_outcomes`). Besides: tokens where every candidate ties (a
    constant row, an all -inf row), continuous ones, and one with more than B candidates >= the K-th score
    whose last in slot order are winners (x constant; on y one top column, then m tied, m the fewest that
    pass B with the K-th score at 0: the top column's experts win, at positions (a, 0) for every a), which
    a compaction that dropped
    what does not fit would lose. At two tokens a tile: (fits, over B), (fits, all tied), (continuous x 2),
    (over B, all -inf), (the tail one, continuous); alone, tokens 0, 2, 4, 5 and 9 fit (asserted).
    """
    from pallas_kernels.omni_router.config import compacted_slots

    width = compacted_slots(n, top_k)
    pool_x = rng.integers(-5, 1, (1024, n)).astype(np.float32)
    pool_y = rng.integers(-5, 1, (1024, n)).astype(np.float32)
    _, at_lo = router_merge_outcomes(pool_x, pool_y, top_k, block_tokens=1)
    fitting, over = np.flatnonzero(at_lo <= width), np.flatnonzero(at_lo > width)
    assert len(fitting) >= 2 and len(over) >= 2, "the pool must fall on both sides of B"
    fit_a, fit_b = fitting[np.argsort(-at_lo[fitting])[:2]]
    over_a, over_b = over[np.argsort(at_lo[over])[:2]]
    columns = rng.permutation(n)
    constant = np.zeros(n, np.float32)
    for tied in range(-(-top_k // n), n):  # n (tied + 1) >= K: the K-th score is 0, and the top column's wins
        tail_y = np.full(n, -1.0, np.float32)
        tail_y[columns[: tied + 1]] = [1.0] + [0.0] * tied
        if router_merge_outcomes(constant[None], tail_y[None], top_k, block_tokens=1)[1][0] > width:
            break
    else:
        raise AssertionError("no tail case passes B")

    def continuous():
        return rng.normal(size=n).astype(np.float32)

    minus_inf = np.full(n, -np.inf, np.float32)
    rows = [
        (pool_x[fit_a], pool_y[fit_a]),
        (pool_x[over_a], pool_y[over_a]),
        (pool_x[fit_b], pool_y[fit_b]),
        (constant, constant),
        (continuous(), continuous()),
        (continuous(), continuous()),
        (pool_x[over_b], pool_y[over_b]),
        (minus_inf, minus_inf),
        (constant, tail_y),
        (continuous(), continuous()),
    ]
    lpx, lpy = (np.stack(axis) for axis in zip(*rows, strict=True))
    for block_tokens, fitting_tiles in ((1, [0, 2, 4, 5, 9]), (2, [2])):
        fits, _ = router_merge_outcomes(lpx, lpy, top_k, block_tokens)
        assert np.array_equal(np.flatnonzero(fits), fitting_tiles), (block_tokens, fits)
    return lpx, lpy


# The tiny preset shrunk to a run of seconds on a CPU: the train loop's and memory fit's tests.
SHRUNK = [
    "--context_length=32",
    "--num_layers=2",
    "--num_heads=2",
    "--hidden_size=32",
    "--ffn.intermediate_size=64",
    "--ffn.num_experts=64",
    "--ffn.num_experts_per_token=4",
    "--batch_size=8",
    "--steps=10",
    "--warmup_steps=2",
    "--log_every=2",
    "--eval_every=5",
    "--eval_batches=2",
    "--checkpoint_every=5",
]


def shrunk_config(*extra: str):
    """The tiny preset with SHRUNK and `extra` overrides applied."""
    return apply_overrides(get_preset("tiny"), parse_overrides([*SHRUNK, *extra]))


def lower_for_cuda(fn, *args) -> jax.stages.Lowered:
    """`fn` jitted and lowered for CUDA on this (CPU) host, for arguments shaped like `args` (arrays or
    ShapeDtypeStructs): Pallas -> Triton IR for the GPU, which fails on anything Triton cannot lower."""
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    return jax.jit(fn).trace(*structs).lower(lowering_platforms=("cuda",))
