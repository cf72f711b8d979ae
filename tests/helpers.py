"""Shared test helpers: random inputs, meshes, Triton call counts, the router's brute force; the numerics come
from omnimoe_jax.testing."""

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

__all__ = [
    "TOLERANCE",
    "assert_close",
    "assert_trees_close",
    "check_gradients_by_finite_differences",
    "count_triton_calls",
    "cpu_mesh",
    "normal",
    "omni_router_brute_force",
    "rel_error",
    "run_readme_block",
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
