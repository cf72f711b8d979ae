"""GShard (Lepikhin et al. 2020, arXiv 2006.16668): the classic coarse top-2 MoE with expert capacity."""

from __future__ import annotations

import dataclasses
from typing import Any, Self

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnimoe_jax._shapes import flatten_tokens
from omnimoe_jax.baselines._moe import CoarseMoEConfig, routed_experts


@dataclasses.dataclass(frozen=True)
class GShardMoEConfig(CoarseMoEConfig):
    """A few wide experts, top-2 softmax gating, a fixed capacity per expert.

    Attributes:
      hidden_size: d.
      num_experts: E.
      expert_intermediate_size: I_e, the width of each expert (a SwiGLU here, like every FFN in this
        comparison; GShard's own experts were ReLU MLPs).
      num_experts_per_token: k (GShard: 2), 1 <= k <= E.
      capacity_factor: each expert takes at most C = ceil(capacity_factor * k * T / E) tokens per call;
        first choices fill the buffers before second choices; overflowing pairs are dropped (their expert
        contributes nothing to that token) and counted in "metrics"/"dropped_pairs".
      norm_topk_prob: rescale the k gates to sum to 1 (GShard's combine weights do; set False for top-1
        Switch-style gating, where normalising would make every gate 1).
      hidden_act: activation of the experts' SwiGLU gate.
      aux_loss_weight: weight of the balance loss sown as "losses"/"aux_loss" when training.
      dtype, param_dtype: compute and storage dtypes.
    """

    hidden_size: int
    num_experts: int
    expert_intermediate_size: int
    num_experts_per_token: int = 2
    capacity_factor: float = 1.25
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    aux_loss_weight: float = 0.01
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @classmethod
    def module_class(cls) -> type[nn.Module]:
        return GShardMoE

    @classmethod
    def small_preset(cls, hidden_size: int, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> Self:
        d = hidden_size  # 16 experts of 2d, top 2
        return cls(d, 16, 2 * d, 2, dtype=dtype, param_dtype=param_dtype)


class GShardMoE(nn.Module):
    """y = sum over the k chosen experts e (that had room) of g_e * SwiGLU_e(x).

    1. Flatten the input's leading dims to tokens [T, d].
    2. `gate`: p = softmax(logits [T, E]); top-k of p, renormalised to sum 1 (`norm_topk_prob`).
    3. `experts`: capacity dispatch (see `_moe`): buffers [E, C, d], first choices first, overflow dropped.

    Call `(x, *, train=False)`: x [..., d] -> [..., d]. Variables: "params" {gate: {kernel [d, E]},
    experts: {gate_proj [E, d, I_e], up_proj [E, d, I_e], down_proj [E, I_e, d]}}.

    Sown (outside `init`; pass the collection in `mutable=` to receive it):
      "losses"/"aux_loss": aux_loss_weight * E * sum_e f_e P_e, when `train`, with f_e the fraction of
        tokens whose first choice is e and P_e the mean gate probability of e (1.0 when balanced).
      "metrics"/"balance_loss": the unweighted balance loss.
      "metrics"/"expert_counts": [E] int32, how many of the T*k assignments each expert received (before
        dropping).
      "metrics"/"dropped_pairs": int32 count of (token, expert) pairs dropped for lack of capacity.
    """

    config: GShardMoEConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        cfg = self.config
        tokens = flatten_tokens(x, cfg.hidden_size, cfg.dtype)  # [T, d]
        y = routed_experts(self, tokens, dispatch="capacity", balance_first_choices=True, train=train)  # [T, d]
        return y.reshape(*x.shape[:-1], cfg.hidden_size)  # [..., d]
