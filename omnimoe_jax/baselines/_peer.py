"""PEER, "Mixture of A Million Experts" (He 2024, arXiv 2407.04153): product-key retrieval of single-neuron
experts, several retrieval heads sharing one pool."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnimoe_jax._shapes import flatten_tokens
from omnimoe_jax.baselines._config import ACTIVATION_NAMES
from omnimoe_jax.baselines._product_keys import ProductKeyConfig, retrieval_counts
from pallas_kernels import get_activation, omni_expert

EXPERT_IMPLEMENTATIONS = ("reference", "omni_expert")


@dataclasses.dataclass(frozen=True)
class PEERConfig(ProductKeyConfig):
    """Sizes and switches of one PEER layer.

    Attributes:
      hidden_size: d.
      num_experts: N = n*n single-neuron experts (u_e, v_e in R^d each), n >= 2.
      num_heads: h retrieval heads; each has its own query network, all share the sub-keys and the experts.
      experts_per_head: k experts retrieved per head (h * k experts per token), 1 <= k <= N.
      key_dim: query length per head, even; each half (key_dim / 2) scores one sub-key table.
      hidden_act: the experts' activation, by its transformers `ACT2FN` name (PEER's reference: GELU).
      query_norm: "batchnorm" (PEER's query batch normalisation: non-affine, torch semantics) or "none".
      query_norm_eps, query_norm_momentum: BatchNorm constants (torch defaults).
      expert_implementation: "reference" gathers the h*k rows of both tables per token ([T, h, k, d]) and
        contracts them with einsums, as PEER's reference code does; "omni_expert" runs the same step through
        `pallas_kernels.omni_expert` (the OmniMoE expert kernel), so a benchmark can separate what the
        retrieval costs from what the expert step costs.
      implementation: "auto" (Pallas kernels on GPU, XLA elsewhere), "xla" or "pallas": passed to
        `omni_router` (the product-key top-k) and, with expert_implementation="omni_expert", to `omni_expert`.
        With "xla" the top-k is the plain algorithm of PEER's code (top-k per axis, then top-k of the k*k sums).
      dtype, param_dtype: compute and storage dtypes.
    """

    hidden_size: int
    num_experts: int
    num_heads: int
    experts_per_head: int
    key_dim: int
    hidden_act: str = "gelu"
    query_norm: str = "batchnorm"
    query_norm_eps: float = 1e-5
    query_norm_momentum: float = 0.1
    expert_implementation: str = "omni_expert"
    implementation: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    table_field: ClassVar[str] = "num_experts"
    top_k_field: ClassVar[str] = "experts_per_head"
    shared_keys: ClassVar[bool] = True
    table_parameters: ClassVar[frozenset[str]] = frozenset({"up_embed", "down_embed"})  # u_e, v_e

    def __post_init__(self):
        self._check_choice("hidden_act", ACTIVATION_NAMES)
        self._check_choice("expert_implementation", EXPERT_IMPLEMENTATIONS)
        super().__post_init__()

    @classmethod
    def module_class(cls) -> type[nn.Module]:
        return PEER

    def active_parameters(self) -> int:
        h, c = self.num_heads, self.key_dim  # d h c (queries) + n c (sub-keys) + 2 d h k (u_e, v_e)
        return self.hidden_size * h * c + self.num_keys * c + 2 * self.hidden_size * h * self.experts_per_head

    @classmethod
    def small_preset(cls, hidden_size: int, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> Self:
        d, n = hidden_size, hidden_size // 2  # N = (d/2)^2, 8 heads x d/2, key_dim d/2
        return cls(d, n * n, num_heads=8, experts_per_head=n, key_dim=n, dtype=dtype, param_dtype=param_dtype)


def peer_reference_experts(
    tokens: jax.Array, up: jax.Array, down: jax.Array, gates: jax.Array, indices: jax.Array, *, activation: str
) -> jax.Array:
    """y[t] = sum_{h,k} gates[t,h,k] * act(up[e] . x[t]) * down[e], e = indices[t,h,k], as PEER's code does it.

    tokens [T, d]; up, down [N, d]; gates [T, h, k] float; indices [T, h, k] int -> [T, d] in tokens.dtype.
    Gathers both tables' rows per (token, head, slot): [T, h, k, d] twice, the memory traffic the expert
    kernel avoids. Dots accumulate in f32 (f64 for f64 inputs).
    """
    acc = jnp.promote_types(tokens.dtype, jnp.float32)
    up_rows = jnp.take(up, indices, axis=0)  # [T, h, k, d]
    down_rows = jnp.take(down, indices, axis=0)  # [T, h, k, d]
    s = jnp.einsum("thkd,td->thk", up_rows, tokens, preferred_element_type=acc)  # [T, h, k]
    hidden = get_activation(activation).forward(s) * gates.astype(acc)  # [T, h, k]
    y = jnp.einsum("thk,thkd->td", hidden.astype(down.dtype), down_rows, preferred_element_type=acc)  # [T, d]
    return y.astype(tokens.dtype)


class PEER(nn.Module):
    """y = sum over heads h, retrieved experts e of softmax_h(score)_e * act(u_e . x) * v_e.

    1. Flatten the input's leading dims to tokens [T, d].
    2. `retrieval`: per head, a query (with BatchNorm) scores the N experts through two sub-key tables of n
       keys; the exact top k per head; softmax over those k (`ProductKeyRetrieval`, sub-keys shared by heads).
    3. The h*k single-neuron experts: rows u_e of `up_embed` and v_e of `down_embed` ([N, d] each), through
       `expert_implementation`.

    Call `(x, *, train=False)`: x [..., d] -> [..., d]. Variables: "params" {retrieval: {query: {kernel
    [d, h*key_dim]}, sub_keys [2, n, key_dim/2]}, up_embed [N, d], down_embed [N, d]}; with BatchNorm,
    "batch_stats" {retrieval: {query_norm: {running_mean, running_var, num_batches_tracked}}} (pass
    `mutable=["batch_stats"]` when training). Sown outside `init`: "metrics"/"expert_counts", [N] int32,
    how many (token, head, slot) retrievals each expert received (experts in use: `mean(counts > 0)`).
    """

    config: PEERConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        cfg = self.config
        tokens = flatten_tokens(x, cfg.hidden_size, cfg.dtype)  # [T, d]
        num_tokens, heads, top_k = tokens.shape[0], cfg.num_heads, cfg.experts_per_head
        gates, indices = cfg.retrieval()(tokens, train=train)  # [T, h, k] each
        # Rows ~ N(0, 1/d), as OmniMoE's atomic experts: u_e . x is O(1) for unit-scale x.
        init = nn.initializers.normal(stddev=cfg.hidden_size**-0.5)
        shape = (cfg.num_experts, cfg.hidden_size)
        up = self.param("up_embed", init, shape, cfg.param_dtype).astype(cfg.dtype)
        down = self.param("down_embed", init, shape, cfg.param_dtype).astype(cfg.dtype)
        if cfg.expert_implementation == "reference":
            y = peer_reference_experts(tokens, up, down, gates, indices, activation=cfg.hidden_act)  # [T, d]
        else:
            y = omni_expert(
                tokens,
                up,
                down,
                gates.reshape(num_tokens, heads * top_k),  # [T, h*k]
                indices.reshape(num_tokens, heads * top_k),  # [T, h*k]
                activation=cfg.hidden_act,
                implementation=cfg.implementation,
            )  # [T, d]
        if not self.is_initializing():
            self.sow("metrics", "expert_counts", retrieval_counts(indices, cfg.num_experts))
        return y.reshape(*x.shape[:-1], cfg.hidden_size)  # [..., d]
