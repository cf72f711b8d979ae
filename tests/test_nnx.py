"""Using the layers from Flax NNX (omnimoe_jax.nnx), and the README's NNX training example."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import run_readme_block

from omnimoe_jax import LMConfig, OmniMoE, OmniMoEConfig, TransformerLM
from omnimoe_jax import nnx as omnimoe_nnx
from omnimoe_jax.testing import assert_close

CONFIG = OmniMoEConfig(hidden_size=16, intermediate_size=32, num_experts=16, num_experts_per_token=4)


def test_the_nnx_layer_computes_what_the_linen_layer_does(seed):
    x = jax.random.normal(jax.random.key(seed), (2, 8, 16))
    layer = omnimoe_nnx.Linen(OmniMoE(CONFIG), x, rngs=nnx.Rngs(seed))
    variables = {
        "params": nnx.to_pure_dict(nnx.state(layer, nnx.Param))["layer"],
        "batch_stats": nnx.to_pure_dict(nnx.state(layer, nnx.BatchStat))["layer"],
    }
    assert_close(layer(x), OmniMoE(CONFIG).apply(variables, x), jnp.float32, what="eval")
    expected, updates = OmniMoE(CONFIG).apply(variables, x, train=True, mutable=["batch_stats"])
    assert_close(layer(x, train=True), expected, jnp.float32, what="train")
    # The running statistics were updated in place, exactly as linen returns them.
    after = nnx.to_pure_dict(nnx.state(layer, nnx.BatchStat))["layer"]
    jax.tree.map(np.testing.assert_array_equal, after, jax.device_get(updates["batch_stats"]))
    norm = after["router"]["router_norm_x"]
    assert int(norm["num_batches_tracked"]) == 1


def test_a_language_model_trains_a_step_with_nnx_optimizer():
    config = LMConfig(context_length=8, num_layers=1, num_heads=2, hidden_size=16, dense_intermediate_size=32)
    config = config.replace(ffn=OmniMoEConfig(16, 32, 16, 4))
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 259)
    model = omnimoe_nnx.Linen(TransformerLM(config), tokens[:, :-1], rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, tokens):
        def loss_fn(model):
            logits = model(tokens[:, :-1], train=True)  # [B, L, V]
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    losses = [float(step(model, optimizer, tokens)) for _ in range(3)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), before, nnx.state(model, nnx.Param))
    assert min(jax.tree.leaves(moved)) > 0  # every parameter took the update
    stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))["layer"]
    assert int(stats["layer_0"]["ffn"]["router"]["router_norm_x"]["num_batches_tracked"]) == 3


def test_a_non_linen_module_is_refused():
    with pytest.raises(TypeError, match=r"module must be a flax\.linen Module, got function"):
        omnimoe_nnx.Linen(lambda x: x, jnp.ones(3), rngs=nnx.Rngs(0))


def test_the_readme_nnx_example_runs():
    stdout = run_readme_block("nnx")
    assert stdout.strip().endswith("1"), stdout
