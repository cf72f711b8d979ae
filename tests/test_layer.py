"""The reference OmniMoE layer against the float64 per-token loop in tests/oracle.py."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, check_gradients_by_finite_differences, normal
from oracle import decisive_inputs, omnimoe_forward

from omnimoe_jax import CartesianRouter, OmniMoE, OmniMoEConfig, RouterBatchNorm, TorchBatchNorm
from omnimoe_jax._router import RoutingResult, by_score
from omnimoe_jax.convert import from_torch_state_dict
from pallas_kernels.omni_router import kernel as router_kernel


def small_config(**changes):
    fields = dict(hidden_size=32, intermediate_size=48, num_experts=64, num_experts_per_token=6, implementation="xla")
    fields.update(changes)
    return OmniMoEConfig(**fields)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"norm_topk_prob": True},
        {"router_norm": "none"},
        {"hidden_act": "gelu", "num_experts": 9, "num_experts_per_token": 9},
        {"hidden_act": "gelu_pytorch_tanh", "num_experts_per_token": 1},
        {"hidden_act": "relu", "num_experts": 16, "num_experts_per_token": 16},
    ],
)
@pytest.mark.parametrize("train", [False, True])
def test_layer_matches_per_token_loop(changes, train, seed):
    config = small_config(**changes)
    state, x = decisive_inputs(seed, config, 40, train=train)
    variables = from_torch_state_dict(state, config)
    want_y, want_idx, want_w, want_stats = omnimoe_forward(state, config, x, train=train)
    model = OmniMoE(config)
    if train:
        (y, routing), updates = model.apply(
            variables, jnp.asarray(x), train=True, return_routing=True, mutable=["batch_stats"]
        )
    else:
        y, routing = model.apply(variables, jnp.asarray(x), return_routing=True)
    np.testing.assert_array_equal(routing.indices, want_idx)
    assert_close(routing.weights, want_w, jnp.float32, what="routing weights")
    assert_close(y, want_y, jnp.float32)
    if train and config.router_norm == "batchnorm":
        for axis in "xy":
            stats = updates["batch_stats"]["router"][f"router_norm_{axis}"]
            for name in ("running_mean", "running_var"):
                assert_close(stats[name], want_stats[f"router_norm_{axis}.{name}"], jnp.float32, what=name)
            before = state[f"router_norm_{axis}.num_batches_tracked"]
            assert int(stats["num_batches_tracked"]) == int(before) + 1


def test_norm_topk_prob_weights_sum_to_one(key):
    config = small_config(norm_topk_prob=True)
    x = normal(key, (3, 5, config.hidden_size))
    model = OmniMoE(config)
    variables = model.init(jax.random.key(1), x)
    _, routing = model.apply(variables, x, return_routing=True)
    np.testing.assert_allclose(routing.weights.sum(-1), 1.0, rtol=1e-6)
    plain = OmniMoE(small_config())
    _, raw = plain.apply(variables, x, return_routing=True)
    assert float(raw.weights.sum(-1).max()) < 1.0  # the product of two probabilities, K < N of them


def test_eval_uses_running_statistics_and_train_uses_the_batch(key):
    config = small_config()
    x = normal(key, (64, config.hidden_size), scale=3.0) + 2.0
    model = OmniMoE(config)
    variables = model.init(jax.random.key(1), x)
    y_eval = model.apply(variables, x)
    y_train, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(y_eval, y_train), "train and eval must normalise the router logits differently"
    # A fresh layer's running stats are (0, 1): eval normalisation is the identity on the logits.
    _, routing = model.apply(variables, x, return_routing=True)
    raw = x @ variables["params"]["router"]["router_gate_x"]["kernel"]
    np.testing.assert_allclose(routing.logits_x, raw / np.sqrt(1 + config.router_norm_eps), rtol=1e-5, atol=1e-5)
    moved = updates["batch_stats"]["router"]["router_norm_x"]["running_mean"]
    np.testing.assert_allclose(moved, 0.1 * raw.mean(0), rtol=1e-5, atol=1e-6)


def test_init_does_not_count_a_batch(key):
    config = small_config()
    variables = OmniMoE(config).init(jax.random.key(0), normal(key, (8, config.hidden_size)), train=True)
    stats = variables["batch_stats"]["router"]["router_norm_x"]
    assert int(stats["num_batches_tracked"]) == 0
    np.testing.assert_array_equal(stats["running_mean"], 0.0)


def test_the_router_norm_keeps_its_old_name_and_torchs_buffers(key):
    # RouterBatchNorm is the old name of TorchBatchNorm: code and converters importing it build the same module,
    # whose only variables are torch's three BatchNorm1d buffers (no affine parameters).
    assert RouterBatchNorm is TorchBatchNorm
    variables = TorchBatchNorm(num_features=5).init(jax.random.key(0), normal(key, (8, 5)), train=True)
    assert set(variables) == {"batch_stats"}
    assert {name: v.shape for name, v in variables["batch_stats"].items()} == {
        "running_mean": (5,),
        "running_var": (5,),
        "num_batches_tracked": (),
    }


@pytest.mark.parametrize("lead", [(), (7,), (2, 3), (2, 1, 4)])
def test_any_leading_dims_under_jit(lead, key):
    config = small_config()
    model = OmniMoE(config)
    x = normal(key, (*lead, config.hidden_size))
    flat = x.reshape(-1, config.hidden_size)
    variables = model.init(jax.random.key(1), flat)
    y, routing = jax.jit(lambda v, a: model.apply(v, a, return_routing=True))(variables, x)
    assert y.shape == x.shape
    assert routing.indices.shape == (*lead, config.num_experts_per_token)
    assert routing.logits_x.shape == (*lead, config.num_expert_sqrt)
    np.testing.assert_allclose(y.reshape(flat.shape), model.apply(variables, flat), rtol=1e-5, atol=1e-6)


def test_bf16_layer_is_finite_and_close_to_f32(key):
    config = small_config(num_experts=256, num_experts_per_token=16)
    x = normal(key, (2, 64, config.hidden_size))
    variables = OmniMoE(config).init(jax.random.key(1), x)
    y32 = OmniMoE(config).apply(variables, x)
    y16 = OmniMoE(config.replace(dtype="bfloat16")).apply(variables, x)
    assert y16.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(y16)))
    # Routing may flip for near-tied experts in bf16, so compare loosely: the shared MLP dominates.
    assert float(jnp.linalg.norm(y16.astype(jnp.float32) - y32) / jnp.linalg.norm(y32)) < 5e-2


@pytest.mark.parametrize("train", [False, True])
def test_gradients_of_every_parameter_and_input_by_finite_differences(train, seed):
    config = small_config(num_experts=16, num_experts_per_token=5, dtype="float64", param_dtype="float64")
    with jax.enable_x64(True):
        state, x = decisive_inputs(seed, config, 12, train=train)
        variables = from_torch_state_dict(state, config)
        model = OmniMoE(config)

        def loss(params, tokens):
            out = model.apply({**variables, "params": params}, tokens, train=train, mutable=["batch_stats"])[0]
            return jnp.sum(jnp.sin(out))  # a non-linear readout so every output element matters differently

        check_gradients_by_finite_differences(loss, variables["params"], x)


def test_input_with_the_wrong_width_is_refused(key):
    model = OmniMoE(small_config())
    with pytest.raises(ValueError, match=r"x must be \[..., hidden_size=32\], got shape \(4, 31\)"):
        model.init(key, jnp.zeros((4, 31)))


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_zero_tokens_give_an_empty_result(lead, key):
    config = small_config()
    model = OmniMoE(config)
    variables = model.init(key, jnp.ones((4, config.hidden_size)))
    x = jnp.zeros((*lead, config.hidden_size))
    y, routing = jax.jit(lambda v, a: model.apply(v, a, return_routing=True))(variables, x)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert routing.indices.shape == (*lead, config.num_experts_per_token)
    # Nothing to differentiate through: every parameter's gradient is zero (and finite).
    grads = jax.grad(lambda p: model.apply({**variables, "params": p}, x).sum())(variables["params"])
    for g in jax.tree.leaves(grads):
        np.testing.assert_array_equal(g, 0.0)


def test_complex_input_is_refused(key):
    # A cast to float32 would silently drop the imaginary part.
    model = OmniMoE(small_config())
    x = jnp.ones((4, 32), jnp.complex64) * (1 + 2j)
    with pytest.raises(TypeError, match="x has dtype complex64: a real input is expected"):
        model.init(key, x)


def test_training_on_one_token_is_refused(key):
    config = small_config()
    model = OmniMoE(config)
    variables = model.init(key, jnp.ones((4, config.hidden_size)))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        model.apply(variables, jnp.ones((1, config.hidden_size)), train=True, mutable=["batch_stats"])


class TwoDenseGates(nn.Module):
    """The router's first steps written the plain way: one nn.Dense per axis, BatchNorm, log_softmax."""

    config: OmniMoEConfig

    @nn.compact
    def __call__(self, tokens, *, train):
        cfg, n = self.config, self.config.num_expert_sqrt
        out = []
        for axis in "xy":
            gate = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=f"router_gate_{axis}")
            logits = nn.Dense(n, **gate)(tokens).astype(jnp.float32)
            norm = RouterBatchNorm(num_features=n, name=f"router_norm_{axis}")
            out.append(jax.nn.log_softmax(norm(logits, train=train), axis=-1))
        return out


@pytest.mark.parametrize("train", [False, True])
def test_router_gates_are_one_matmul_with_two_dense_gates_parameters(train, key):
    # The two gates run as one [d, 2n] matmul, but parameters (names, shapes, initial values), batch
    # statistics and log-probabilities are those of two nn.Dense gates with their own BatchNorms.
    config = small_config()
    tokens = normal(key, (64, config.hidden_size), scale=2.0) + 1.0
    router = CartesianRouter(config)
    variables = router.init(jax.random.key(3), tokens)
    plain = TwoDenseGates(config).init(jax.random.key(3), tokens, train=False)
    assert jax.tree.structure(variables) == jax.tree.structure(plain)
    jax.tree.map(np.testing.assert_array_equal, variables, plain)
    routing, stats = router.apply(variables, tokens, train=train, mutable=["batch_stats"])
    (want_x, want_y), want_stats = TwoDenseGates(config).apply(variables, tokens, train=train, mutable=["batch_stats"])
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6), stats, want_stats)
    np.testing.assert_allclose(jax.nn.log_softmax(routing.logits_x), want_x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.nn.log_softmax(routing.logits_y), want_y, rtol=1e-6, atol=1e-6)
    hlo = jax.jit(lambda v, t: router.apply(v, t, train=train, mutable=["batch_stats"])).lower(variables, tokens)
    assert hlo.as_text().count("stablehlo.dot_general") == 1, "both gates must be one matmul"


def test_by_score_orders_as_the_router_kernels_sort():
    # The IEEE total order of the kernels' own sort (`kernel.sort_by_score`): NaN above +inf, +0.0 above -0.0,
    # ties by the lower index; weights travel with their entries.
    scores = jnp.array([[-1.0, jnp.nan, 0.0, -0.0, 2.0, -1.0, jnp.inf]], jnp.float32)
    indices = jnp.array([[5, 0, 3, 1, 6, 2, 4]], jnp.int32)
    weights = jnp.arange(7, dtype=jnp.float32)[None]
    zeros = jnp.zeros((1, 4), jnp.float32)
    got = by_score(RoutingResult(scores, indices, weights, zeros, zeros))
    want_scores, want_indices = router_kernel.sort_by_score(scores, indices)
    np.testing.assert_array_equal(got.indices, want_indices)
    np.testing.assert_array_equal(np.asarray(got.scores).view(np.int32), np.asarray(want_scores).view(np.int32))
    np.testing.assert_array_equal(got.indices, [[0, 4, 6, 3, 1, 2, 5]])
    np.testing.assert_array_equal(got.weights, [[1.0, 6.0, 4.0, 2.0, 3.0, 5.0, 0.0]])
