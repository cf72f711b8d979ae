"""The small argument checks every op's `api` (and tile config) shares. Each raises naming the argument."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The dtypes the Pallas kernels take; the "xla" paths take any float.
KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def is_int(value: Any) -> bool:
    """A Python int that is not a bool (`True` is an int to Python, never a size here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_power_of_two(value: Any) -> bool:
    """A positive int (not a bool) with one bit set, as Triton block sizes and warp counts must be."""
    return is_int(value) and value >= 1 and value & (value - 1) == 0


def check_float_arrays(**arrays: Any) -> None:
    """TypeError naming the first of `arrays` (argument name -> array) whose dtype is not floating."""
    for name, arr in arrays.items():
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise TypeError(f"{name} must be a float array, got dtype {arr.dtype}")


def check_integer_array(name: str, arr: Any) -> None:
    """TypeError unless `arr` (the argument `name`) has an integer dtype."""
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")


def check_concrete_indices(indices: Any, num_experts: int) -> None:
    """ValueError for out-of-range indices the caller can see (eager calls): the kernels would read outside
    the tables and the references' jnp.take would return NaN rows. Inside jit (tracers) or across processes
    (not fully addressable) nothing can be checked without a host round trip; the docstring states the
    contract."""
    try:
        if isinstance(indices, jax.Array) and not indices.is_fully_addressable:
            return
        values = np.asarray(indices)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    if values.size == 0:
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= num_experts:
        raise ValueError(f"indices must be in [0, N={num_experts}), got values in [{low}, {high}]")


def check_kernel_dtype(name: str, arr: Any) -> None:
    """TypeError unless `arr` (the argument `name`) is f32 or bf16, the kernels' dtypes."""
    if jnp.dtype(arr.dtype) not in KERNEL_DTYPES:
        raise TypeError(
            f"{name} has dtype {arr.dtype}; implementation='pallas' takes float32 or bfloat16 "
            "(use implementation='xla' for others)"
        )
