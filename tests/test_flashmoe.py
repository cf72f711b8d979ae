"""FlashMoE (flash-algo/flash-moe's variant) against the float64 per-token loop of tests/oracle.py, its gradients,
its input BatchNorm, the seed's checkpoint keys, the Pallas kernels in interpret mode, and its config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, assert_trees_close, check_gradients_by_finite_differences, cpu_mesh, normal
from oracle import flashmoe_forward, flashmoe_routing_margin, random_flashmoe_state_dict

from omnimoe_jax import FlashMoE, FlashMoEConfig, OmniMoEConfig, parallel
from omnimoe_jax.convert import from_torch_state_dict, to_torch_state_dict

SEED_KEYS = [  # the seed module's state_dict, in its order
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
    "router_gate.weight",
    "router_norm.running_mean",
    "router_norm.running_var",
    "router_norm.num_batches_tracked",
    "down_embed.weight",
    "up_embed.weight",
]


def small_config(**changes):
    fields = dict(
        hidden_size=32,
        intermediate_size=48,
        hidden_act="silu",
        num_experts=64,
        num_experts_per_tok=6,
        implementation="xla",
    )
    fields.update(changes)
    return FlashMoEConfig(**fields)


def decisive_inputs(seed, config, tokens, *, train, shift=0.0):
    """A random seed-layout state dict and tokens whose routing is far from a tie."""
    rng = np.random.default_rng(seed)
    for _ in range(20):
        state = random_flashmoe_state_dict(rng, config)
        # Off-centre tokens with uneven feature scales: batch and running statistics differ clearly.
        scale = rng.uniform(0.5, 2.0, config.hidden_size)
        x = (shift + scale * rng.standard_normal((tokens, config.hidden_size))).astype(np.float32)
        if flashmoe_routing_margin(state, config, x, train=train) > 1e-4:
            return state, x
    raise AssertionError("could not draw inputs with a decisive routing")


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"norm_topk_prob": True},
        {"hidden_act": "gelu", "num_experts": 9, "num_experts_per_tok": 9},  # K = N
        {"hidden_act": "gelu_pytorch_tanh", "num_experts_per_tok": 1},
        {"hidden_act": "relu", "num_experts": 25, "num_experts_per_tok": 16},  # n = 5, K > n
    ],
)
@pytest.mark.parametrize("train", [False, True])
def test_layer_matches_per_token_loop(changes, train, seed):
    config = small_config(**changes)
    state, x = decisive_inputs(seed, config, 40, train=train, shift=0.5)
    variables = from_torch_state_dict(state, config)
    want_y, want_logits, want_idx, want_w, want_stats = flashmoe_forward(state, config, x, train=train)
    model = FlashMoE(config)

    @jax.jit
    def run(variables, x):  # one compile for both outputs
        plain, updates = model.apply(variables, x, train=train, mutable=["batch_stats"])
        (_, routing), _ = model.apply(variables, x, train=train, return_routing=True, mutable=["batch_stats"])
        return plain, routing, updates

    (y, router_logits), routing, updates = run(variables, jnp.asarray(x))
    np.testing.assert_array_equal(routing.indices, want_idx)
    assert_close(routing.weights, want_w, jnp.float32, what="routing weights")
    assert router_logits.shape == (2, 40, config.num_expert_sqrt)
    assert_close(router_logits, want_logits, jnp.float32, what="router_logits")
    assert_close(y, want_y, jnp.float32)
    stats = updates["batch_stats"]["router_norm"]
    before = state["router_norm.num_batches_tracked"]
    if train:
        for name in ("running_mean", "running_var"):
            assert_close(stats[name], want_stats[f"router_norm.{name}"], jnp.float32, what=name)
        assert int(stats["num_batches_tracked"]) == int(before) + 1
    else:  # eval reads the running statistics and leaves them alone
        np.testing.assert_array_equal(stats["running_mean"], state["router_norm.running_mean"])
        assert int(stats["num_batches_tracked"]) == int(before)


def test_batchnorm_running_statistics_follow_torchs_formulas_over_steps(seed):
    # Three training steps from a fresh layer (running mean 0, var 1), then eval: torch's BatchNorm1d moves
    # mean <- 0.9 mean + 0.1 batch_mean, var <- 0.9 var + 0.1 batch_var * T / (T - 1), counts the batches, and
    # eval normalises with the running statistics, eps = 1e-5.
    config = small_config()
    rng = np.random.default_rng(seed)
    batches = [(2.0 + 3.0 * rng.standard_normal((16, config.hidden_size))).astype(np.float32) for _ in range(3)]
    model = FlashMoE(config)
    variables = model.init(jax.random.key(0), batches[0])
    step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[1])
    mean, var = np.zeros(config.hidden_size), np.ones(config.hidden_size)
    for count, x in enumerate(batches, start=1):
        variables = {**variables, **step(variables, x)}
        x64 = x.astype(np.float64)
        mean = 0.9 * mean + 0.1 * x64.mean(0)
        var = 0.9 * var + 0.1 * x64.var(0, ddof=1)
        stats = variables["batch_stats"]["router_norm"]
        np.testing.assert_allclose(stats["running_mean"], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["running_var"], var, rtol=1e-5)
        assert int(stats["num_batches_tracked"]) == count
    x = batches[0]
    _, routing = model.apply(variables, x, return_routing=True)
    kernel = np.asarray(variables["params"]["router_gate"]["kernel"], np.float64)  # [d, 2n]
    want = ((x - mean) / np.sqrt(var + 1e-5)) @ kernel  # [T, 2n]
    n = config.num_expert_sqrt
    np.testing.assert_allclose(routing.logits_x, want[:, :n], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(routing.logits_y, want[:, n:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("train", [False, True])
def test_float64_layer_matches_the_loop_to_float64_precision(train, seed):
    # Regression (found by the seed parity check, tests/test_flashmoe_seed_parity.py): the running statistics
    # are stored in f32, and eval computed `var + eps` and the momentum step in f32 even in a float64 layer
    # (relative error ~5e-8 where torch's float64 module is exact). They are widened first now.
    config = small_config(num_experts=16, num_experts_per_tok=5, dtype="float64", param_dtype="float64")
    with jax.enable_x64(True):
        state, x = decisive_inputs(seed, config, 12, train=train, shift=0.5)
        state = {k: v.astype(np.float64) if k.endswith(".weight") else v for k, v in state.items()}
        x = x.astype(np.float64)
        want_y, want_logits, _, _, want_stats = flashmoe_forward(state, config, x, train=train)
        (y, router_logits), updates = FlashMoE(config).apply(
            from_torch_state_dict(state, config), jnp.asarray(x), train=train, mutable=["batch_stats"]
        )
        assert y.dtype == router_logits.dtype == jnp.float64
        assert_close(y, want_y, jnp.float64)
        assert_close(router_logits, want_logits, jnp.float64, what="router_logits")
        if train:  # computed in f64, stored in f32: the loop's statistics rounded to f32 once
            stats = updates["batch_stats"]["router_norm"]
            for name in ("running_mean", "running_var"):
                want = np.asarray(want_stats[f"router_norm.{name}"], np.float32)
                assert_close(stats[name], want, jnp.float64, what=name)


def test_init_does_not_count_a_batch(key):
    config = small_config()
    variables = FlashMoE(config).init(jax.random.key(0), normal(key, (8, config.hidden_size)), train=True)
    stats = variables["batch_stats"]["router_norm"]
    assert int(stats["num_batches_tracked"]) == 0
    np.testing.assert_array_equal(stats["running_mean"], 0.0)
    np.testing.assert_array_equal(stats["running_var"], 1.0)


@pytest.mark.parametrize("lead", [(), (2, 1, 4)])  # one token alone, and several leading dims
def test_any_leading_dims_give_the_seeds_shapes(lead, key):
    config = small_config()
    model = FlashMoE(config)
    x = normal(key, (*lead, config.hidden_size))
    flat = x.reshape(-1, config.hidden_size)
    variables = model.init(jax.random.key(1), flat)

    @jax.jit
    def run(v, a, flat):
        return model.apply(v, a), model.apply(v, a, return_routing=True), model.apply(v, flat)

    (y, router_logits), (y_again, routing), (y_flat, _) = run(variables, x, flat)
    tokens = flat.shape[0]
    assert y.shape == x.shape and router_logits.shape == (2, tokens, config.num_expert_sqrt)
    assert router_logits.dtype == jnp.float32
    np.testing.assert_array_equal(y_again, y)
    assert routing.indices.shape == (*lead, config.num_experts_per_tok)
    # The RoutingResult's two logits are router_logits' two axes.
    np.testing.assert_array_equal(routing.logits_x.reshape(tokens, -1), router_logits[0])
    np.testing.assert_array_equal(routing.logits_y.reshape(tokens, -1), router_logits[1])
    np.testing.assert_allclose(y.reshape(flat.shape), y_flat, rtol=1e-5, atol=1e-6)


def test_bf16_layer_is_finite_and_close_to_f32(key):
    config = small_config(num_experts=256, num_experts_per_tok=16)
    x = normal(key, (2, 64, config.hidden_size))
    variables = FlashMoE(config).init(jax.random.key(1), x)
    y32, _ = FlashMoE(config).apply(variables, x)
    y16, logits16 = FlashMoE(config.replace(dtype="bfloat16")).apply(variables, x)
    assert y16.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y16))) and bool(jnp.all(jnp.isfinite(logits16)))
    # Routing may flip for near-tied experts in bf16, so compare loosely: the shared MLP dominates.
    assert float(jnp.linalg.norm(y16.astype(jnp.float32) - y32) / jnp.linalg.norm(y32)) < 5e-2


@pytest.mark.parametrize("train", [False, True])
def test_gradients_of_every_parameter_and_input_by_finite_differences(train, seed):
    config = small_config(num_experts=16, num_experts_per_tok=5, dtype="float64", param_dtype="float64")
    with jax.enable_x64(True):
        state, x = decisive_inputs(seed, config, 12, train=train)
        variables = from_torch_state_dict(state, config)
        model = FlashMoE(config)

        def loss(params, tokens):
            (y, router_logits), _ = model.apply(
                {**variables, "params": params}, tokens, train=train, mutable=["batch_stats"]
            )
            # Non-linear readouts of both outputs, so every element matters differently.
            return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(router_logits))

        check_gradients_by_finite_differences(loss, variables["params"], x)


def test_pallas_kernels_in_interpret_mode_match_xla(seed):
    # On a CPU implementation="pallas" runs the router and expert kernels in Pallas interpret mode.
    config = small_config(implementation="pallas")
    state, x = decisive_inputs(seed, config, 24, train=True)
    variables = from_torch_state_dict(state, config)

    def run(config):
        model = FlashMoE(config)

        @jax.jit
        def value_and_grads(params, tokens):
            def loss(params, tokens):
                (y, router_logits), _ = model.apply(
                    {**variables, "params": params}, tokens, train=True, mutable=["batch_stats"]
                )
                return jnp.sum(jnp.sin(y)) + jnp.sum(router_logits**2), y

            (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, tokens)
            return y, grads

        return value_and_grads(variables["params"], jnp.asarray(x))

    got_y, got_grads = run(config)
    want_y, want_grads = run(config.replace(implementation="xla"))
    assert_close(got_y, want_y, jnp.float32)
    assert_trees_close(got_grads, want_grads, jnp.float32, what="gradient ")


def test_pallas_router_is_unsorted_inside_and_the_returned_routing_sorted(seed):
    # The experts take the kernel router's unsorted output (sort_by_score=False); the RoutingResult the layer
    # returns is sorted by score, as the seed's torch.topk orders it, and y does not depend on returning it.
    config = small_config(implementation="pallas")
    state, x = decisive_inputs(seed, config, 24, train=False)
    variables = from_torch_state_dict(state, config)

    def run(config):
        model = FlashMoE(config)
        return jax.jit(lambda v, a: (model.apply(v, a), model.apply(v, a, return_routing=True)))(variables, x)

    (y, _), (y_again, routing) = run(config)
    (want_y, _), (_, want) = run(config.replace(implementation="xla"))
    np.testing.assert_array_equal(y, y_again)
    assert_close(y, want_y, jnp.float32)
    np.testing.assert_array_equal(routing.indices, want.indices)
    np.testing.assert_array_equal(routing.scores, want.scores)
    assert_close(routing.weights, want.weights, jnp.float32, what="routing weights")


@pytest.mark.parametrize("layout", ["rows", "hidden"])
def test_expert_parallel_layer_matches_the_single_device_layer(layout, seed):
    # Tables sharded over "expert" (by rows, or by columns), tokens over "data" x "expert" (the 8 CPU devices
    # of conftest.py): the same outputs, gradients and BatchNorm statistics (of the global batch) as with no
    # mesh in context.
    config = small_config(expert_axis="expert", expert_parallel_layout=layout)
    state, x = decisive_inputs(seed, config, 64, train=True)
    variables = from_torch_state_dict(state, config)
    cotangent = np.random.default_rng(seed + 1).standard_normal(x.shape).astype(np.float32)
    model = FlashMoE(config)

    def step(variables, x, cotangent):
        def run(params, tokens):
            (y, router_logits), updates = model.apply(
                {**variables, "params": params}, tokens, train=True, mutable=["batch_stats", "intermediates"]
            )
            return (y, router_logits), updates

        (y, router_logits), pullback, updates = jax.vjp(run, variables["params"], x, has_aux=True)
        d_params, d_x = pullback((cotangent, jnp.ones_like(router_logits)))
        return y, router_logits, d_params, d_x, updates["batch_stats"]

    want = jax.jit(step)(variables, jnp.asarray(x), cotangent)
    mesh = cpu_mesh("data=2,expert=4")
    with jax.set_mesh(mesh):
        sharded = jax.device_put(variables, parallel.shardings(variables, mesh, parallel.table_rules(layout)))
        inputs = jax.device_put((jnp.asarray(x), cotangent), parallel.batch_sharding(mesh))
        compiled = jax.jit(step).lower(sharded, *inputs).compile()
        got = compiled(sharded, *inputs)
    assert parallel.collective_bytes(compiled.as_text())["all-to-all"] > 0  # the dispatch ran
    assert_trees_close(got, want, jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# the seed's checkpoint keys


def test_seed_keys_round_trip_exactly(seed):
    config = small_config()
    state = random_flashmoe_state_dict(np.random.default_rng(seed), config)
    variables = from_torch_state_dict(state, config)
    back = to_torch_state_dict(variables, config)
    assert list(back) == SEED_KEYS
    for k in state:
        assert back[k].dtype == state[k].dtype and back[k].shape == state[k].shape, k
        np.testing.assert_array_equal(back[k], state[k], err_msg=k)
    # torch Linear is [out, in]; the tables keep their roles (no swap on the way in).
    params = variables["params"]
    np.testing.assert_array_equal(params["router_gate"]["kernel"], state["router_gate.weight"].T)
    np.testing.assert_array_equal(params["experts"]["down_embed"], state["down_embed.weight"])
    np.testing.assert_array_equal(params["experts"]["up_embed"], state["up_embed.weight"])
    created = FlashMoE(config).init(jax.random.key(0), jnp.ones((4, config.hidden_size)))
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype).name), tree)
    assert shapes(variables) == shapes(created)


def test_bad_checkpoints_are_named(seed):
    config = small_config()
    state = random_flashmoe_state_dict(np.random.default_rng(seed), config)
    with pytest.raises(ValueError, match=r"missing keys: \['down_embed.weight'\]"):
        from_torch_state_dict({k: v for k, v in state.items() if k != "down_embed.weight"}, config)
    with pytest.raises(ValueError, match=r"unexpected keys .*\['router_gate_x.weight'\]"):
        from_torch_state_dict({**state, "router_gate_x.weight": state["router_gate.weight"]}, config)
    with pytest.raises(ValueError, match=r"router_gate.weight has shape \(8, 32\), expected \(16, 32\)"):
        from_torch_state_dict({**state, "router_gate.weight": state["router_gate.weight"][:8]}, config)
    with pytest.raises(ValueError, match=r"router_norm.running_var has shape \(8,\), expected \(32,\)"):
        from_torch_state_dict({**state, "router_norm.running_var": state["router_norm.running_var"][:8]}, config)
    # An OmniMoE checkpoint is not a FlashMoE one, nor the other way round.
    omni = OmniMoEConfig(hidden_size=32, intermediate_size=48, num_experts=64, num_experts_per_token=6)
    with pytest.raises(ValueError, match="unexpected keys"):
        from_torch_state_dict(state, omni)
    with pytest.raises(TypeError, match="config must be an OmniMoEConfig or a FlashMoEConfig, got dict"):
        from_torch_state_dict(state, {"hidden_size": 32})


def test_missing_counter_starts_at_zero_and_prefix_selects_a_layer(seed):
    config = small_config()
    rng = np.random.default_rng(seed)
    state = random_flashmoe_state_dict(rng, config)
    del state["router_norm.num_batches_tracked"]  # older torch
    variables = from_torch_state_dict(state, config)
    assert int(variables["batch_stats"]["router_norm"]["num_batches_tracked"]) == 0
    layers = [random_flashmoe_state_dict(rng, config) for _ in range(2)]
    model_state = {f"model.layers.{i}.mlp.{k}": v for i, layer in enumerate(layers) for k, v in layer.items()}
    layer = from_torch_state_dict(model_state, config, prefix="model.layers.1.mlp.")
    for k, v in to_torch_state_dict(layer, config, prefix="model.layers.1.mlp.").items():
        np.testing.assert_array_equal(v, model_state[k])


# ----------------------------------------------------------------------------------------------------------
# config and input checks


def test_config_takes_the_seeds_quick_start():
    config = FlashMoEConfig(
        hidden_size=1024,
        intermediate_size=4096,
        hidden_act="silu",
        num_experts=16384,
        num_experts_per_tok=64,
        norm_topk_prob=False,
    )
    assert config.num_expert_sqrt == 128 and config.dtype == jnp.float32
    assert FlashMoEConfig.from_dict(config.to_dict()) == config
    assert config.replace(dtype="bfloat16").dtype == jnp.bfloat16


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_experts": 50}, r"num_experts=50 must be a perfect square n\*n with n >= 2 .* \[49, 64\]"),
        ({"num_experts_per_tok": 65}, "num_experts_per_tok=65 must be <= num_experts=64"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok=0 must be a positive int"),
        ({"hidden_size": 2.0}, "hidden_size=2.0 must be a positive int"),
        ({"hidden_act": "swiglu"}, "hidden_act='swiglu' is not supported"),
        ({"norm_topk_prob": 1}, "norm_topk_prob=1 must be a bool"),
        ({"router_norm_momentum": 0.0}, r"router_norm_momentum=0.0 must be in \(0, 1\]"),
        ({"router_norm_eps": -1.0}, "router_norm_eps=-1.0 must be a positive finite number"),
        ({"implementation": "triton"}, "implementation='triton' must be one of"),
        ({"dtype": "int32"}, "dtype='int32' must be a floating dtype"),
        ({"expert_axis": ""}, "expert_axis='' must be a mesh axis name"),
        ({"expert_capacity_factor": 0}, "expert_capacity_factor=0 must be None or a positive finite number"),
        (
            {"implementation": "pallas", "num_experts_per_tok": 4097, "num_experts": 4225},
            'num_experts_per_tok=4097: implementation="pallas" needs at most 4096',
        ),
        ({"implementation": "pallas", "hidden_size": 24}, 'hidden_size=24: implementation="pallas" needs a multiple'),
    ],
)
def test_bad_configs_are_refused_naming_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        small_config(**changes)


def test_bad_inputs_are_refused(key):
    config = small_config()
    model = FlashMoE(config)
    with pytest.raises(ValueError, match=r"x must be \[..., hidden_size=32\], got shape \(4, 31\)"):
        model.init(key, jnp.zeros((4, 31)))
    # A cast to float32 would silently drop the imaginary part.
    with pytest.raises(TypeError, match="x has dtype complex64: a real input is expected"):
        model.init(key, jnp.ones((4, config.hidden_size), jnp.complex64) * (1 + 2j))
    variables = model.init(key, jnp.ones((4, config.hidden_size)))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        model.apply(variables, jnp.ones((1, config.hidden_size)), train=True, mutable=["batch_stats"])
