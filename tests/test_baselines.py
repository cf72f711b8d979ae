"""The baseline FFNs against float64 per-token loops (tests/baselines_oracle.py), their gradients, presets and
config validation.

Compiles dominate this file's time on a CPU, so variables are drawn in numpy on the modules' real structure
(`jax.eval_shape(init)`, nothing compiled), each apply is jitted once, and several checks share a compile.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from baselines_oracle import as_float64, coarse_moe_forward, dense_forward, product_key_forward
from flax.traverse_util import flatten_dict, unflatten_dict
from helpers import assert_close, assert_trees_close, normal, omni_router_brute_force

from omnimoe_jax import FlashMoEConfig, OmniMoEConfig
from omnimoe_jax.baselines import (
    DeepSeekMoEConfig,
    DenseFFNConfig,
    GShardMoEConfig,
    PEERConfig,
    PKMConfig,
    presets,
)
from omnimoe_jax.baselines._moe import ExpertTiles
from pallas_kernels.omni_router import omni_router

D = 16  # hidden size of the small test configs
TOKENS = 20


def module_for(config):
    return config.module_class()(config)


def ffn_output(out):
    """y of an FFN's output: FlashMoE returns (y, router_logits), the others y."""
    return out[0] if isinstance(out, tuple) else out


def random_variables(model, x, seed):
    """Variables of `model`'s real structure (traced by `jax.eval_shape(model.init)`, nothing compiled) with
    random values: weights ~ N(0, 1/fan_in), rows of the expert and value tables ~ N(0, 1/d), sub-keys
    ~ N(0, 2/key_dim), and random BatchNorm running statistics so eval mode is not the identity."""
    rng = np.random.default_rng(seed)
    shapes = flatten_dict(jax.eval_shape(model.init, jax.random.key(0), x))
    dtype = model.config.param_dtype
    values = {}
    for path, leaf in shapes.items():
        name, shape = path[-1], leaf.shape
        if name == "num_batches_tracked":
            value = np.array(rng.integers(0, 100), leaf.dtype)
        elif name == "running_mean":
            value = 0.3 * rng.standard_normal(shape)
        elif name == "running_var":
            value = rng.uniform(0.5, 2.0, shape)
        else:  # kernels [.., fan_in, fan_out] scale by fan_in; tables and sub-keys [rows, width] by width
            fan_in = shape[-2] if name in ("kernel", "gate_proj", "up_proj", "down_proj") else shape[-1]
            value = rng.standard_normal(shape) / math.sqrt(fan_in)
        values[path] = jnp.asarray(value, leaf.dtype if name == "num_batches_tracked" else dtype)
    return unflatten_dict(values)


@functools.cache
def jitted_apply(model):
    """model.apply under jax.jit (train and mutable static; mutable as a tuple), compiled once per model."""
    return jax.jit(model.apply, static_argnames=("train", "mutable"))


def oracle(config, variables, x, *, train):
    """(y, routing margin, extras) of the float64 loop for any baseline config."""
    params = as_float64(variables["params"])
    if isinstance(config, DenseFFNConfig):
        return dense_forward(params, x, config.hidden_act), math.inf, {}
    if isinstance(config, (DeepSeekMoEConfig, GShardMoEConfig)):
        gshard = isinstance(config, GShardMoEConfig)
        capacity = config.capacity_factor if gshard or config.dispatch == "capacity" else None
        y, balance, load, dropped, margin = coarse_moe_forward(
            params,
            x,
            top_k=config.num_experts_per_token,
            normalize=config.norm_topk_prob,
            capacity_factor=capacity,
            counted_choices=1 if gshard else config.num_experts_per_token,
            act=config.hidden_act,
        )
        return y, margin, {"balance": balance, "load": load, "dropped": dropped}
    peer = isinstance(config, PEERConfig)
    y, margin, used = product_key_forward(
        params,
        as_float64(variables["batch_stats"]) if config.query_norm == "batchnorm" else None,
        x,
        heads=config.num_heads,
        top_k=config.experts_per_head if peer else config.values_per_head,
        shared_keys=peer,
        train=train,
        eps=config.query_norm_eps,
        expert_act=config.hidden_act if peer else None,
    )
    return y, margin, {"used": used}


def decisive_draw(config, seed, *, tokens=TOKENS, train=False):
    """Random variables and tokens whose routing is far from a tie in float64 (so f32 routes the same)."""
    model = module_for(config)
    rng = np.random.default_rng(seed)
    for _ in range(20):
        x = jnp.asarray(rng.standard_normal((tokens, config.hidden_size)), config.dtype)
        variables = random_variables(model, x, rng.integers(2**31))
        want = oracle(config, variables, x, train=train)
        if want[1] > 1e-4:
            return model, variables, x, want
    raise AssertionError("could not draw inputs with a decisive routing")


def test_dense_matches_per_token_loop(seed):
    config = DenseFFNConfig(D, 24, hidden_act="gelu")
    model, variables, x, (want, _, _) = decisive_draw(config, seed)
    assert_close(jitted_apply(model)(variables, x), want, jnp.float32)


COARSE_CASES = {
    "deepseek-sorted-shared": DeepSeekMoEConfig(D, 8, 12, 3, shared_intermediate_size=20),
    "deepseek-capacity-drops-normalised": DeepSeekMoEConfig(
        D, 8, 12, 3, norm_topk_prob=True, dispatch="capacity", capacity_factor=0.6
    ),
    "deepseek-top1-gelu": DeepSeekMoEConfig(D, 6, 12, 1, hidden_act="gelu"),
    "gshard-top2-drops": GShardMoEConfig(D, 8, 12, 2, capacity_factor=0.75),
    "gshard-top1-switch-roomy": GShardMoEConfig(D, 4, 12, 1, capacity_factor=4.0, norm_topk_prob=False),
}


@pytest.mark.parametrize("config", COARSE_CASES.values(), ids=COARSE_CASES.keys())
def test_coarse_moe_matches_per_token_loop(config, seed):
    model, variables, x, (want, _, extras) = decisive_draw(config, seed)
    y, state = jitted_apply(model)(variables, x, train=True, mutable=("losses", "metrics"))
    assert_close(y, want, jnp.float32)
    metrics = state["metrics"]
    np.testing.assert_allclose(metrics["balance_loss"][0], extras["balance"], rtol=1e-5)
    np.testing.assert_allclose(state["losses"]["aux_loss"][0], config.aux_loss_weight * extras["balance"], rtol=1e-5)
    np.testing.assert_array_equal(metrics["expert_counts"][0], extras["load"])
    capacity_bound = isinstance(config, GShardMoEConfig) or config.dispatch == "capacity"
    if capacity_bound:
        assert int(metrics["dropped_pairs"][0]) == extras["dropped"]
        if config.capacity_factor < 1:  # fewer buffer rows than pairs: something must drop
            assert extras["dropped"] > 0
    else:
        assert "dropped_pairs" not in metrics


def test_moe_eval_computes_the_same_output_and_adds_no_loss(seed):
    model, variables, x, _ = decisive_draw(COARSE_CASES["gshard-top2-drops"], seed)
    y_train, state = jitted_apply(model)(variables, x, train=True, mutable=("losses",))
    assert float(state["losses"]["aux_loss"][0]) > 0
    y_eval, state = jitted_apply(model)(variables, x, train=False, mutable=("losses",))
    np.testing.assert_array_equal(y_eval, y_train)
    assert not state.get("losses")


PRODUCT_KEY_CASES = {
    "peer-reference": PEERConfig(D, 36, 3, 5, 8, expert_implementation="reference", implementation="xla"),
    "peer-omni-expert-k-above-n-silu": PEERConfig(D, 36, 2, 8, 8, hidden_act="silu"),
    "peer-k-equals-N-no-norm": PEERConfig(D, 16, 2, 16, 6, query_norm="none", expert_implementation="reference"),
    "pkm": PKMConfig(D, 49, 2, 4, 6),
    "pkm-k-above-n-no-norm": PKMConfig(D, 25, 3, 7, 4, query_norm="none"),
}


# Without a query BatchNorm, train and eval compute the same thing: those configs run in eval mode only.
PRODUCT_KEY_RUNS = {
    f"{name}-{'train' if train else 'eval'}": (config, train)
    for name, config in PRODUCT_KEY_CASES.items()
    for train in ((False, True) if config.query_norm == "batchnorm" else (False,))
}


@pytest.mark.parametrize(("config", "train"), PRODUCT_KEY_RUNS.values(), ids=PRODUCT_KEY_RUNS.keys())
def test_product_key_ffn_matches_per_token_loop(config, train, seed):
    model, variables, x, (want, _, extras) = decisive_draw(config, seed, train=train)
    mutable = ("metrics", "batch_stats") if train else ("metrics",)
    y, state = jitted_apply(model)(variables, x, train=train, mutable=mutable)
    assert_close(y, want, jnp.float32)
    np.testing.assert_array_equal(state["metrics"]["expert_counts"][0], extras["used"])
    if train and config.query_norm == "batchnorm":
        before = variables["batch_stats"]["retrieval"]["query_norm"]["num_batches_tracked"]
        after = state["batch_stats"]["retrieval"]["query_norm"]["num_batches_tracked"]
        assert int(after) == int(before) + 1


def test_pkm_on_the_kernels_matches_pkm_on_xla(seed):
    # implementation="pallas" reads the values through embedding_bag's kernels (interpret mode here): the
    # same output and the same gradient of every parameter and of the input as the plain-XLA path.
    config = PKMConfig(D, 49, 2, 4, 6, implementation="xla")
    _, variables, x, _ = decisive_draw(config, seed, train=True)
    cotangent = normal(jax.random.key(seed), x.shape)

    def value_and_grads(model):
        def apply(params, tokens):
            return model.apply({**variables, "params": params}, tokens, train=True, mutable=["batch_stats"])[0]

        def run(params, tokens):
            y, vjp = jax.vjp(apply, params, tokens)
            return y, vjp(cotangent)

        return jax.jit(run)(variables["params"], x)

    want_y, want_grads = value_and_grads(module_for(config))
    y, grads = value_and_grads(module_for(config.replace(implementation="pallas")))
    assert_close(y, want_y, jnp.float32)
    assert_trees_close(grads, want_grads, jnp.float32)


def test_one_expert_taking_every_token_leaves_the_others_empty(seed):
    # Positive tokens and a gate that only sees expert 2: every first choice is expert 2, the other experts'
    # logits tie at exactly 0 (second choices go to the lowest index, 0). Empty groups reach the expert tiles.
    x = jnp.abs(normal(jax.random.key(seed), (TOKENS, D)))
    kernel = jnp.zeros((D, 4)).at[:, 2].set(1.0)
    for config in (
        DeepSeekMoEConfig(D, 4, 12, 1, dispatch="sorted"),
        DeepSeekMoEConfig(D, 4, 12, 2, dispatch="capacity", capacity_factor=1.0),
        GShardMoEConfig(D, 4, 12, 2),
    ):
        model = module_for(config)
        variables = random_variables(model, x, seed)
        variables = {"params": {**variables["params"], "gate": {"kernel": kernel}}}
        want, _, extras = oracle(config, variables, x, train=True)
        y, state = jitted_apply(model)(variables, x, train=True, mutable=("metrics",))
        counts = np.asarray(state["metrics"]["expert_counts"][0])
        assert counts[[1, 3]].tolist() == [0, 0] and counts.sum() == TOKENS * config.num_experts_per_token
        assert_close(y, want, jnp.float32, what=type(config).__name__)
        if config.num_experts_per_token == 2:
            # capacity ceil(cf * 2 * 20 / 4) rows each for experts 2 and 0; the rest of the 20 + 20 drop
            capacity = math.ceil(config.capacity_factor * 10)
            assert int(state["metrics"]["dropped_pairs"][0]) == extras["dropped"] == 2 * (TOKENS - capacity)


@pytest.mark.parametrize("tile_rows", [8, 16])
def test_expert_tiles_multiply_each_group_by_its_experts_matrix(tile_rows, seed):
    # Group sizes with empty groups, a group of exactly one tile and one spanning several, the pairs in a
    # random order; every row of the tiled product is its row times its expert's matrix, nothing is lost or
    # duplicated on the way back, and the gradients (gathers by the inverse maps) are the scatter-adds'.
    rng = np.random.default_rng(seed)
    sizes = np.array([0, 5, tile_rows, 0, 3 * tile_rows + 1, 2, 0])
    pair_expert = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    rows, weights = rng.normal(size=(len(pair_expert), 6)), rng.normal(size=(len(sizes), 6, 4))
    want = np.einsum("pi,pio->po", rows, weights[pair_expert])

    def tiled_product(rows, weights, pair_expert):
        tiles = ExpertTiles(pair_expert, len(sizes), tile_rows=tile_rows)
        return tiles.combine(tiles.matmul(tiles.to_tiles(rows), weights))

    with jax.enable_x64(True):
        args = (jnp.asarray(rows), jnp.asarray(weights), jnp.asarray(pair_expert))
        got = jax.jit(tiled_product)(*args)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)
        probe = jnp.asarray(rng.normal(size=want.shape))
        grads = jax.grad(lambda r, w: jnp.sum(tiled_product(r, w, args[2]) * probe), argnums=(0, 1))(*args[:2])
        want_grads = jax.grad(lambda r, w: jnp.sum(jnp.einsum("pi,pio->po", r, w[args[2]]) * probe), (0, 1))(*args[:2])
        for g, w in zip(grads, want_grads, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-12, atol=1e-12)
    tiles = ExpertTiles(jnp.asarray(pair_expert), len(sizes), tile_rows=tile_rows)
    slots = np.asarray(tiles.pair_slot)
    assert len(set(slots.tolist())) == len(slots) and slots.max() < tiles.num_tiles * tile_rows  # one slot each
    slot_pair = np.asarray(tiles.slot_pair)
    assert sorted(slot_pair[slot_pair < len(slots)].tolist()) == list(range(len(slots)))  # the inverse map
    used = -(-sizes // tile_rows)  # tiles per group
    assert np.asarray(tiles.tile_expert)[: used.sum()].tolist() == np.repeat(np.arange(len(sizes)), used).tolist()


def test_expert_tiles_dispatch_copies_each_token_to_its_k_slots_and_sums_their_gradients(seed):
    # Pairs are slot-major (p = c * T + t reads token t); the capacity layout drops pairs past C per expert
    # in that priority order, and their gradient is zero.
    rng = np.random.default_rng(seed)
    num_tokens, top_k, num_experts, capacity = 12, 3, 4, 5
    with jax.enable_x64(True):
        pair_expert = jnp.asarray(rng.integers(0, num_experts, size=num_tokens * top_k))
        tokens = jnp.asarray(rng.normal(size=(num_tokens, 6)))
        probe = jnp.asarray(rng.normal(size=(num_tokens * top_k, 6)))
        for layout in (
            ExpertTiles(pair_expert, num_experts, tile_rows=4),
            ExpertTiles(pair_expert, num_experts, capacity=capacity),
        ):
            rank = np.array([np.sum(pair_expert[:p] == pair_expert[p]) for p in range(len(pair_expert))])
            kept = rank < (capacity if layout.capacity else len(rank))
            want_rows = np.where(kept[:, None], np.tile(np.asarray(tokens), (top_k, 1)), 0.0)
            np.testing.assert_array_equal(np.asarray(layout.combine(layout.dispatch(tokens))), want_rows)
            assert int(layout.dropped) == int(np.sum(~kept))
            grad = jax.grad(lambda x, layout=layout: jnp.sum(layout.combine(layout.dispatch(x)) * probe))(tokens)
            want = np.sum((np.asarray(probe) * kept[:, None]).reshape(top_k, num_tokens, 6), axis=0)
            np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-12)


def _primitives(jaxpr) -> set[str]:
    """Every primitive in a closed jaxpr, its sub-jaxprs (custom_vjp, pjit, scan) included."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names |= _primitives(inner)
    return names


@pytest.mark.parametrize(
    "config",
    [
        DeepSeekMoEConfig(D, 16, 12, 2),
        DeepSeekMoEConfig(D, 16, 12, 2, dispatch="capacity"),
        GShardMoEConfig(D, 16, 12),
    ],
    ids=["deepseek-sorted", "deepseek-capacity", "gshard"],
)
def test_the_expert_dispatch_runs_on_gathers_forward_and_backward(config):
    # jax.lax.ragged_dot lowers to a product of every row with every expert's matrix on XLA:GPU and jax's
    # fallback (E times the work and an [E, P, I] buffer); a float scatter-add (autodiff's transpose of a
    # gather or of top_k) runs as one atomic add per element on the GPU. The dispatch uses neither, forward or
    # backward. (Read from the jaxpr: the lowered text need not name them.)
    x = jnp.ones((TOKENS, D))
    model = module_for(config)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    loss = lambda v, x: jnp.sum(model.apply(v, x, mutable=["metrics"])[0])
    used = _primitives(jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(variables, x).jaxpr)
    assert "ragged_dot" not in used and "ragged_dot_general" not in used
    assert "scatter-add" not in used and "scatter_add" not in used
    # the check sees them where they are
    groups = jnp.array([TOKENS // 2, TOKENS - TOKENS // 2], jnp.int32)
    assert {"ragged_dot", "ragged_dot_general"} & _primitives(
        jax.make_jaxpr(jax.lax.ragged_dot)(x, jnp.ones((2, D, 4)), groups).jaxpr
    )
    top_k_grad = jax.grad(lambda p: jnp.sum(jax.lax.top_k(p, 2)[0]))
    assert {"scatter-add", "scatter_add"} & _primitives(jax.make_jaxpr(top_k_grad)(x).jaxpr)


# (The dense FFN is SharedMLP, flax Dense layers: nothing of ours to differentiate.)
GRADIENT_CASES = [
    pytest.param(DeepSeekMoEConfig(8, 4, 6, 2, shared_intermediate_size=6), id="deepseek-sorted"),
    pytest.param(
        DeepSeekMoEConfig(8, 4, 6, 2, shared_intermediate_size=6, dispatch="capacity", capacity_factor=4.0),
        id="deepseek-capacity",
    ),
    pytest.param(GShardMoEConfig(8, 4, 6, 2, capacity_factor=0.75), id="gshard-drops"),
    pytest.param(PEERConfig(8, 16, 2, 3, 4), id="peer"),
    pytest.param(PKMConfig(8, 16, 2, 3, 4), id="pkm"),
]


@pytest.mark.parametrize("config", GRADIENT_CASES)
def test_gradients_by_central_differences(config, seed):
    config = config.replace(dtype="float64", param_dtype="float64")
    with jax.enable_x64(True):
        model, variables, x, _ = decisive_draw(config, seed, tokens=10, train=True)

        def loss(params, tokens):
            y, state = model.apply(
                {**variables, "params": params}, tokens, train=True, mutable=["batch_stats", "losses"]
            )
            # A non-linear readout so every output element matters differently, plus any auxiliary loss.
            return jnp.sum(jnp.sin(y)) + sum(jax.tree.leaves(state.get("losses", {})))

        value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))  # one compile serves every call
        args = (variables["params"], x)
        _, grads = value_and_grad(*args)
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            assert bool(jnp.all(jnp.isfinite(g))), f"gradient of {jax.tree_util.keystr(path)} is not finite"
            assert float(jnp.abs(g).max()) > 0, f"gradient of {jax.tree_util.keystr(path)} is identically zero"
        # The derivative along random directions through every parameter and input at once, against a
        # central difference. Routing is piecewise constant; the step stays inside its region (margin > 1e-4).
        rng, eps = np.random.default_rng(seed), 1e-6
        for _ in range(2):
            direction = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), args)
            plus = jax.tree.map(lambda a, v: a + eps * v, args, direction)
            minus = jax.tree.map(lambda a, v: a - eps * v, args, direction)
            numeric = (value_and_grad(*plus)[0] - value_and_grad(*minus)[0]) / (2 * eps)
            pairs = zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
            analytic = sum(jnp.vdot(g, v) for g, v in pairs)
            np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


SMALL = presets.small_presets(D)


@pytest.mark.slow  # the default suite trains every kind on [B, L, d] inputs, two in bf16 (test_train_ffn.py)
@pytest.mark.parametrize("name", sorted(SMALL))
def test_any_leading_dims_under_jit_and_bf16(name, key):
    config = SMALL[name]
    model, bf16_model = module_for(config), module_for(config.replace(dtype="bfloat16"))
    x = normal(key, (2, 3, 5, D))
    flat = x.reshape(-1, D)
    variables = random_variables(model, flat, 0)

    @jax.jit
    def run(variables, x):  # one compile for the four applies
        apply = lambda module, inputs: ffn_output(module.apply(variables, inputs))
        single = apply(model, x[0, 0, 0])  # one token, no leading dims
        return apply(model, x), apply(model, flat), single, apply(bf16_model, x)

    y, y_flat, single, bf16 = run(variables, x)
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(y.reshape(flat.shape), y_flat, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(single, y[0, 0, 0], rtol=1e-5, atol=1e-6)
    assert bf16.shape == x.shape and bf16.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(bf16)))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_init_holds_only_params_and_batch_stats(name):
    model = module_for(SMALL[name])
    x = jax.ShapeDtypeStruct((6, D), jnp.float32)
    for train in (False, True):
        variables = jax.eval_shape(functools.partial(model.init, train=train), jax.random.key(0), x)
        normalised = name in ("omnimoe", "flashmoe", "peer", "pkm")  # a BatchNorm: running statistics
        assert set(variables) == ({"params", "batch_stats"} if normalised else {"params"})
        assert {leaf.dtype for leaf in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
    with pytest.raises(ValueError, match=rf"x must be \[\.\.\., hidden_size={D}\], got shape \(6, 5\)"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.ones((6, 5)))
    with pytest.raises(TypeError, match="x has dtype complex64: a real input is expected"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.ones((6, D), jnp.complex64))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_real_init_draws_weights_at_the_documented_scale(name, key):
    # Kernels ~ 1/sqrt(fan_in) (LeCun, truncated), tables ~ N(0, 1/d), sub-keys ~ N(0, 2/key_dim).
    variables = module_for(SMALL[name]).init(key, normal(key, (6, D)))
    for path, leaf in flatten_dict(variables["params"]).items():
        if path[-1] in ("up_embed", "down_embed", "values", "sub_keys"):
            want = leaf.shape[-1] ** -0.5
        else:
            want = leaf.shape[-2] ** -0.5  # [.., fan_in, fan_out]
        assert 0.8 < float(jnp.std(leaf)) / want < 1.2, (path, float(jnp.std(leaf)), want)


def test_product_key_top_k_on_raw_dot_products_is_exact(key):
    # PEER and PKM feed omni_router raw sub-key scores (any sign, not log-probabilities); it must still
    # return the exact top-k of the n*n sums.
    a, b = jax.random.split(key)
    scores_a, scores_b = 3.0 * normal(a, (50, 9)) + 1.0, 3.0 * normal(b, (50, 9))

    @jax.jit
    def both(scores_a, scores_b):  # k below and above n = 9
        top_k = (5, 20)
        got = [omni_router(scores_a, scores_b, k, implementation="xla") for k in top_k]
        return got, [omni_router_brute_force(scores_a, scores_b, k) for k in top_k]

    for (got_scores, got_indices), (want_scores, want_indices) in zip(*both(scores_a, scores_b), strict=True):
        np.testing.assert_array_equal(got_indices, want_indices)
        np.testing.assert_allclose(got_scores, want_scores, rtol=1e-6)


def _count_from_parameters(config):
    """Active parameters counted from the module's real parameter shapes: every leaf in full except the
    expert/value tables, of which only the rows (or experts) one token uses."""
    x = jax.ShapeDtypeStruct((4, config.hidden_size), jnp.float32)
    params = jax.eval_shape(module_for(config).init, jax.random.key(0), x)["params"]
    if isinstance(config, (OmniMoEConfig, DeepSeekMoEConfig, GShardMoEConfig)):
        tables, used, rows = params.pop("experts"), config.num_experts_per_token, config.num_experts
    elif isinstance(config, FlashMoEConfig):
        tables, used, rows = params.pop("experts"), config.num_experts_per_tok, config.num_experts
    elif isinstance(config, PEERConfig):
        tables = {name: params.pop(name) for name in ("up_embed", "down_embed")}
        used, rows = config.num_heads * config.experts_per_head, config.num_experts
    elif isinstance(config, PKMConfig):
        tables = {"values": params.pop("values")}
        used, rows = config.num_heads * config.values_per_head, config.num_values
    else:
        tables, used, rows = {}, 0, 1
    dense = sum(leaf.size for leaf in jax.tree.leaves(params))
    sparse = sum(leaf.size // leaf.shape[0] * used for leaf in jax.tree.leaves(tables))
    assert all(leaf.shape[0] == rows for leaf in jax.tree.leaves(tables))
    return dense + sparse


PAPER = presets.paper_presets()
PAPER_ACTIVE = {  # the table in presets' docstring
    "omnimoe": 4_849_664,
    "flashmoe": 4_849_664,
    "dense": 4_915_200,
    "deepseekmoe": 6_553_600,
    "deepseekmoe-matched": 4_980_736,
    "gshard": 3_276_800,
    "gshard-matched": 4_849_664,
    "peer": 4_925_440,
    "pkm": 4_814_848,
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_have_their_documented_active_parameters(name):
    config = PAPER[name]
    assert presets.active_parameters(config) == _count_from_parameters(config) == PAPER_ACTIVE[name]


def test_paper_presets_are_the_papers_setting():
    p = PAPER
    assert {c.hidden_size for c in p.values()} == {1024}
    omni = p["omnimoe"]
    assert (omni.num_experts, omni.num_experts_per_token, omni.intermediate_size) == (102400, 512, 1024)
    assert (p["peer"].num_experts, p["peer"].num_heads * p["peer"].experts_per_head) == (102400, 1250)
    assert (p["pkm"].num_values, p["pkm"].num_heads * p["pkm"].values_per_head) == (197136, 2500)
    ds = p["deepseekmoe"]
    assert (ds.num_experts, ds.expert_intermediate_size, ds.num_experts_per_token) == (256, 256, 4)
    assert ds.shared_intermediate_size == 1024
    gs = p["gshard"]
    assert (gs.num_experts, gs.expert_intermediate_size, gs.num_experts_per_token) == (128, 512, 2)
    # Everything but the paper's own coarse settings is within 3% of OmniMoE.
    target = PAPER_ACTIVE["omnimoe"]
    for name in ("dense", "flashmoe", "deepseekmoe-matched", "gshard-matched", "peer", "pkm"):
        assert abs(PAPER_ACTIVE[name] / target - 1) < 0.03, name


@pytest.mark.parametrize("hidden_size", [16, 256, 1024])
def test_small_presets_match_twelve_d_squared(hidden_size):
    configs = presets.small_presets(hidden_size)
    assert set(configs) == {"dense", "omnimoe", "flashmoe", "deepseekmoe", "gshard", "peer", "pkm"}
    d = hidden_size
    documented = {
        "dense": 12 * d * d,
        "omnimoe": 12 * d * d,
        "flashmoe": 12 * d * d,
        "deepseekmoe": 12 * d * d + 64 * d,
        "gshard": 12 * d * d + 16 * d,
        "peer": 12 * d * d + d * d // 4,
        "pkm": 12 * d * d,
    }
    for name, config in configs.items():
        count = presets.active_parameters(config)
        assert count == documented[name], name
        if d >= 256:  # the gates' d E terms are what separates them, and they shrink with d
            assert abs(count / (12 * d * d) - 1) <= 0.03, name
        if d == 16:  # building the d=1024 modules' shapes is cheap, but once is enough
            assert count == _count_from_parameters(config), name


def test_preset_and_active_parameter_refusals():
    with pytest.raises(ValueError, match="hidden_size=30 must be an int >= 12 and a multiple of 4"):
        presets.small_presets(30)
    with pytest.raises(ValueError, match="hidden_size=8 must be an int >= 12"):
        presets.small_presets(8)  # (d/2)^2 = 16 rows cannot hold OmniMoE's K = 20
    assert set(presets.small_presets(12)) == {"dense", "omnimoe", "flashmoe", "deepseekmoe", "gshard", "peer", "pkm"}
    with pytest.raises(TypeError, match="config must be one of the FFN configs"):
        presets.active_parameters(object())


BASE = {
    DenseFFNConfig: dict(hidden_size=8, intermediate_size=16),
    DeepSeekMoEConfig: dict(hidden_size=8, num_experts=4, expert_intermediate_size=6, num_experts_per_token=2),
    GShardMoEConfig: dict(hidden_size=8, num_experts=4, expert_intermediate_size=6),
    PEERConfig: dict(hidden_size=8, num_experts=16, num_heads=2, experts_per_head=3, key_dim=4),
    PKMConfig: dict(hidden_size=8, num_values=16, num_heads=2, values_per_head=3, key_dim=4),
}
REFUSALS = [
    (DenseFFNConfig, {"intermediate_size": 0}, "intermediate_size=0 must be a positive int"),
    (DenseFFNConfig, {"hidden_size": True}, "hidden_size=True must be a positive int"),
    (DenseFFNConfig, {"hidden_act": "swiglu"}, r"hidden_act='swiglu' must be one of \("),
    (DenseFFNConfig, {"dtype": "int32"}, "dtype='int32' must be a floating dtype"),
    (DenseFFNConfig, {"param_dtype": "nonsense"}, "param_dtype='nonsense' is not a dtype"),
    (DeepSeekMoEConfig, {"num_experts_per_token": 5}, "num_experts_per_token=5 must be <= num_experts=4"),
    (DeepSeekMoEConfig, {"shared_intermediate_size": -1}, "shared_intermediate_size=-1 must be an int >= 0"),
    (DeepSeekMoEConfig, {"dispatch": "dense"}, r"dispatch='dense' must be one of \('sorted', 'capacity'\)"),
    (DeepSeekMoEConfig, {"aux_loss_weight": -0.1}, "aux_loss_weight=-0.1 must be a finite number >= 0"),
    (DeepSeekMoEConfig, {"norm_topk_prob": 0}, "norm_topk_prob=0 must be a bool"),
    (GShardMoEConfig, {"capacity_factor": 0.0}, "capacity_factor=0.0 must be a positive finite number"),
    (GShardMoEConfig, {"capacity_factor": math.inf}, "capacity_factor=inf must be a positive finite number"),
    (GShardMoEConfig, {"num_experts_per_token": 0}, "num_experts_per_token=0 must be a positive int"),
    (PEERConfig, {"num_experts": 20}, r"num_experts=20 must be a perfect square .* nearest valid counts: \[16, 25\]"),
    (PEERConfig, {"num_experts": 1}, r"num_experts=1 must be a perfect square .* \[4\]"),
    (PEERConfig, {"experts_per_head": 17}, "experts_per_head=17 must be <= num_experts=16"),
    (PEERConfig, {"key_dim": 5}, "key_dim=5 must be even"),
    (PEERConfig, {"query_norm": "layernorm"}, "query_norm='layernorm' must be one of"),
    (PEERConfig, {"query_norm_momentum": 0}, r"query_norm_momentum=0 must be in \(0, 1\]"),
    (PEERConfig, {"expert_implementation": "triton"}, "expert_implementation='triton' must be one of"),
    (PEERConfig, {"implementation": "cuda"}, "implementation='cuda' must be one of"),
    (PKMConfig, {"num_values": 50}, r"num_values=50 must be a perfect square .* \[49, 64\]"),
    (PKMConfig, {"values_per_head": 0}, "values_per_head=0 must be a positive int"),
    (PKMConfig, {"query_norm_eps": -1e-5}, "query_norm_eps=-1e-05 must be a positive finite number"),
]


@pytest.mark.parametrize(("cls", "changes", "match"), REFUSALS)
def test_invalid_fields_are_refused(cls, changes, match):
    with pytest.raises(ValueError, match=match):
        cls(**{**BASE[cls], **changes})


@pytest.mark.parametrize("cls", BASE)
def test_config_dict_round_trip_and_dtype_normalisation(cls):
    config = cls(**BASE[cls], dtype="bfloat16")
    assert config == cls(**BASE[cls], dtype=jnp.bfloat16) and hash(config) == hash(cls(**BASE[cls], dtype="bfloat16"))
    assert cls.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=rf"unknown {cls.__name__} fields \['top_k'\]"):
        cls.from_dict({**config.to_dict(), "top_k": 3})
