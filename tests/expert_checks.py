"""Inputs and the reference comparison shared by the CPU (interpret) and GPU tests of omni_expert's kernels."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from helpers import assert_close

from pallas_kernels import omni_expert, omni_expert_reference


@dataclasses.dataclass(frozen=True)
class ExpertInputs:
    x: jax.Array  # [T, d]
    up: jax.Array  # [N, d]
    down: jax.Array  # [N, d]
    weights: jax.Array  # [T, K] f32
    indices: jax.Array  # [T, K] int32
    cotangent: jax.Array  # [T, d], a random dy


def expert_inputs(seed, tokens, top_k, num_experts, d, dtype, *, hot_expert=None) -> ExpertInputs:
    """Fresh random inputs from `seed`; `hot_expert` makes every token choose that expert (in its first slot).

    Drawn with numpy: jax.random would compile a program per shape, which dominates these small tests.
    """
    rng = np.random.default_rng(seed)

    def normal(shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape, np.float32), dtype)

    indices = rng.integers(0, num_experts, (tokens, top_k), dtype=np.int32)
    if hot_expert is not None:
        indices[:, 0] = hot_expert
    return ExpertInputs(
        x=normal((tokens, d)),
        # Rows ~ N(0, 1/d), as the layer initialises them: u . x is O(1), so act(s) is far from linear.
        up=normal((num_experts, d), d**-0.5),
        down=normal((num_experts, d), d**-0.5),
        weights=jnp.asarray(rng.uniform(0.1, 1.0, (tokens, top_k)), jnp.float32),
        indices=jnp.asarray(indices),
        cotangent=normal((tokens, d)),
    )


def _value_and_grads(fn, inputs: ExpertInputs, cast=None):
    """y and (dx, d_up, d_down, d_weights) of fn(x, up, down, weights) for the cotangent, in one jit."""
    primals = (inputs.x, inputs.up, inputs.down, inputs.weights)
    cotangent = inputs.cotangent
    if cast is not None:
        primals = tuple(p.astype(cast) for p in primals)
        cotangent = cotangent.astype(cast)

    @jax.jit
    def run(primals, cotangent):
        y, vjp = jax.vjp(fn, *primals)
        return y, vjp(cotangent)

    return run(primals, cotangent)


def check_against_reference(inputs: ExpertInputs, *, interpret: bool, config=None, activation="silu") -> None:
    """Pallas forward and all four gradients vs the f32 reference; untouched table-gradient rows exactly 0."""
    indices = inputs.indices

    def pallas(x, up, down, weights):
        return omni_expert(
            x,
            up,
            down,
            weights,
            indices,
            activation=activation,
            implementation="pallas",
            interpret=interpret,
            config=config,
        )

    def reference(x, up, down, weights):
        return omni_expert_reference(x, up, down, weights, indices, activation=activation)

    y, grads = _value_and_grads(pallas, inputs)
    # The reference sees the same (rounded) values in f32; matmuls run at HIGHEST (tests/conftest.py).
    want_y, want_grads = _value_and_grads(reference, inputs, cast=jnp.float32)
    dtype = inputs.x.dtype
    assert y.dtype == dtype
    assert_close(y, want_y, dtype, what="y")
    names = ("dx", "d_up", "d_down", "d_weights")
    primals = (inputs.x, inputs.up, inputs.down, inputs.weights)
    for name, got, want, primal in zip(names, grads, want_grads, primals, strict=True):
        assert got.dtype == primal.dtype and got.shape == primal.shape, (name, got.dtype, got.shape)
        assert_close(got, want, dtype, what=name)
    untouched = ~np.isin(np.arange(inputs.up.shape[0]), np.asarray(indices))
    for name, got in (("d_up", grads[1]), ("d_down", grads[2])):
        rows = np.asarray(got[untouched].astype(jnp.float32))
        assert np.all(rows == 0), f"{name}: rows of experts no token chose must be exactly zero"
