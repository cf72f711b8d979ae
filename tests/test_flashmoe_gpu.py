"""FlashMoE with the Pallas kernels natively on a GPU (`python -m pytest -m gpu`): the whole layer's output,
router_logits, BatchNorm updates and every gradient with implementation "pallas" against "xla", in train and
eval mode, up to the paper's N and K."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, assert_trees_close, normal

from omnimoe_jax import FlashMoE, FlashMoEConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU"),
]

F32, BF16 = jnp.float32, jnp.bfloat16

SHAPES = [
    # (T, d, I, N, K, dtype)
    (512, 256, 512, 4096, 16, F32),
    (512, 256, 512, 4096, 16, BF16),
    (1000, 1024, 4096, 16384, 64, BF16),  # the seed's quick start (N = 16384, K = 64); T no tile multiple
    (1024, 1024, 1024, 102400, 512, BF16),  # the paper's N = 320^2 and K = 512 (K > n)
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(("tokens", "d", "inter", "num_experts", "top_k", "dtype"), SHAPES)
def test_pallas_matches_xla(tokens, d, inter, num_experts, top_k, dtype, train, key):
    xla = FlashMoEConfig(d, inter, "silu", num_experts, top_k, dtype=dtype, implementation="xla")
    x = normal(key, (tokens, d), dtype) + 0.5
    variables = jax.jit(FlashMoE(xla).init)(jax.random.key(1), x)

    def run(config):
        model = FlashMoE(config)

        @jax.jit
        def value_and_grads(params, x):
            def loss(params, x):
                (y, logits), state = model.apply(
                    {**variables, "params": params}, x, train=train, mutable=["batch_stats"]
                )
                readout = jnp.sum(jnp.sin(y.astype(F32))) + jnp.sum(jnp.cos(logits))
                return readout, (y, logits, state["batch_stats"])

            (_, outputs), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
            return outputs, grads

        return value_and_grads(variables["params"], x)

    (want_y, want_logits, want_stats), want_grads = run(xla)
    (y, logits, stats), grads = run(xla.replace(implementation="pallas"))
    assert_close(y, want_y, dtype)
    assert_close(logits, want_logits, F32 if dtype == F32 else dtype, what="router_logits")
    for name in ("running_mean", "running_var"):
        got, want = stats["router_norm"][name], want_stats["router_norm"][name]
        if train:
            assert_close(got, want, F32, what=name)
        else:  # eval reads the running statistics and leaves them as initialised (a zero mean)
            np.testing.assert_array_equal(got, variables["batch_stats"]["router_norm"][name], err_msg=name)
            np.testing.assert_array_equal(want, variables["batch_stats"]["router_norm"][name], err_msg=name)
    assert_trees_close(grads, want_grads, dtype, what="gradient ")
