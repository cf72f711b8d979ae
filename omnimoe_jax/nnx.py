"""Every layer of this package from Flax NNX, through Flax's own bridge (`flax.nnx.bridge.ToNNX`).

    from flax import nnx
    from omnimoe_jax import OmniMoE, nnx as omnimoe_nnx

    layer = omnimoe_nnx.Linen(OmniMoE(config), x, rngs=nnx.Rngs(0))  # initialised from a sample input
    y = layer(x)                 # eval: the routers' running BatchNorm statistics
    y = layer(x, train=True)     # training: batch statistics, and the running ones updated in place

The linen variables become NNX variables of the wrapper: "params" as `nnx.Param` (what `nnx.Optimizer`
and `nnx.grad` take by default) and "batch_stats" as `nnx.BatchStat`. The one thing the bare bridge needs
that an NNX user would not expect is `mutable=["batch_stats"]` on every training call (without it linen
raises `ModifyScopeVariableError` when the router's BatchNorm updates its statistics); `Linen` passes it
whenever `train=True`. Any other argument goes to the linen module's `__call__` unchanged.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from flax import nnx

__all__ = ["Linen"]


class Linen(nnx.Module):
    """A linen module of this package (OmniMoE, CartesianRouter, TransformerLM, a baseline, ...) as an
    initialised NNX module.

    Args:
      module: the linen module.
      *sample_args, **sample_kwargs: a call that initialises it (shapes and dtypes are what matter).
      rngs: the NNX RNG streams; "params" initialises the parameters.
    """

    def __init__(self, module: nn.Module, *sample_args: Any, rngs: nnx.Rngs, **sample_kwargs: Any):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a flax.linen Module, got {type(module).__name__}")
        self.layer = nnx.bridge.ToNNX(module, rngs=rngs)
        nnx.bridge.lazy_init(self.layer, *sample_args, **sample_kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("train") and "mutable" not in kwargs:
            kwargs["mutable"] = ["batch_stats"]  # updated in place: the wrapper's nnx.BatchStat variables
        return self.layer(*args, **kwargs)
