"""A decoder-only Transformer language model whose feed-forward blocks are OmniMoE layers (or a baseline).

Pre-norm blocks: x += Attention(RMSNorm(x)); x += FFN(RMSNorm(x)). Attention is causal, multi-head, with
rotary positions, through `jax.nn.dot_product_attention`. The FFN of every `moe_every`-th layer is the
sparse kind named by `LMConfig.ffn` (OmniMoE by default, its FlashMoE variant, or one of the
`omnimoe_jax.baselines`); the other
layers use the dense SwiGLU `SharedMLP`. `_feed_forward` is the one place that maps the `ffn` name to a
module, and `LMConfig.sparse_ffn_config` the one place that builds that module's config.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnimoe_jax._config import ConfigMethods, FlashMoEConfig, OmniMoEConfig
from omnimoe_jax._flashmoe import FlashMoE
from omnimoe_jax._layer import OmniMoE
from omnimoe_jax._router import RoutingResult
from omnimoe_jax._shared_mlp import SharedMLP
from omnimoe_jax.baselines import (
    PEER,
    PKM,
    DeepSeekMoE,
    DeepSeekMoEConfig,
    DenseFFNConfig,
    GShardMoE,
    GShardMoEConfig,
    PEERConfig,
    PKMConfig,
)
from omnimoe_jax.baselines.presets import FFNConfig, active_parameters, small_presets

# The baseline FFN kinds: module and config class. Their sizes are `ffn_options` (see LMConfig).
_BASELINES = {
    "gshard": (GShardMoE, GShardMoEConfig),
    "deepseekmoe": (DeepSeekMoE, DeepSeekMoEConfig),
    "peer": (PEER, PEERConfig),
    "pkm": (PKM, PKMConfig),
}
# Feed-forward kinds a sparse layer can use ("dense" = the SwiGLU SharedMLP everywhere).
FFN_KINDS = ("omnimoe", "dense", "flashmoe", *_BASELINES)
# Kinds of atomic-expert tables routed by the Cartesian router: sized by LMConfig's own FFN fields, returning a
# RoutingResult per layer, and with expert-parallel tables (`omnimoe_jax.parallel`).
ROUTED_KINDS = ("omnimoe", "flashmoe")
# Kinds whose module sows an auxiliary (load-balancing) loss into "losses" when training.
AUX_LOSS_KINDS = ("gshard", "deepseekmoe")
# Baseline config fields the model sets from its own fields of the same name, so that every FFN of a model
# shares one width, dtype, activation and kernel choice; a baseline's other fields are its `ffn_options`.
_MODEL_OWNED = ("hidden_size", "dtype", "param_dtype", "hidden_act", "implementation")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
# LMConfig fields that are OmniMoEConfig fields: the FFN of every layer is built from them.
_FFN_FIELDS = tuple(f.name for f in dataclasses.fields(OmniMoEConfig))
# The FlashMoEConfig fields LMConfig has under the same name (all but num_experts_per_tok: K is
# num_experts_per_token here, as in OmniMoEConfig).
_FLASHMOE_FIELDS = tuple(f.name for f in dataclasses.fields(FlashMoEConfig) if f.name in _FFN_FIELDS)


@dataclasses.dataclass(frozen=True)
class LMConfig(ConfigMethods):
    """Sizes and switches of the language model, validated at construction.

    Model fields:
      vocab_size: V, number of token ids (the byte tokenizer of `train.data` needs 259).
      context_length: L, longest sequence the model accepts (and is trained on).
      num_layers: Transformer blocks.
      num_heads: attention heads; head_dim = hidden_size / num_heads must be even (rotary pairs).
      ffn: the FFN of the sparse layers, one of FFN_KINDS: "omnimoe", "dense" (the SwiGLU of width
        intermediate_size), "flashmoe" (`omnimoe_jax.FlashMoE`, sized by the same fields as "omnimoe"; it has
        no router_norm="none"), or a baseline of `omnimoe_jax.baselines`: "gshard", "deepseekmoe", "peer",
        "pkm".
      ffn_options: the baseline `ffn`'s own config fields, as a dict (stored as sorted (field, value)
        pairs; `ffn_option_types(ffn)` lists them). A field not given takes its value from
        `omnimoe_jax.baselines.presets.small_presets(hidden_size)[ffn]`, the sizes that give every kind about
        12 d^2 active parameters per token (so hidden_size must then be a multiple of 4, >= 12). The
        baseline's hidden_size, dtype, param_dtype, hidden_act and implementation are the model's. Must be
        empty for "omnimoe", "flashmoe" and "dense", which are sized by the FFN fields below.
      moe_every: layer i (0-based) uses `ffn` when (i + 1) % moe_every == 0, the dense SwiGLU otherwise
        (1: every layer; 2: layers 1, 3, 5, ...).
      tie_embeddings: the output projection reuses the token embedding table.
      rope_theta: rotary base wavelength.
      norm_eps: RMSNorm epsilon.
      attention: "auto" (cuDNN flash attention on GPU for bf16/f16 and head_dim a multiple of 8 up to
        128, XLA otherwise), "xla" or "cudnn". (`dot_product_attention(implementation=None)` means XLA in
        jax 0.10-0.11, so "auto" chooses explicitly.)
      remat: recompute each block's activations in the backward pass (`nn.remat`, i.e. `jax.checkpoint`,
        per Transformer block) instead of keeping them: activation memory of one block instead of all, for
        about a third more compute. The result is the same.

    FFN fields (the `OmniMoEConfig` fields, same names and meaning): hidden_size, intermediate_size,
    num_experts, num_experts_per_token, hidden_act, router_norm, router_norm_eps, router_norm_momentum,
    norm_topk_prob, dtype (compute dtype of the whole model), param_dtype, implementation,
    expert_capacity_factor, and expert_axis (left None in configs: `python -m train --mesh` sets it for the
    run, so a stored config trains on any mesh or none).
    """

    vocab_size: int = 259
    context_length: int = 256
    num_layers: int = 4
    num_heads: int = 4
    hidden_size: int = 128
    intermediate_size: int = 256
    num_experts: int = 1024
    num_experts_per_token: int = 16
    hidden_act: str = "silu"
    router_norm: str = "batchnorm"
    router_norm_eps: float = 1e-5
    router_norm_momentum: float = 0.1
    norm_topk_prob: bool = False
    implementation: str = "auto"
    expert_axis: str | None = None
    expert_capacity_factor: float | None = None
    ffn: str = "omnimoe"
    ffn_options: tuple[tuple[str, Any], ...] = ()
    moe_every: int = 1
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    attention: str = "auto"
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for field in ("vocab_size", "context_length", "num_layers", "num_heads", "moe_every"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field}={value!r} must be a positive int")
        # Validates every FFN field (naming it) and normalises the dtypes.
        ffn = self.ffn_config()
        object.__setattr__(self, "dtype", ffn.dtype)
        object.__setattr__(self, "param_dtype", ffn.param_dtype)
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"hidden_size={self.hidden_size} must split into num_heads={self.num_heads} heads of an even "
                "size (rotary positions rotate pairs of features)"
            )
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ffn={self.ffn!r} must be one of {FFN_KINDS}")
        object.__setattr__(self, "ffn_options", _option_pairs(self.ffn_options))
        if self.ffn_options and self.ffn not in _BASELINES:
            raise ValueError(
                f"ffn_options={dict(self.ffn_options)} set a baseline's fields, but ffn={self.ffn!r} is sized by "
                "LMConfig's own fields (intermediate_size, num_experts, ...)"
            )
        self.sparse_ffn_config()  # validates a baseline's options, naming the field
        if self.moe_every > self.num_layers:
            raise ValueError(
                f"moe_every={self.moe_every} must be <= num_layers={self.num_layers}, or no layer would use "
                f"ffn={self.ffn!r}"
            )
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings={self.tie_embeddings!r} must be a bool")
        if not isinstance(self.remat, bool):
            raise ValueError(f"remat={self.remat!r} must be a bool")
        for field in ("rope_theta", "norm_eps"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                raise ValueError(f"{field}={value!r} must be a positive finite number")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r} must be one of {ATTENTION_IMPLEMENTATIONS}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def ffn_config(self) -> OmniMoEConfig:
        """The `OmniMoEConfig` every layer's feed-forward block is built from."""
        return OmniMoEConfig(**{name: getattr(self, name) for name in _FFN_FIELDS})

    def sparse_ffn_config(self) -> FFNConfig:
        """The config of the `ffn` module of the sparse layers: an OmniMoEConfig, a FlashMoEConfig (from the
        same fields), a DenseFFNConfig (the SwiGLU of width intermediate_size) or the baseline's config (see
        `ffn_options`)."""
        if self.ffn == "omnimoe":
            return self.ffn_config()
        if self.ffn == "flashmoe":
            if self.router_norm != "batchnorm":
                raise ValueError(
                    f"router_norm={self.router_norm!r}: ffn='flashmoe' always normalises its input tokens with a "
                    "BatchNorm (router_norm='batchnorm')"
                )
            fields = {name: getattr(self, name) for name in _FLASHMOE_FIELDS}
            return FlashMoEConfig(**fields, num_experts_per_tok=self.num_experts_per_token)
        if self.ffn == "dense":
            return DenseFFNConfig(
                self.hidden_size, self.intermediate_size, self.hidden_act, self.dtype, self.param_dtype
            )
        if self.hidden_size % 4 or self.hidden_size < 12:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be a multiple of 4 and >= 12 for ffn={self.ffn!r} (its "
                "default sizes are omnimoe_jax.baselines.presets.small_presets(hidden_size))"
            )
        options = dict(self.ffn_options)
        valid = ffn_option_types(self.ffn)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"ffn_options {unknown} are not fields of ffn={self.ffn!r}; its fields: {sorted(valid)}")
        defaults = small_presets(self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)[self.ffn]
        owned = {name: getattr(self, name) for name in _MODEL_OWNED if hasattr(defaults, name)}
        try:
            return defaults.replace(**owned, **options)
        except ValueError as err:  # say whose field it is: "num_heads" alone reads as the attention's
            raise ValueError(f"ffn={self.ffn!r} with ffn_options {options}: {err}") from None

    def is_sparse_layer(self, layer: int) -> bool:
        """Whether block `layer` (0-based) uses the `ffn` kind (else the dense SwiGLU)."""
        return (layer + 1) % self.moe_every == 0

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_sparse_layer(i))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable fields (dtypes as names), inverse of `from_dict`."""
        return {**super().to_dict(), "ffn_options": dict(self.ffn_options)}


def ffn_option_types(kind: str) -> dict[str, Any]:
    """{field: type} of the `ffn_options` FFN `kind` accepts: its config's fields but those the model owns
    (hidden_size, dtype, param_dtype, hidden_act, implementation); {} for "omnimoe", "flashmoe" and "dense"."""
    if kind not in FFN_KINDS:
        raise ValueError(f"ffn={kind!r} must be one of {FFN_KINDS}")
    if kind not in _BASELINES:
        return {}
    hints = typing.get_type_hints(_BASELINES[kind][1])
    return {f.name: hints[f.name] for f in dataclasses.fields(_BASELINES[kind][1]) if f.name not in _MODEL_OWNED}


def _option_pairs(options: Any) -> tuple[tuple[str, Any], ...]:
    """ffn_options as sorted (field, value) pairs (hashable, so equal configs compare and hash equal)."""
    if isinstance(options, Mapping):
        pairs = list(options.items())
    elif isinstance(options, (tuple, list)) and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in options):
        pairs = [tuple(p) for p in options]
    else:
        raise ValueError(f"ffn_options={options!r} must be a dict of baseline config fields")
    names = [name for name, _ in pairs]
    if not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
        raise ValueError(f"ffn_options={options!r} must name each field (a str) once")
    return tuple(sorted(pairs, key=lambda pair: pair[0]))


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding: rotate feature pairs (i, i + D/2) by position * theta^(-2i/D).

    x: [B, L, H, D], positions: [L] int -> [B, L, H, D] in x.dtype (angles and rotation in f32).
    """
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [D/2]
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [L, D/2]
    sin = jnp.sin(angles)[None, :, None, :]  # [1, L, 1, D/2]
    cos = jnp.cos(angles)[None, :, None, :]  # [1, L, 1, D/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B, L, H, D/2] each
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [B, L, H, D]
    return rotated.astype(x.dtype)


def attention_implementation(config: LMConfig) -> str:
    """The `dot_product_attention` implementation "auto" resolves to on this backend."""
    if config.attention != "auto":
        return config.attention
    cudnn_ok = (
        jax.default_backend() == "gpu"
        and jnp.dtype(config.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and config.head_dim % 8 == 0
        and config.head_dim <= 128
    )
    return "cudnn" if cudnn_ok else "xla"


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary positions; no biases."""

    config: LMConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # x: [B, L, d] -> [B, L, d]
        cfg = self.config
        dense = dict(
            features=(cfg.num_heads, cfg.head_dim), use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype
        )
        positions = jnp.arange(x.shape[1])  # [L]
        q = rotary(nn.DenseGeneral(**dense, name="query")(x), positions, cfg.rope_theta)  # [B, L, H, D]
        k = rotary(nn.DenseGeneral(**dense, name="key")(x), positions, cfg.rope_theta)  # [B, L, H, D]
        v = nn.DenseGeneral(**dense, name="value")(x)  # [B, L, H, D]
        out = jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=attention_implementation(cfg)
        )  # [B, L, H, D]
        return nn.DenseGeneral(
            cfg.hidden_size, axis=(-2, -1), use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="out"
        )(out)  # [B, L, d]


class Block(nn.Module):
    """x + Attention(RMSNorm(x)), then + FFN(RMSNorm(x)). Returns (x, RoutingResult or None).

    `train` and `return_routing` are fields rather than call arguments so that `nn.remat(Block)` needs no
    static arguments. The RoutingResult is None unless `return_routing` (and the FFN is OmniMoE or FlashMoE).
    """

    config: LMConfig
    layer: int
    train: bool = False
    return_routing: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, RoutingResult | None]:
        # x: [B, L, d] -> [B, L, d]
        cfg, train = self.config, self.train
        norm = dict(epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        x = x + CausalSelfAttention(cfg, name="attention")(nn.RMSNorm(**norm, name="attention_norm")(x))
        y, routing = self._feed_forward(nn.RMSNorm(**norm, name="ffn_norm")(x), train=train)
        return x + y.astype(x.dtype), routing

    def _feed_forward(self, h: jax.Array, *, train: bool) -> tuple[jax.Array, RoutingResult | None]:
        """The FFN switch: the module `config.ffn` names on sparse layers, the dense SwiGLU elsewhere.

        Every kind is called as `module(h, train=train)` on [B, L, d]. Every sparse kind sows its routing
        statistics into "metrics" (OmniMoE's and FlashMoE's: `omnimoe_jax.routing_statistics`) and the MoEs
        their auxiliary losses into "losses" (when training); OmniMoE and FlashMoE return their per-token
        RoutingResult only for a caller that asked for it (`return_routing`).
        """
        cfg = self.config
        kind = cfg.ffn if cfg.is_sparse_layer(self.layer) else "dense"
        if kind == "dense":
            return SharedMLP(cfg.ffn_config(), name="ffn")(h), None
        if kind == "omnimoe":
            out = OmniMoE(cfg.ffn_config(), name="ffn")(h, train=train, return_routing=self.return_routing)
            return out if self.return_routing else (out, None)
        if kind == "flashmoe":
            module = FlashMoE(cfg.sparse_ffn_config(), name="ffn")
            y, routing = module(h, train=train, return_routing=self.return_routing)
            return y, routing if self.return_routing else None  # else the second output is its router logits
        if kind in _BASELINES:
            module = _BASELINES[kind][0]
            return module(cfg.sparse_ffn_config(), name="ffn")(h, train=train), None
        raise ValueError(f"ffn={kind!r} has no module; expected one of {FFN_KINDS}")


class TransformerLM(nn.Module):
    """Decoder-only language model: embed, `num_layers` pre-norm blocks, final RMSNorm, unembed.

    Call: `(tokens, *, train=False, return_routing=False)`, tokens [B, L] int with L <= context_length.
    Returns logits [B, L, V] f32 and, with `return_routing`, a tuple with one `RoutingResult` ([B, L, K]
    and [B, L, n] fields) per OmniMoE or FlashMoE layer, in layer order (`config.sparse_layers`); empty for
    other kinds: what each token chose, for a user to inspect. The routing statistics of every sparse kind
    travel one way, sown into "metrics" (what the training loop reads; see below).

    Variables: "params" {embed, layer_<i>: {attention_norm, attention, ffn_norm, ffn}, final_norm,
    [lm_head]} and, for OmniMoE layers with router_norm="batchnorm", FlashMoE layers and PEER/PKM layers with
    query_norm="batchnorm", "batch_stats" {layer_<i>: {ffn: ...}}: with `train=True` pass
    `mutable=["batch_stats"]` to keep the updated running statistics. The sparse FFNs sow, under
    {layer_<i>: {ffn: ...}}, "metrics" ("expert_counts" for every kind; "router_entropy" for OmniMoE and
    FlashMoE; "dropped_pairs", "balance_loss" for the MoEs that have them: see each module) and "losses"
    (GShard's and DeepSeekMoE's weighted balance loss "aux_loss", when training); OmniMoE and FlashMoE sow
    "intermediates" {layer_<i>: {ffn: {experts: {"dispatch_dropped_pairs"}}}} (expert-parallel dispatch drops,
    `omnimoe_jax.AtomicExperts`). List a collection in `mutable` to get it.
    """

    config: LMConfig

    @nn.compact
    def __call__(
        self, tokens: jax.Array, *, train: bool = False, return_routing: bool = False
    ) -> jax.Array | tuple[jax.Array, tuple[RoutingResult, ...]]:
        cfg = self.config
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an int array [batch, length], got {tokens.dtype} {tokens.shape}")
        if tokens.shape[1] > cfg.context_length:
            raise ValueError(f"tokens length {tokens.shape[1]} exceeds context_length={cfg.context_length}")
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            # Unit-norm rows: with tied embeddings the RMS-normalised output dotted with a row is O(1).
            embedding_init=nn.initializers.normal(stddev=cfg.hidden_size**-0.5),
            name="embed",
        )
        x = _embed_tokens(embed, tokens, cfg.dtype)  # [B, L, d]
        routings = []
        block = nn.remat(Block) if cfg.remat else Block
        for layer in range(cfg.num_layers):
            x, routing = block(cfg, layer, train, return_routing, name=f"layer_{layer}")(x)  # [B, L, d]
            if routing is not None:
                routings.append(routing)
        x = nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)  # [B, L, V]
        else:
            logits = nn.Dense(
                cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="lm_head"
            )(x)  # [B, L, V]
        logits = logits.astype(jnp.float32)  # the softmax and loss run in f32 whatever the compute dtype
        return (logits, tuple(routings)) if return_routing else logits


# Vocabularies up to this size are embedded as one-hot rows times the table, a matrix product whose gradient
# is one too. A gather's gradient is a scatter-add, and with few distinct ids (a byte vocabulary: 259 rows
# for tens of thousands of tokens) its atomic adds collide on the same rows and serialise: on GPUs that one
# scatter took longer than the rest of the training step. The product costs 2 V d FLOPs per token. A CPU's
# scatter-add is sequential and fast, and keeps the table gradient's summation order fixed however XLA
# splits a product over threads (bitwise resume across processes relies on it): the gather stays there.
ONE_HOT_EMBEDDING_MAX_VOCAB = 4096


def _embed_tokens(embed: nn.Embed, tokens: jax.Array, dtype: Any, *, one_hot: bool | None = None) -> jax.Array:
    """Rows of the embedding table for tokens [B, L] -> [B, L, d] in `dtype`: exactly `embed(tokens)`.

    `one_hot`: None chooses (one-hot product on a GPU for vocabularies up to ONE_HOT_EMBEDDING_MAX_VOCAB).
    """
    if one_hot is None:
        one_hot = jax.default_backend() == "gpu" and embed.num_embeddings <= ONE_HOT_EMBEDDING_MAX_VOCAB
    if not one_hot:
        return embed(tokens)
    table = jnp.asarray(embed.embedding, dtype)  # [V, d]
    rows = jax.nn.one_hot(tokens, embed.num_embeddings, dtype=dtype)  # [B, L, V], exact 0s and 1s
    # One nonzero product per output: exact at HIGHEST precision (f32 would otherwise round to TF32 on GPUs).
    return jnp.einsum("blv,vd->bld", rows, table, precision=jax.lax.Precision.HIGHEST)  # [B, L, d]


def parameter_counts(config: LMConfig) -> dict[str, int]:
    """{"total": every parameter, "active": those one token uses} without allocating (jax.eval_shape).

    Active counts every parameter, except that each sparse layer's FFN counts only its active parameters
    (`omnimoe_jax.baselines.presets.active_parameters`: of OmniMoE's and PEER's expert tables and of PKM's
    values the rows one token retrieves, of a MoE's experts the k it is routed to).
    """
    model = TransformerLM(config)
    tokens = jax.ShapeDtypeStruct((1, config.context_length), jnp.int32)
    shapes = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)["params"]
    total = _size(shapes)
    ffn_active = active_parameters(config.sparse_ffn_config())
    unused = sum(_size(shapes[f"layer_{i}"]["ffn"]) - ffn_active for i in config.sparse_layers)
    return {"total": total, "active": total - unused}


def _size(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
