"""Activation functions by their Hugging Face `ACT2FN` names, each with its derivative written out.

The seed model picks its activation with `transformers.activations.ACT2FN[hidden_act]`; the same names mean
the same functions here ("gelu" is the exact erf form, "gelu_pytorch_tanh" the tanh approximation). The
expert kernels recompute act(s) and act'(s) in the backward pass instead of storing activations, and a
Pallas kernel body cannot call autodiff, so every activation carries an explicit derivative (tests check
each one against `jax.grad`). Only elementwise `jnp`/`lax` operations that Triton lowers are used.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = 0.044715


@dataclasses.dataclass(frozen=True)
class Activation:
    """An elementwise activation: `forward(s)` and its derivative `derivative(s)` = d forward / d s."""

    name: str
    forward: Callable[[jax.Array], jax.Array]
    derivative: Callable[[jax.Array], jax.Array]


def _sigmoid(s):
    # Written with exp rather than jax.nn.sigmoid so it lowers to plain Triton math everywhere.
    return 1.0 / (1.0 + jnp.exp(-s))


def _silu(s):
    return s * _sigmoid(s)


def _silu_derivative(s):
    sig = _sigmoid(s)
    return sig * (1.0 + s * (1.0 - sig))


def _gelu(s):
    return 0.5 * s * (1.0 + jax.lax.erf(s * _INV_SQRT_2))


def _gelu_derivative(s):
    cdf = 0.5 * (1.0 + jax.lax.erf(s * _INV_SQRT_2))
    pdf = jnp.exp(-0.5 * s * s) * _INV_SQRT_2PI
    return cdf + s * pdf


def _gelu_tanh(s):
    inner = _SQRT_2_OVER_PI * (s + _GELU_TANH_C * s * s * s)
    return 0.5 * s * (1.0 + jnp.tanh(inner))


def _gelu_tanh_derivative(s):
    inner = _SQRT_2_OVER_PI * (s + _GELU_TANH_C * s * s * s)
    t = jnp.tanh(inner)
    d_inner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * s * s)
    return 0.5 * (1.0 + t) + 0.5 * s * (1.0 - t * t) * d_inner


def _quick_gelu(s):
    return s * _sigmoid(1.702 * s)


def _quick_gelu_derivative(s):
    sig = _sigmoid(1.702 * s)
    return sig + 1.702 * s * sig * (1.0 - sig)


def _relu(s):
    # jax.nn.relu, not jnp.maximum: autodiff of a max gives 1/2 at s = 0, torch and _relu_derivative give 0,
    # and the reference's gradient must equal the kernels' (zero rows, padding) there too.
    return jax.nn.relu(s)


def _relu_derivative(s):
    return jnp.where(s > 0, 1.0, 0.0).astype(s.dtype)


def _relu2(s):
    r = jnp.maximum(s, 0.0)
    return r * r


def _relu2_derivative(s):
    return 2.0 * jnp.maximum(s, 0.0)


def _sigmoid_derivative(s):
    sig = _sigmoid(s)
    return sig * (1.0 - sig)


def _tanh_derivative(s):
    t = jnp.tanh(s)
    return 1.0 - t * t


def _linear(s):
    return s


def _linear_derivative(s):
    return jnp.ones_like(s)


def _table() -> dict[str, Activation]:
    entries = [
        ("silu", _silu, _silu_derivative),
        ("swish", _silu, _silu_derivative),
        ("gelu", _gelu, _gelu_derivative),
        ("gelu_pytorch_tanh", _gelu_tanh, _gelu_tanh_derivative),
        # ACT2FN's "gelu_new" and "gelu_fast" compute the same tanh approximation as "gelu_pytorch_tanh".
        ("gelu_new", _gelu_tanh, _gelu_tanh_derivative),
        ("gelu_fast", _gelu_tanh, _gelu_tanh_derivative),
        ("quick_gelu", _quick_gelu, _quick_gelu_derivative),
        ("relu", _relu, _relu_derivative),
        ("relu2", _relu2, _relu2_derivative),
        ("sigmoid", _sigmoid, _sigmoid_derivative),
        ("tanh", jnp.tanh, _tanh_derivative),
        ("linear", _linear, _linear_derivative),
    ]
    return {name: Activation(name, f, df) for name, f, df in entries}


ACTIVATIONS: dict[str, Activation] = _table()


def get_activation(name: str) -> Activation:
    """The activation called `name` (a transformers `ACT2FN` name); ValueError listing the known names."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
