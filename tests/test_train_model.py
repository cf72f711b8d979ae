"""The language model: wiring against an independent forward pass, causality, rotary, the FFN switch."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, normal, rel_error, tolerance

from omnimoe_jax import OmniMoE, OmniMoEConfig, ffn_registry, routing_statistics
from omnimoe_jax._model import FFN_KINDS, LMConfig, TransformerLM, parameter_counts, rotary
from omnimoe_jax.baselines import DenseFFNConfig, GShardMoEConfig

SMALL = dict(
    vocab_size=259,
    context_length=16,
    num_layers=2,
    num_heads=2,
    hidden_size=16,
    ffn=OmniMoEConfig(16, 24, 16, 4),
    dense_intermediate_size=24,
)
DEFAULT_SUITE_KINDS = ("dense", "omnimoe", "flashmoe", "gshard")  # the sows test's fast cases (no dense one)


def random_tokens(key, config, batch=2, length=None):
    return jax.random.randint(key, (batch, length or config.context_length), 0, config.vocab_size)


@functools.cache
def _jitted_init(config):
    return jax.jit(TransformerLM(config).init)


@functools.cache
def _jitted_apply(config, **kwargs):
    return jax.jit(functools.partial(TransformerLM(config).apply, **kwargs))


@functools.cache
def _jitted_omnimoe(ffn_config):
    return jax.jit(OmniMoE(ffn_config).apply)


def init(config, key):
    """Fresh variables and tokens; one compilation per config for the whole module (CPU compiles are slow)."""
    tokens = random_tokens(key, config)
    return _jitted_init(config)(jax.random.fold_in(key, 1), tokens), tokens


def apply(config, variables, tokens, **kwargs):
    return _jitted_apply(config, **kwargs)(variables, tokens)


def rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rotary_complex(x, theta):
    """Rotary positions written as complex rotation of (x_i, x_{i+D/2}) pairs: x [B, L, H, D] float64."""
    half = x.shape[-1] // 2
    pairs = x[..., :half] + 1j * x[..., half:]  # [B, L, H, D/2]
    angles = np.arange(x.shape[1])[:, None] * theta ** (-np.arange(half) / half)  # [L, D/2]
    turned = pairs * np.exp(1j * angles)[None, :, None, :]  # [B, L, H, D/2]
    return np.concatenate([turned.real, turned.imag], axis=-1)


def reference_logits(config, variables, tokens):
    """The model written out in float64 numpy; each FFN applied through its own (separately tested) module."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    eps = config.norm_eps
    x = p["embed"]["embedding"][np.asarray(tokens)]  # [B, L, d]
    length = x.shape[1]
    causal = np.tril(np.ones((length, length), bool))  # [L, L]
    for i in range(config.num_layers):
        layer = p[f"layer_{i}"]
        att = layer["attention"]
        h = rms_norm(x, layer["attention_norm"]["scale"], eps)
        q = rotary_complex(np.einsum("bld,dhk->blhk", h, att["query"]["kernel"]), config.rope_theta)
        k = rotary_complex(np.einsum("bld,dhk->blhk", h, att["key"]["kernel"]), config.rope_theta)
        v = np.einsum("bld,dhk->blhk", h, att["value"]["kernel"])  # [B, L, H, D]
        scores = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(config.head_dim)  # [B, H, L, L]
        scores = np.where(causal, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        heads = np.einsum("bhqs,bshk->bqhk", probs, v)  # [B, L, H, D]
        x = x + np.einsum("blhk,hkd->bld", heads, att["out"]["kernel"])
        h = rms_norm(x, layer["ffn_norm"]["scale"], eps)
        ffn_vars = {"params": variables["params"][f"layer_{i}"]["ffn"]}
        if config.ffn_kind == "omnimoe" and config.is_sparse_layer(i):
            ffn_vars["batch_stats"] = variables["batch_stats"][f"layer_{i}"]["ffn"]
            y = _jitted_omnimoe(config.ffn)(ffn_vars, jnp.asarray(h, jnp.float32))
        else:
            w = ffn_vars["params"]
            y = (jax.nn.silu(h @ w["gate_proj"]["kernel"]) * (h @ w["up_proj"]["kernel"])) @ w["down_proj"]["kernel"]
        x = x + np.asarray(y, np.float64)
    x = rms_norm(x, p["final_norm"]["scale"], eps)
    head = p["embed"]["embedding"].T if config.tie_embeddings else p["lm_head"]["kernel"]
    return x @ head  # [B, L, V]


@pytest.mark.parametrize(
    "changes",
    [{}, {"tie_embeddings": False}, {"moe_every": 2}, {"ffn": DenseFFNConfig(16, 24)}],
    ids=["omnimoe", "untied", "moe_every_2", "dense"],
)
def test_logits_match_independent_forward(key, changes):
    config = LMConfig(**{**SMALL, **changes})
    variables, tokens = init(config, key)
    logits = apply(config, variables, tokens)
    assert logits.dtype == jnp.float32
    assert logits.shape == (*tokens.shape, config.vocab_size)
    assert_close(logits, reference_logits(config, variables, tokens), jnp.float32, what="logits")


def test_model_is_causal_in_eval(key):
    config = LMConfig(**SMALL)
    variables, tokens = init(config, key)
    cut = config.context_length // 2
    changed = tokens.at[:, cut:].set((tokens[:, cut:] + 1) % config.vocab_size)
    before, after = apply(config, variables, tokens), apply(config, variables, changed)
    np.testing.assert_array_equal(np.asarray(before[:, :cut]), np.asarray(after[:, :cut]))
    assert not np.allclose(before[:, cut:], after[:, cut:])


def test_rotary_scores_depend_only_on_relative_position(key):
    kq, kk = jax.random.split(key)
    q, k = normal(kq, (1, 1, 1, 8)), normal(kk, (1, 1, 1, 8))

    @jax.jit
    def score(pos_q, pos_k):
        rq = rotary(q, jnp.array([pos_q]), 10000.0)
        rk = rotary(k, jnp.array([pos_k]), 10000.0)
        return jnp.sum(rq * rk)

    # f32 rounding is relative to |q| |k|, not to the score, which cancellation can bring near zero.
    scale = float(jnp.linalg.norm(q) * jnp.linalg.norm(k))
    np.testing.assert_allclose(score(7, 3), score(4, 0), rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(score(0, 0), jnp.sum(q * k), rtol=1e-6, atol=1e-6 * scale)
    assert not np.isclose(score(7, 3), score(3, 7))


def test_ffn_switch_and_routing_results(key):
    config = LMConfig(**SMALL, moe_every=2)
    assert config.sparse_layers == (1,)
    variables, tokens = init(config, key)
    ffns = [variables["params"][f"layer_{i}"]["ffn"] for i in range(config.num_layers)]
    assert sorted(ffns[0]) == ["down_proj", "gate_proj", "up_proj"]  # the dense SwiGLU
    assert sorted(ffns[1]) == ["experts", "router", "shared"]  # OmniMoE
    assert sorted(variables["batch_stats"]) == ["layer_1"]
    _, routings = apply(config, variables, tokens, return_routing=True)
    assert len(routings) == 1
    n, k = config.ffn.num_expert_sqrt, config.ffn.num_experts_per_token
    (routing,) = routings
    assert routing.indices.shape == (*tokens.shape, k)
    assert routing.logits_x.shape == (*tokens.shape, n)
    assert int(routing.indices.min()) >= 0 and int(routing.indices.max()) < config.ffn.num_experts
    dense = LMConfig(**{**SMALL, "ffn": DenseFFNConfig(16, 24)})
    dense_vars, _ = init(dense, key)
    assert "batch_stats" not in dense_vars
    assert apply(dense, dense_vars, tokens, return_routing=True)[1] == ()


@pytest.mark.parametrize(
    "ffn, remat",
    [
        ("omnimoe", False),
        ("flashmoe", False),
        ("gshard", False),
        # The other kinds, and sowing from inside nn.remat: each case compiles a model of its own.
        pytest.param("omnimoe", True, marks=pytest.mark.slow),
        *[pytest.param(k, False, marks=pytest.mark.slow) for k in FFN_KINDS if k not in DEFAULT_SUITE_KINDS],
    ],
)
def test_every_sparse_ffn_sows_its_routing_statistics_into_metrics(ffn, remat, key):
    # One channel: every sparse kind sows "expert_counts" (and OmniMoE and FlashMoE "router_entropy") under
    # layer_<i>/ffn of "metrics", the collection the eval step reads; the dense layers sow nothing.
    ffn_config = ffn_registry.config_class(ffn).small_preset(SMALL["hidden_size"])
    config = LMConfig(**{**SMALL, "ffn": ffn_config}, moe_every=2, remat=remat)
    variables, tokens = init(config, key)
    assert "metrics" not in variables  # init sows none
    (_, routings), sown = apply(config, variables, tokens, return_routing=True, mutable=("metrics",))
    assert sorted(sown["metrics"]) == ["layer_1"]
    stats = sown["metrics"]["layer_1"]["ffn"]
    (counts,) = stats["expert_counts"]
    assert counts.dtype == jnp.int32 and counts.ndim == 1 and int(counts.sum()) > 0
    if ffn not in ("omnimoe", "flashmoe"):
        assert "router_entropy" not in stats and routings == ()
        return
    (routing,) = routings
    num_experts, top_k = ffn_config.num_experts, routing.indices.shape[-1]
    assert top_k == getattr(ffn_config, "num_experts_per_token", getattr(ffn_config, "num_experts_per_tok", None))
    assert counts.shape == (num_experts,)
    assert int(counts.sum()) == tokens.size * top_k  # every assignment, once
    want_counts = np.bincount(np.asarray(routing.indices).ravel(), minlength=num_experts)
    np.testing.assert_array_equal(counts, want_counts)
    (entropy,) = stats["router_entropy"]
    np.testing.assert_allclose(entropy, routing_statistics(routing, num_experts)[1], rtol=1e-6)
    # Per token, H(p_x) + H(p_y) lies in (0, log N]: the LM's tokens route neither one-hot nor beyond uniform.
    assert 0 < float(entropy) / tokens.size <= np.log(num_experts) + 1e-5


def test_train_mode_updates_router_statistics(key):
    config = LMConfig(**SMALL)
    variables, tokens = init(config, key)
    _, updates = apply(config, variables, tokens, train=True, mutable=("batch_stats",))
    for i in range(config.num_layers):
        stats = updates["batch_stats"][f"layer_{i}"]["ffn"]["router"]["router_norm_x"]
        assert int(stats["num_batches_tracked"]) == 1
        assert not np.allclose(stats["running_mean"], 0)


def test_bfloat16_compute_keeps_float32_params_and_logits(key):
    # Every expert chosen (K = N): bf16 rounding cannot flip which experts a token uses (with K = 4 such
    # flips pushed ~1% of seeds past 2e-2), so this compares arithmetic alone. Two layers of bf16 compute
    # then differ from f32 by 0.9e-2 typically (p99 1.6e-2 over 300 seeds, a rare 2.3e-2): twice the
    # per-op bf16 tolerance.
    config = LMConfig(**{**SMALL, "ffn": OmniMoEConfig(16, 24, 16, 16)}, dtype="bfloat16")
    tokens = random_tokens(key, config)
    shapes = jax.eval_shape(TransformerLM(config).init, key, tokens)["params"]
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    variables, tokens = init(config.replace(dtype="float32"), key)  # the same variables, compiled once
    logits = apply(config, variables, tokens)
    assert logits.dtype == jnp.float32
    reference = apply(config.replace(dtype="float32"), variables, tokens)
    error = rel_error(logits, reference)
    assert error <= 2 * tolerance(jnp.bfloat16), f"bf16 logits: relative error {error:.3e}"


def test_parameter_counts(key):
    config = LMConfig(**SMALL, tie_embeddings=False)
    variables, _ = init(config, key)
    total = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    counts = parameter_counts(config)
    assert counts["total"] == total
    unused_rows = (config.ffn.num_experts - config.ffn.num_experts_per_token) * config.hidden_size
    assert counts["active"] == total - 2 * unused_rows * config.num_layers


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_heads": 3}, "hidden_size"),
        ({"num_heads": 16}, "hidden_size"),  # head_dim 1 is odd: rotary needs pairs
        ({"ffn": "switch"}, "ffn"),
        ({"moe_every": 3}, "moe_every"),
        ({"num_layers": 0}, "num_layers"),
        ({"context_length": 1.5}, "context_length"),
        ({"tie_embeddings": "yes"}, "tie_embeddings"),
        ({"rope_theta": 0}, "rope_theta"),
        ({"attention": "flash"}, "attention"),
        ({"ffn": {"kind": "omnimoe", "num_experts": 15}}, "num_experts"),
        ({"dtype": "int8"}, "dtype"),
        ({"dense_intermediate_size": 0}, "dense_intermediate_size"),
        ({"hidden_act": "relu9"}, "hidden_act"),
    ],
)
def test_config_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        if isinstance(changes.get("ffn"), dict):  # a change of the FFN's own field: its config refuses it
            changes = {"ffn": SMALL["ffn"].replace(**{k: v for k, v in changes["ffn"].items() if k != "kind"})}
        LMConfig(**{**SMALL, **changes})


def test_each_ffn_kind_validates_only_its_own_fields():
    # 6 experts is no square: OmniMoE's router would refuse it, GShard's top-2 gate has no such limit.
    config = LMConfig(**{**SMALL, "ffn": GShardMoEConfig(16, 6, 32)}, moe_every=2)
    assert (config.ffn_kind, config.ffn.num_experts) == ("gshard", 6)
    assert parameter_counts(config)["total"] > 0
    with pytest.raises(ValueError, match="num_experts=6 must be a perfect square"):
        OmniMoEConfig(16, 24, 6, 4)


def test_the_model_owns_the_ffn_width_activation_and_dtypes():
    config = LMConfig(**{**SMALL, "hidden_size": 32}, hidden_act="gelu", dtype="bfloat16", implementation="xla")
    ffn = config.ffn
    assert (ffn.hidden_size, ffn.hidden_act, ffn.dtype, ffn.implementation) == (32, "gelu", jnp.bfloat16, "xla")
    assert (ffn.num_experts, ffn.intermediate_size) == (16, 24)  # its own fields stay
    peer = LMConfig(**{**SMALL, "ffn": "peer"}).ffn  # by name: its small preset at the model's width
    assert (peer.num_experts, peer.num_heads, peer.hidden_act) == (64, 8, "silu")
    with pytest.raises(ValueError, match="hidden_size=18 must be a multiple of 4"):
        LMConfig(**{**SMALL, "hidden_size": 18, "num_heads": 1, "ffn": "pkm"})


def test_config_round_trips_through_dict():
    config = LMConfig(**SMALL, dtype="bfloat16", moe_every=2)
    assert LMConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["ffn"] == {
        "kind": "omnimoe",
        "intermediate_size": 24,
        "num_experts": 16,
        "num_experts_per_token": 4,
        "router_norm": "batchnorm",
        "router_norm_eps": 1e-5,
        "router_norm_momentum": 0.1,
        "norm_topk_prob": False,
        "expert_axis": None,
        "expert_capacity_factor": None,
        "expert_parallel_layout": "rows",
    }
    with pytest.raises(ValueError, match="unknown LMConfig fields"):
        LMConfig.from_dict({**config.to_dict(), "depth": 3})
    with pytest.raises(ValueError, match=r"ffn fields \['num_heads'\] are not own fields of kind 'omnimoe'"):
        LMConfig.from_dict({**config.to_dict(), "ffn": {**config.to_dict()["ffn"], "num_heads": 2}})


def test_bad_tokens_are_refused(key):
    config = LMConfig(**SMALL)
    variables, tokens = init(config, key)
    model = TransformerLM(config)
    with pytest.raises(ValueError, match="int array"):
        model.apply(variables, tokens.astype(jnp.float32))
    with pytest.raises(ValueError, match="context_length"):
        model.apply(variables, random_tokens(key, config, length=config.context_length + 1))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_hot_embedding_is_the_gather_bit_for_bit(dtype):
    import flax.linen as nn

    from omnimoe_jax._model import _embed_tokens

    embed = nn.Embed(259, 64, dtype=dtype, embedding_init=nn.initializers.normal(1.0))
    tokens = jax.random.randint(jax.random.key(3), (3, 17), 0, 259)
    variables = embed.init(jax.random.key(4), tokens)
    gathered = embed.apply(variables, tokens)  # [3, 17, 64]
    one_hot = embed.apply(variables, tokens, method=lambda module, t: _embed_tokens(module, t, dtype, one_hot=True))
    assert one_hot.dtype == gathered.dtype
    np.testing.assert_array_equal(np.asarray(one_hot, np.float32), np.asarray(gathered, np.float32))


def test_remat_changes_neither_the_logits_nor_the_gradients():
    # Two blocks (remat wraps each) and a short context: the equality does not depend on the size.
    config = LMConfig(
        ffn=OmniMoEConfig(64, 64, 16 * 16, 4),
        hidden_size=64,
        dense_intermediate_size=64,
        num_layers=2,
        context_length=32,
    )
    remat = dataclasses.replace(config, remat=True)
    tokens = random_tokens(jax.random.key(5), config)
    variables = _jitted_init(config)(jax.random.key(6), tokens)

    def loss(params, cfg):
        logits, _ = TransformerLM(cfg).apply(
            {**variables, "params": params}, tokens, train=True, mutable=["batch_stats"]
        )  # [B, L, V]
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    value, grads = value_and_grad(variables["params"], config)
    value_remat, grads_remat = value_and_grad(variables["params"], remat)
    assert_close(value_remat, value, jnp.float32, what="loss")
    for got, want in zip(jax.tree.leaves(grads_remat), jax.tree.leaves(grads), strict=True):
        assert_close(got, want, jnp.float32, what="gradient")


def test_remat_must_be_a_bool():
    with pytest.raises(ValueError, match="remat"):
        LMConfig(remat="yes")
