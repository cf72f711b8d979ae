"""The shared dense branch every token passes through."""

from __future__ import annotations

import flax.linen as nn
import jax

from omnimoe_jax._config import OmniMoEConfig
from pallas_kernels import get_activation


class SharedMLP(nn.Module):
    """SwiGLU without biases: down_proj(act(gate_proj x) * up_proj x), width `intermediate_size`."""

    config: OmniMoEConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        # tokens: [..., d] -> [..., d]
        cfg = self.config
        act = get_activation(cfg.hidden_act).forward
        dense = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        gate = nn.Dense(cfg.intermediate_size, **dense, name="gate_proj")(tokens)  # [..., I]
        up = nn.Dense(cfg.intermediate_size, **dense, name="up_proj")(tokens)  # [..., I]
        return nn.Dense(cfg.hidden_size, **dense, name="down_proj")(act(gate) * up)  # [..., d]
