"""The dense baseline: one SwiGLU MLP that every token passes through in full."""

from __future__ import annotations

import dataclasses
from typing import Any, Self

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnimoe_jax._shapes import flatten_tokens
from omnimoe_jax._shared_mlp import SharedMLP
from omnimoe_jax.baselines._config import ACTIVATION_NAMES, BaselineConfig


@dataclasses.dataclass(frozen=True)
class DenseFFNConfig(BaselineConfig):
    """A SwiGLU FFN. Also the config of DeepSeekMoE's always-on shared experts.

    Attributes:
      hidden_size: d.
      intermediate_size: I, the SwiGLU width (3 d I parameters, all active for every token).
      hidden_act: activation of the gate branch, by its transformers `ACT2FN` name.
      dtype, param_dtype: compute and storage dtypes.
    """

    hidden_size: int
    intermediate_size: int
    hidden_act: str = "silu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        self._check_positive_ints("hidden_size", "intermediate_size")
        self._check_choice("hidden_act", ACTIVATION_NAMES)
        super().__post_init__()

    @classmethod
    def module_class(cls) -> type[nn.Module]:
        return DenseFFN

    def active_parameters(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    @classmethod
    def small_preset(cls, hidden_size: int, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> Self:
        return cls(hidden_size, 4 * hidden_size, dtype=dtype, param_dtype=param_dtype)


class DenseFFN(nn.Module):
    """y = down_proj(act(gate_proj x) * up_proj x): `omnimoe_jax.SharedMLP` as a stand-alone FFN.

    Call `(x, *, train=False)` with x [..., d] -> [..., d] (`train` changes nothing; it is accepted so
    every FFN has OmniMoE's signature). Variables: "params" {gate_proj, up_proj, down_proj}, SharedMLP's own
    (its scope is this module's), so the language model's dense layers are this module and keep the
    variables they had as a SharedMLP.
    """

    config: DenseFFNConfig

    def setup(self):
        self.mlp = SharedMLP(self.config)
        nn.share_scope(self, self.mlp)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no batch statistics and no auxiliary loss
        cfg = self.config
        tokens = flatten_tokens(x, cfg.hidden_size, cfg.dtype)  # [T, d]
        y = self.mlp(tokens)  # [T, d]
        return y.reshape(*x.shape[:-1], cfg.hidden_size)  # [..., d]
