"""Each activation against jax.nn and its written-out derivative against jax.grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import normal

from pallas_kernels.activations import ACTIVATIONS, get_activation

JAX_NN = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda s: jax.nn.gelu(s, approximate=False),
    "gelu_pytorch_tanh": lambda s: jax.nn.gelu(s, approximate=True),
    "gelu_new": lambda s: jax.nn.gelu(s, approximate=True),
    "gelu_fast": lambda s: jax.nn.gelu(s, approximate=True),
    "quick_gelu": lambda s: s * jax.nn.sigmoid(1.702 * s),
    "relu": jax.nn.relu,
    "relu2": lambda s: jnp.square(jax.nn.relu(s)),
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "linear": lambda s: s,
}


def test_every_activation_has_an_independent_forward():
    assert set(JAX_NN) == set(ACTIVATIONS)


@pytest.mark.parametrize("name", sorted(JAX_NN))
def test_forward_matches_jax_nn(name, key):
    s = normal(key, (4096,), scale=4.0)
    np.testing.assert_allclose(ACTIVATIONS[name].forward(s), JAX_NN[name](s), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_derivative_matches_autodiff(name, key):
    act = ACTIVATIONS[name]
    s = normal(key, (4096,), scale=4.0)
    expected = jax.vmap(jax.grad(act.forward))(s)
    np.testing.assert_allclose(act.derivative(s), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_derivative_at_zero_matches_autodiff(name):
    # The kinks (relu's at 0) are where a hand-written derivative and autodiff can disagree: the kernels
    # use the former, implementation="xla" the latter, so all-zero rows would get different gradients.
    act = ACTIVATIONS[name]
    zero = jnp.zeros((1,), jnp.float32)
    np.testing.assert_allclose(act.derivative(zero), jax.vmap(jax.grad(act.forward))(zero), rtol=1e-6, atol=0)
    np.testing.assert_allclose(act.derivative(zero), jax.vmap(jax.grad(JAX_NN[name]))(zero), rtol=1e-6, atol=0)


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match=r"activation='swishy'.*silu"):
        get_activation("swishy")
