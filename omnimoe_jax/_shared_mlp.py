"""The shared dense branch every token passes through."""

from __future__ import annotations

from typing import Any, Protocol

import flax.linen as nn
import jax

from pallas_kernels import get_activation


class SwiGLUConfig(Protocol):
    """The fields `SharedMLP` reads. `OmniMoEConfig` has them, and so do the baselines' configs (the dense
    FFN and DeepSeekMoE's shared experts reuse this module rather than a second SwiGLU)."""

    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Any
    param_dtype: Any


class SharedMLP(nn.Module):
    """SwiGLU without biases: down_proj(act(gate_proj x) * up_proj x), width `intermediate_size`."""

    config: SwiGLUConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        # tokens: [..., d] -> [..., d]
        cfg = self.config
        act = get_activation(cfg.hidden_act).forward
        dense = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        gate = nn.Dense(cfg.intermediate_size, **dense, name="gate_proj")(tokens)  # [..., I]
        up = nn.Dense(cfg.intermediate_size, **dense, name="up_proj")(tokens)  # [..., I]
        return nn.Dense(cfg.hidden_size, **dense, name="down_proj")(act(gate) * up)  # [..., d]
