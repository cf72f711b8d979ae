"""Shared test numerics: the per-dtype tolerance table, relative error, random inputs."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

# ||out - ref|| / ||ref|| allowed for a result computed with inputs of this dtype (the reference in f32/f64).
TOLERANCE = {
    jnp.dtype(jnp.float64): 1e-10,
    jnp.dtype(jnp.float32): 1e-5,
    jnp.dtype(jnp.bfloat16): 2e-2,
}


def tolerance(dtype) -> float:
    return TOLERANCE[jnp.dtype(dtype)]


def rel_error(out, ref) -> float:
    out = np.asarray(jnp.asarray(out, jnp.float32) if jnp.asarray(out).dtype == jnp.bfloat16 else out, np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32) if jnp.asarray(ref).dtype == jnp.bfloat16 else ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.all(np.isfinite(out)), "output has non-finite values"
    denom = np.linalg.norm(ref)
    assert denom > 0, "reference is all zeros: the comparison would prove nothing"
    return float(np.linalg.norm(out - ref) / denom)


def assert_close(out, ref, dtype, *, what: str = "output") -> None:
    err = rel_error(out, ref)
    tol = tolerance(dtype)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({jnp.dtype(dtype).name})"


# A Pallas kernel in lowered StableHLO: jax 0.10 names the custom call one way, 0.11 the other.
_TRITON_CALL = re.compile(r"custom_call @(__gpu\$xla\.gpu\.triton|triton_kernel_call_ffi)")


def count_triton_calls(lowered_text: str) -> int:
    """How many Triton kernel launches a program lowered for CUDA (`.lower(...).as_text()`) contains."""
    return len(_TRITON_CALL.findall(lowered_text))


def normal(key, shape, dtype=jnp.float32, scale=1.0):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def cpu_mesh(spec):
    """A ("data", "expert") mesh from a spec such as "data=2,expert=4" over the 8 CPU devices of
    tests/conftest.py (also on a GPU machine, where they are not the default devices)."""
    from omnimoe_jax import parallel

    return parallel.make_mesh(spec, devices=jax.devices("cpu"))
