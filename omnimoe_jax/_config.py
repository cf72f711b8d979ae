"""OmniMoEConfig and FlashMoEConfig: the seeds' configuration fields, validated at construction, and RoutedConfig,
what the two share; FFNConfig, what every FFN kind's config tells the registry (`omnimoe_jax.ffn_registry`)."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, ClassVar, Self

import jax.numpy as jnp

from omnimoe_jax._config_fields import ConfigMethods, float_dtype, is_number
from omnimoe_jax._config_fields import check_known_fields as check_known_fields  # re-exported: train/config.py
from omnimoe_jax.parallel._table_layout import TABLE_LAYOUTS
from pallas_kernels.activations import ACTIVATIONS
from pallas_kernels.omni_expert import config as expert_tiling
from pallas_kernels.omni_router import config as router_tiling

if TYPE_CHECKING:
    import flax.linen as nn

ROUTER_NORMS = ("batchnorm", "none")
IMPLEMENTATIONS = ("auto", "xla", "pallas")


class FFNConfig(ConfigMethods):
    """Base of every FFN kind's config (OmniMoE's, FlashMoE's, the baselines'): what the model, the training
    job and the benchmarks read about a kind, so that a new kind is its own module plus one line in
    `omnimoe_jax.ffn_registry.FFN_REGISTRY`. No fields of its own; every subclass has hidden_size, dtype and
    param_dtype.

    Class attributes:
      sows_aux_loss: the module sows an auxiliary (load-balancing) loss into "losses" when training.
      routed: atomic experts routed by the Cartesian router: the module takes `return_routing=True` and
        returns a `RoutingResult`, and its expert tables shard over a mesh's expert axis (`expert_axis`).
      table_parameters: the names of the module's expert or value tables, the [N, d] parameters whose rows
        only the tokens that chose them read (empty: the kind has none). The training job can give them an
        optimizer group of their own (`train.steps.make_optimizer`), which finds them by these names.
    """

    sows_aux_loss: ClassVar[bool] = False
    routed: ClassVar[bool] = False
    table_parameters: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def module_class(cls) -> type[nn.Module]:
        """The Flax module this config builds, called `(x, *, train=False)` with x [..., d] -> [..., d]."""
        raise NotImplementedError(f"{cls.__name__} names no module")

    def active_parameters(self) -> int:
        """Parameters one token's output is computed from (`omnimoe_jax.baselines.presets` has the table)."""
        raise NotImplementedError(f"{type(self).__name__} counts no active parameters")

    @classmethod
    def small_preset(cls, hidden_size: int, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> Self:
        """This kind at width `hidden_size` (a multiple of 4, >= 12) with about 12 d^2 active parameters per
        token, as the dense SwiGLU of width 4d (`omnimoe_jax.baselines.presets.small_presets`)."""
        raise NotImplementedError(f"{cls.__name__} has no small preset")


class RoutedConfig(FFNConfig):
    """Base of OmniMoEConfig and FlashMoEConfig: a shared SwiGLU MLP plus K of N = n*n atomic experts picked by
    the Cartesian router. No fields of its own: the checks (each error naming the field), n, the
    active-parameter count and the small preset the two kinds share.

    A subclass has hidden_size, intermediate_size, num_experts, hidden_act, router_norm_eps,
    router_norm_momentum, norm_topk_prob, dtype, param_dtype, implementation, expert_axis,
    expert_capacity_factor and expert_parallel_layout, and K under the name `top_k_field` (the seeds spell it
    differently).
    """

    routed: ClassVar[bool] = True
    table_parameters: ClassVar[frozenset[str]] = frozenset({"up_embed", "down_embed"})  # `AtomicExperts`'
    top_k_field: ClassVar[str]

    def __post_init__(self):
        """Validates the shared fields; normalises the dtypes."""
        top_k_field, top_k = self.top_k_field, self.top_k
        self._check_positive_ints("hidden_size", "intermediate_size", "num_experts", top_k_field)
        n = math.isqrt(self.num_experts)
        if n * n != self.num_experts or n < 2:
            below = max(n, 2) ** 2
            above = (n + 1) ** 2 if n >= 2 else 9
            nearest = sorted({below, above} - {self.num_experts})
            raise ValueError(
                f"num_experts={self.num_experts} must be a perfect square n*n with n >= 2 (the Cartesian "
                f"router indexes experts by a row and a column); nearest valid counts: {nearest}"
            )
        if top_k > self.num_experts:
            raise ValueError(f"{top_k_field}={top_k} must be <= num_experts={self.num_experts}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
        self._check_positive_number("router_norm_eps")
        self._check_fraction("router_norm_momentum")
        self._check_bool("norm_topk_prob")
        self._check_choice("implementation", IMPLEMENTATIONS)
        self._check_choice("expert_parallel_layout", TABLE_LAYOUTS)
        axis = self.expert_axis
        if axis is not None and not (isinstance(axis, str) and axis):
            raise ValueError(f"expert_axis={axis!r} must be a mesh axis name (a non-empty str) or None")
        factor = self.expert_capacity_factor
        if factor is not None and (not is_number(factor) or not 0 < factor < math.inf):
            raise ValueError(f"expert_capacity_factor={factor!r} must be None or a positive finite number")
        if factor is not None and self.expert_parallel_layout == "hidden":
            raise ValueError(
                f"expert_capacity_factor={factor!r} caps the row layout's dispatch; expert_parallel_layout="
                "'hidden' computes every pair and would ignore it: use 'rows' (or 'auto') with a factor, or drop it"
            )
        # Normalise dtypes so equal configs compare (and hash) equal whether given as str or type.
        object.__setattr__(self, "dtype", float_dtype("dtype", self.dtype))
        object.__setattr__(self, "param_dtype", float_dtype("param_dtype", self.param_dtype))
        if self.implementation != "pallas":
            return
        # implementation="pallas" names the kernels: refuse here, naming the field, what they cannot take (the ops
        # would refuse it at the first call, naming their own arguments).
        width, axis_size = expert_tiling.MAX_WIDTH, router_tiling.MAX_AXIS_SIZE
        limits = [
            (
                self.hidden_size % 16 == 0 and 16 <= self.hidden_size <= width,
                "hidden_size",
                f"a multiple of 16 in [16, {width}]",
            ),
            (n <= axis_size, "num_experts", f"at most {axis_size}^2 (the router kernel's n <= {axis_size})"),
            (top_k <= router_tiling.MAX_TOP_K, top_k_field, f"at most {router_tiling.MAX_TOP_K}"),
            (self.dtype in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)), "dtype", "float32 or bfloat16"),
        ]
        for ok, field, expected in limits:
            if not ok:
                raise ValueError(
                    f'{field}={getattr(self, field)!r}: implementation="pallas" needs {expected} '
                    '(implementation="auto" uses the XLA reference where the kernels do not apply)'
                )

    @property
    def top_k(self) -> int:
        """K, the experts per token (the field named `top_k_field`)."""
        return getattr(self, self.top_k_field)

    @property
    def num_expert_sqrt(self) -> int:
        """n: experts per router axis (the OmniMoE seed's name; the FlashMoE seed's `num_keys`)."""
        return math.isqrt(self.num_experts)

    def active_parameters(self) -> int:
        """3 d I (shared SwiGLU) + 2 d n (OmniMoE's two gates d -> n, FlashMoE's one d -> 2n) + 2 d K (u_e, v_e)."""
        d = self.hidden_size
        return 3 * d * self.intermediate_size + 2 * d * self.num_expert_sqrt + 2 * d * self.top_k

    @classmethod
    def small_preset(cls, hidden_size: int, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> Self:
        d, n = hidden_size, hidden_size // 2
        return cls(
            hidden_size=d,
            intermediate_size=2 * d,
            hidden_act="silu",
            num_experts=n * n,
            **{cls.top_k_field: 5 * d // 2},
            dtype=dtype,
            param_dtype=param_dtype,
        )


@dataclasses.dataclass(frozen=True)
class OmniMoEConfig(RoutedConfig):
    """Sizes and switches of one OmniMoE layer. Field names follow the seed's `OmniMoEConfig`.

    Attributes:
      hidden_size: d, the model width.
      intermediate_size: I, width of the shared SwiGLU MLP.
      num_experts: N = n*n atomic experts; n >= 2 (the seed floors sqrt(N) silently; we refuse).
      num_experts_per_token: K experts per token, 1 <= K <= N.
      hidden_act: activation of the shared MLP gate and of the atomic experts, by its transformers
        `ACT2FN` name ("silu", "gelu" = exact erf form, "gelu_pytorch_tanh", ...).
      router_norm: "batchnorm" (the seed: non-affine BatchNorm per axis, batch statistics when training and
        running statistics in eval) or "none".
      router_norm_eps: BatchNorm epsilon (torch default 1e-5).
      router_norm_momentum: weight of the new batch in the running statistics (torch convention, 0.1).
      norm_topk_prob: renormalise the K routing weights to sum to one (the FlashMoE variant).
      dtype: compute dtype of the layer (inputs are cast to it; the output has it).
      param_dtype: dtype parameters are stored in.
      implementation: "auto" (Pallas kernels on GPU, XLA elsewhere), "xla" or "pallas".
      expert_axis: name of the device-mesh axis that shards the expert tables (`omnimoe_jax.parallel`), or
        None. When set and the mesh in context (`jax.set_mesh`) has that axis, `AtomicExperts` dispatches
        each token to the shards owning its experts (all_to_all inside `jax.shard_map`); without such a
        mesh the layer computes on whatever devices hold its inputs, with identical results.
      expert_capacity_factor: None (default) lets every token reach every shard it needs, so no routed pair
        is ever dropped. A float f > 0 caps the tokens one device sends to one shard at
        ceil(f * T_local * (1 - (1 - 1/E)^K)) (f times the expected count under uniform routing, at most
        T_local); pairs beyond the cap are dropped and counted in the "intermediates" collection.
      expert_parallel_layout: how the expert tables split over the expert axis (`omnimoe_jax.parallel`):
        "rows" (default: each shard owns N/E whole experts, tokens travel to their experts' shards), "hidden"
        (each shard holds d/E columns of every expert; the [T, K] partial pre-activations are summed across
        shards) or "auto" (the one moving fewer bytes per step, by the rule in
        `omnimoe_jax.parallel._table_layout`). Read only with expert parallelism on.
    """

    hidden_size: int
    intermediate_size: int
    num_experts: int
    num_experts_per_token: int
    hidden_act: str = "silu"
    router_norm: str = "batchnorm"
    router_norm_eps: float = 1e-5
    router_norm_momentum: float = 0.1
    norm_topk_prob: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    implementation: str = "auto"
    expert_axis: str | None = None
    expert_capacity_factor: float | None = None
    expert_parallel_layout: str = "rows"

    top_k_field: ClassVar[str] = "num_experts_per_token"

    def __post_init__(self):
        super().__post_init__()
        if self.router_norm not in ROUTER_NORMS:
            raise ValueError(f"router_norm={self.router_norm!r} must be one of {ROUTER_NORMS}")

    @classmethod
    def module_class(cls) -> type[nn.Module]:
        from omnimoe_jax._layer import OmniMoE  # the layer module imports this one

        return OmniMoE


@dataclasses.dataclass(frozen=True)
class FlashMoEConfig(RoutedConfig):
    """Sizes and switches of one FlashMoE layer (`omnimoe_jax.FlashMoE`). The first six fields are the seed's
    `FlashMoEConfig` (flash-algo/flash-moe), in its order; the rest are `OmniMoEConfig`'s, validated alike.

    Attributes:
      hidden_size: d, the model width.
      intermediate_size: I, width of the shared SwiGLU MLP.
      hidden_act: activation of the shared MLP gate and of the atomic experts (transformers `ACT2FN` name).
      num_experts: N = n*n atomic experts, n >= 2 (the seed floors sqrt(N) silently; we refuse).
      num_experts_per_tok: K experts per token, 1 <= K <= N.
      norm_topk_prob: renormalise the K routing weights to sum to one.
      router_norm_eps, router_norm_momentum: the input BatchNorm's constants (torch's `BatchNorm1d`
        defaults, which the seed uses).
      dtype, param_dtype, implementation, expert_axis, expert_capacity_factor, expert_parallel_layout: as in
        `OmniMoEConfig`.
    """

    hidden_size: int
    intermediate_size: int
    hidden_act: str
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool = False
    router_norm_eps: float = 1e-5
    router_norm_momentum: float = 0.1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    implementation: str = "auto"
    expert_axis: str | None = None
    expert_capacity_factor: float | None = None
    expert_parallel_layout: str = "rows"

    top_k_field: ClassVar[str] = "num_experts_per_tok"

    @classmethod
    def module_class(cls) -> type[nn.Module]:
        from omnimoe_jax._flashmoe import FlashMoE  # the layer module imports this one

        return FlashMoE
