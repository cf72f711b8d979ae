"""DeepSeekMoE (Dai et al. 2024, arXiv 2401.06066): many small routed SwiGLU experts plus always-on shared ones."""

from __future__ import annotations

import dataclasses
from typing import Any, Self

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnimoe_jax._shapes import flatten_tokens
from omnimoe_jax._shared_mlp import SharedMLP
from omnimoe_jax.baselines._dense import DenseFFNConfig
from omnimoe_jax.baselines._moe import DISPATCHES, CoarseMoEConfig, routed_experts


@dataclasses.dataclass(frozen=True)
class DeepSeekMoEConfig(CoarseMoEConfig):
    """Fine-grained routed experts with top-k softmax gating, plus shared experts every token uses.

    Attributes:
      hidden_size: d.
      num_experts: E routed experts.
      expert_intermediate_size: I_e, the SwiGLU width of one routed expert.
      num_experts_per_token: k routed experts per token, 1 <= k <= E.
      shared_intermediate_size: total SwiGLU width of the shared experts (K_s shared experts of width I_e
        are one SwiGLU of width K_s * I_e); 0 for none.
      hidden_act: activation of every SwiGLU, by its transformers `ACT2FN` name.
      norm_topk_prob: rescale the k gates to sum to 1 (DeepSeekMoE itself does not).
      aux_loss_weight: alpha of the expert-level balance loss sown as "losses"/"aux_loss" when training.
      dispatch: "sorted" (dropless: pairs sorted by expert, computed in per-expert tiles) or "capacity"
        (fixed per-expert buffers of ceil(capacity_factor * k * T / E) rows; overflow is dropped and counted).
      capacity_factor: used by dispatch="capacity" only.
      dtype, param_dtype: compute and storage dtypes.
    """

    hidden_size: int
    num_experts: int
    expert_intermediate_size: int
    num_experts_per_token: int
    shared_intermediate_size: int = 0
    hidden_act: str = "silu"
    norm_topk_prob: bool = False
    aux_loss_weight: float = 0.001
    dispatch: str = "sorted"
    capacity_factor: float = 1.25
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        self._check_non_negative_int("shared_intermediate_size")
        self._check_choice("dispatch", DISPATCHES)
        super().__post_init__()

    @classmethod
    def module_class(cls) -> type[nn.Module]:
        return DeepSeekMoE

    def active_parameters(self) -> int:
        return 3 * self.hidden_size * self.shared_intermediate_size + super().active_parameters()  # + shared

    @classmethod
    def small_preset(cls, hidden_size: int, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> Self:
        d = hidden_size  # 64 experts of d/2, top 6, shared d
        return cls(d, 64, d // 2, 6, shared_intermediate_size=d, dtype=dtype, param_dtype=param_dtype)


class DeepSeekMoE(nn.Module):
    """y = shared(x) + sum over the k chosen experts e of g_e * SwiGLU_e(x).

    1. Flatten the input's leading dims to tokens [T, d].
    2. `gate`: logits [T, E]; p = softmax(logits); the k largest p are the gates g (renormalised only if
       `norm_topk_prob`).
    3. `experts`: the routed SwiGLUs, grouped by expert (see `_moe`: "sorted" expert tiles or "capacity").
    4. `shared`: one SwiGLU of width `shared_intermediate_size` (`omnimoe_jax.SharedMLP`), added.

    Call `(x, *, train=False)`: x [..., d] -> [..., d]. Variables: "params" {gate: {kernel [d, E]},
    experts: {gate_proj [E, d, I_e], up_proj [E, d, I_e], down_proj [E, I_e, d]}, shared: {gate_proj,
    up_proj, down_proj}}.

    Sown (outside `init`; pass the collection in `mutable=` to receive it):
      "losses"/"aux_loss": aux_loss_weight * balance loss, when `train` (add every "losses" leaf to the loss).
      "metrics"/"balance_loss": the unweighted balance loss (1.0 = perfectly balanced).
      "metrics"/"expert_counts": [E] int32, how many of the T*k assignments each expert received.
      "metrics"/"dropped_pairs": int32 count of (token, expert) pairs over capacity (dispatch="capacity").
    """

    config: DeepSeekMoEConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        cfg = self.config
        tokens = flatten_tokens(x, cfg.hidden_size, cfg.dtype)  # [T, d]
        y = routed_experts(self, tokens, dispatch=cfg.dispatch, balance_first_choices=False, train=train)  # [T, d]
        if cfg.shared_intermediate_size:
            shared = DenseFFNConfig(
                cfg.hidden_size, cfg.shared_intermediate_size, cfg.hidden_act, cfg.dtype, cfg.param_dtype
            )
            y = y + SharedMLP(shared, name="shared")(tokens)  # [T, d]
        return y.reshape(*x.shape[:-1], cfg.hidden_size)  # [..., d]
