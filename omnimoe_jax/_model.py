"""A decoder-only Transformer language model whose feed-forward blocks are OmniMoE layers (or a baseline).

Pre-norm blocks: x += Attention(RMSNorm(x)); x += FFN(RMSNorm(x)). Attention is causal, multi-head, with
rotary positions, through `jax.nn.dot_product_attention`. The FFN of every `moe_every`-th layer is
`LMConfig.ffn`, the config of one of the kinds of `omnimoe_jax.ffn_registry` (OmniMoE by default, its FlashMoE
variant, or one of the `omnimoe_jax.baselines`), built as that config's `module_class()`; the other layers use
the dense SwiGLU of width `dense_intermediate_size`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnimoe_jax import ffn_registry
from omnimoe_jax._config import IMPLEMENTATIONS, ConfigMethods, FFNConfig, OmniMoEConfig
from omnimoe_jax._config_fields import float_dtype
from omnimoe_jax._router import RoutingResult
from omnimoe_jax.baselines import DenseFFNConfig
from omnimoe_jax.ffn_registry import FFN_KINDS as FFN_KINDS  # re-exported: omnimoe_jax.FFN_KINDS
from pallas_kernels.activations import ACTIVATIONS

# Kinds of atomic-expert tables routed by the Cartesian router: returning a RoutingResult per layer, and with
# expert-parallel tables (`omnimoe_jax.parallel`).
ROUTED_KINDS = tuple(kind for kind, cls in ffn_registry.FFN_REGISTRY.items() if cls.routed)
# Kinds whose module sows an auxiliary (load-balancing) loss into "losses" when training.
AUX_LOSS_KINDS = tuple(kind for kind, cls in ffn_registry.FFN_REGISTRY.items() if cls.sows_aux_loss)
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
# LMConfig's FFN before the nested `ffn` field was its OmniMoEConfig fields (those not model-owned are these),
# `ffn` a kind's name, and a baseline's fields as `ffn_options`. `LMConfig.from_dict` still reads that form.
_FLAT_FFN_FIELDS = (
    "intermediate_size",
    "num_experts",
    "num_experts_per_token",
    "router_norm",
    "router_norm_eps",
    "router_norm_momentum",
    "norm_topk_prob",
    "expert_axis",
    "expert_capacity_factor",
    "ffn_options",
)
# LMConfig's FFN when none is given (frozen, so one instance can be every default's).
_DEFAULT_FFN = OmniMoEConfig(128, 256, 1024, 16)


@dataclasses.dataclass(frozen=True)
class LMConfig(ConfigMethods):
    """Sizes and switches of the language model, validated at construction.

    Model fields:
      vocab_size: V, number of token ids (the byte tokenizer of `train.data` needs 259).
      context_length: L, longest sequence the model accepts (and is trained on).
      num_layers: Transformer blocks.
      num_heads: attention heads; head_dim = hidden_size / num_heads must be even (rotary pairs).
      hidden_size: d, the model width (and every FFN's).
      ffn: the FFN of the sparse layers: the config of a kind of `omnimoe_jax.ffn_registry` (FFN_KINDS:
        "omnimoe", "dense", "flashmoe", "gshard", "deepseekmoe", "peer", "pkm"), or a kind's name for its
        `small_preset(hidden_size)` (about 12 d^2 active parameters per token; hidden_size must then be a
        multiple of 4, >= 12). Its model-owned fields (hidden_size, hidden_act, dtype, param_dtype,
        implementation, where the kind has them) are replaced by the model's, so that every FFN of a model
        shares one width, activation, dtype and kernel choice. Its expert_axis (OmniMoE, FlashMoE) is left None
        in configs: `python -m train --mesh` sets it for the run, so a stored config trains on any mesh or none.
        Stored in config.json as {"kind": ..., <the kind's own fields>}.
      dense_intermediate_size: width of the dense SwiGLU of the layers that are not sparse (moe_every > 1).
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
      hidden_act: activation of every FFN, by its transformers `ACT2FN` name ("silu", "gelu", ...).
      implementation: every FFN's kernels: "auto" (Pallas kernels on GPU, XLA elsewhere), "xla" or "pallas".
      dtype: compute dtype of the whole model.
      param_dtype: dtype parameters are stored in.
    """

    vocab_size: int = 259
    context_length: int = 256
    num_layers: int = 4
    num_heads: int = 4
    hidden_size: int = 128
    ffn: FFNConfig | str = _DEFAULT_FFN
    dense_intermediate_size: int = 256
    moe_every: int = 1
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    attention: str = "auto"
    remat: bool = False
    hidden_act: str = "silu"
    implementation: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        positive = ("vocab_size", "context_length", "num_layers", "num_heads", "hidden_size", "dense_intermediate_size")
        self._check_positive_ints(*positive, "moe_every")
        # Normalised so equal configs compare (and hash) equal whether given as str or type.
        object.__setattr__(self, "dtype", float_dtype("dtype", self.dtype))
        object.__setattr__(self, "param_dtype", float_dtype("param_dtype", self.param_dtype))
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation={self.implementation!r} must be one of {IMPLEMENTATIONS}")
        object.__setattr__(self, "ffn", self._owned_ffn(self.ffn))
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"hidden_size={self.hidden_size} must split into num_heads={self.num_heads} heads of an even "
                "size (rotary positions rotate pairs of features)"
            )
        if self.moe_every > self.num_layers:
            raise ValueError(
                f"moe_every={self.moe_every} must be <= num_layers={self.num_layers}, or no layer would use "
                f"ffn={self.ffn_kind!r}"
            )
        self._check_bool("tie_embeddings")
        self._check_bool("remat")
        self._check_positive_number("rope_theta")
        self._check_positive_number("norm_eps")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r} must be one of {ATTENTION_IMPLEMENTATIONS}")

    def _owned_ffn(self, ffn: Any) -> FFNConfig:
        """`ffn` (a config or a kind's name) with the model's values of the fields the model owns."""
        if isinstance(ffn, str):
            cls = ffn_registry.config_class(ffn)
            if self.hidden_size % 4 or self.hidden_size < 12:
                raise ValueError(
                    f"hidden_size={self.hidden_size} must be a multiple of 4 and >= 12 for ffn={ffn!r} given by "
                    "name (its sizes are its small_preset(hidden_size)); give its config instead"
                )
            ffn = cls.small_preset(self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)
        kind = ffn_registry.kind_of(ffn)
        names = {f.name for f in dataclasses.fields(ffn)}
        owned = {name: getattr(self, name) for name in ffn_registry.MODEL_OWNED if name in names}
        if all(getattr(ffn, name) == value for name, value in owned.items()):
            return ffn
        try:
            return ffn.replace(**owned)
        except ValueError as err:  # say whose field it is: "hidden_size" alone reads as the model's
            raise ValueError(f"ffn={kind!r}: {err}") from None

    @property
    def ffn_kind(self) -> str:
        """The registered name of `ffn`'s kind ("omnimoe", "gshard", ...)."""
        return ffn_registry.kind_of(self.ffn)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def dense_ffn_config(self) -> DenseFFNConfig:
        """The SwiGLU of the layers that are not sparse (width `dense_intermediate_size`)."""
        return DenseFFNConfig(
            self.hidden_size, self.dense_intermediate_size, self.hidden_act, self.dtype, self.param_dtype
        )

    def layer_ffn_config(self, layer: int) -> FFNConfig:
        """The config of block `layer`'s (0-based) FFN: `ffn` on sparse layers, the dense SwiGLU elsewhere."""
        return self.ffn if self.is_sparse_layer(layer) else self.dense_ffn_config()

    def is_sparse_layer(self, layer: int) -> bool:
        """Whether block `layer` (0-based) uses the `ffn` kind (else the dense SwiGLU)."""
        return (layer + 1) % self.moe_every == 0

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_sparse_layer(i))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable fields (dtypes as names, `ffn` as {"kind", ...}), inverse of `from_dict`."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["ffn"] = ffn_registry.to_dict(self.ffn)
        fields["dtype"] = jnp.dtype(self.dtype).name
        fields["param_dtype"] = jnp.dtype(self.param_dtype).name
        return fields

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> LMConfig:
        """Inverse of `to_dict`; also reads the flat form of earlier run directories (`ffn` a kind's name, the
        OmniMoE fields at the top level and a baseline's as `ffn_options`)."""
        if isinstance(fields.get("ffn"), str) or any(name in fields for name in _FLAT_FFN_FIELDS):
            fields = _from_flat_form(fields)
        fields = dict(fields)
        if isinstance(fields.get("ffn"), dict):
            owned = {name: fields.get(name, _DEFAULTS[name]) for name in ffn_registry.MODEL_OWNED}
            fields["ffn"] = ffn_registry.from_dict(fields["ffn"], owned)
        return super().from_dict(fields)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LMConfig)}


def _from_flat_form(fields: dict[str, Any]) -> dict[str, Any]:
    """The flat LMConfig fields of earlier versions as this version's, the FFN as its kind's config: OmniMoE's
    and FlashMoE's from the top-level fields, the dense kind's width and the dense layers' from
    intermediate_size, a baseline's from its small_preset(hidden_size) with the stored `ffn_options` (the
    sizes the flat form gave the fields it did not store)."""
    fields = dict(fields)
    flat = {name: fields.pop(name) for name in _FLAT_FFN_FIELDS if name in fields}
    kind = fields.pop("ffn", "omnimoe")
    options = flat.pop("ffn_options", {})
    # What a field left out of an earlier config.json meant: that version's LMConfig default.
    shared = {name: fields.get(name, _DEFAULTS[name]) for name in ffn_registry.MODEL_OWNED}
    omni = OmniMoEConfig(
        **{"intermediate_size": 256, "num_experts": 1024, "num_experts_per_token": 16, **flat, **shared}
    )
    fields["dense_intermediate_size"] = omni.intermediate_size
    if kind == "omnimoe":
        fields["ffn"] = omni
    elif kind == "flashmoe":
        flash = ffn_registry.config_class("flashmoe")
        top_k = omni.num_experts_per_token
        same = {name: getattr(omni, name) for name in _FLASHMOE_SHARED}
        fields["ffn"] = flash(num_experts_per_tok=top_k, **same)
    elif kind == "dense":
        fields["ffn"] = DenseFFNConfig(omni.hidden_size, omni.intermediate_size, omni.hidden_act)
    else:
        fields["ffn"] = ffn_registry.config_class(kind).small_preset(omni.hidden_size).replace(**options)
    return fields


# FlashMoEConfig fields that were LMConfig's under the same name (K was num_experts_per_token).
_FLASHMOE_SHARED = (
    "hidden_size",
    "intermediate_size",
    "hidden_act",
    "num_experts",
    "norm_topk_prob",
    "router_norm_eps",
    "router_norm_momentum",
    "dtype",
    "param_dtype",
    "implementation",
    "expert_axis",
    "expert_capacity_factor",
)


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
        """The FFN switch: the module of `config.layer_ffn_config(layer)` (`ffn` on sparse layers, the dense
        SwiGLU elsewhere).

        Every kind is called as `module(h, train=train)` on [B, L, d]. Every sparse kind sows its routing
        statistics into "metrics" (OmniMoE's and FlashMoE's: `omnimoe_jax.routing_statistics`) and the MoEs
        their auxiliary losses into "losses" (when training); the routed kinds (OmniMoE, FlashMoE) hand their
        per-token RoutingResult on only to a caller that asked for it (`return_routing`).
        """
        ffn = self.config.layer_ffn_config(self.layer)
        module = ffn.module_class()(ffn, name="ffn")
        if ffn.routed:  # an unused RoutingResult costs nothing under jit: its outputs are dead code
            y, routing = module(h, train=train, return_routing=True)
            return y, routing if self.return_routing else None
        return module(h, train=train), None


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
    (`FFNConfig.active_parameters`: of OmniMoE's and PEER's expert tables and of PKM's
    values the rows one token retrieves, of a MoE's experts the k it is routed to).
    """
    model = TransformerLM(config)
    tokens = jax.ShapeDtypeStruct((1, config.context_length), jnp.int32)
    shapes = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)["params"]
    total = _size(shapes)
    ffn_active = config.ffn.active_parameters()
    unused = sum(_size(shapes[f"layer_{i}"]["ffn"]) - ffn_active for i in config.sparse_layers)
    return {"total": total, "active": total - unused}


def _size(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
