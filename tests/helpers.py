"""Shared test helpers: random inputs, meshes, Triton call counts; the numerics come from omnimoe_jax.testing."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from omnimoe_jax.testing import TOLERANCE, assert_close, rel_error, tolerance

__all__ = ["TOLERANCE", "assert_close", "count_triton_calls", "cpu_mesh", "normal", "rel_error", "tolerance"]

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
