"""Numerical checks the test suite and the notebooks share: the per-dtype tolerance table and relative error.

Public so that a notebook, a benchmark or a user's own test measures agreement with a reference exactly as
this project's tests do:

    from omnimoe_jax.testing import assert_close
    assert_close(kernel_out, reference_out, jnp.bfloat16, what="y")
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# ||out - ref|| / ||ref|| allowed for a result computed with inputs of this dtype (the reference in f32/f64).
TOLERANCE = {
    jnp.dtype(jnp.float64): 1e-10,
    jnp.dtype(jnp.float32): 1e-5,
    jnp.dtype(jnp.bfloat16): 2e-2,
}


def tolerance(dtype) -> float:
    """The relative error allowed for a result computed with inputs of `dtype` (a key of TOLERANCE)."""
    dtype = jnp.dtype(dtype)
    if dtype not in TOLERANCE:
        raise ValueError(f"dtype={dtype.name}: no tolerance for it; expected one of {[d.name for d in TOLERANCE]}")
    return TOLERANCE[dtype]


def _as_float64(a) -> np.ndarray:
    a = jnp.asarray(a)
    # NumPy has no bfloat16 arithmetic: widen through float32 first.
    return np.asarray(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, np.float64)


def rel_error(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64. Raises ValueError for mismatched shapes, a non-finite `out`, or an
    all-zero `ref` (against which any comparison would prove nothing)."""
    out, ref = _as_float64(out), _as_float64(ref)
    if out.shape != ref.shape:
        raise ValueError(f"out has shape {out.shape} but ref has shape {ref.shape}; expected equal shapes")
    if not np.all(np.isfinite(out)):
        raise ValueError(f"out has {int(np.sum(~np.isfinite(out)))} non-finite values; expected all finite")
    denom = np.linalg.norm(ref)
    if denom == 0:
        raise ValueError("ref is all zeros: a relative error against it would prove nothing")
    return float(np.linalg.norm(out - ref) / denom)


def assert_close(out, ref, dtype, *, what: str = "output") -> None:
    """Raise AssertionError when rel_error(out, ref) exceeds tolerance(dtype); `what` names the compared value."""
    err = rel_error(out, ref)
    tol = tolerance(dtype)
    if err > tol:
        raise AssertionError(f"{what}: relative error {err:.3e} > {tol:.1e} ({jnp.dtype(dtype).name})")
