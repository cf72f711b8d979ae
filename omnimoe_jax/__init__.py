"""omnimoe-jax: OmniMoE (arXiv 2602.05711) as Flax linen modules with Pallas GPU kernels.

Public surface:
  OmniMoEConfig   sizes and switches of one layer, validated
  OmniMoE         the layer: shared SwiGLU MLP + routed atomic experts
  FlashMoEConfig, FlashMoE   the FlashMoE variant (flash-algo/flash-moe): input BatchNorm, one joint gate
  CartesianRouter, AtomicExperts, SharedMLP, RoutingResult   its parts
  TorchBatchNorm  the non-affine BatchNorm with torch's semantics of the routers and PEER/PKM (alias RouterBatchNorm)
  routing_statistics   a RoutingResult's expert counts and routing entropy (what the layers sow as "metrics")
  LMConfig, TransformerLM, parameter_counts   a decoder-only language model with OmniMoE feed-forwards
  ffn_registry    the FFN kinds the model can use (FFN_KINDS): kind name -> config class
  convert         seed PyTorch checkpoint interop
  parallel        data + expert parallelism over a device mesh, multi-host, resharding restores
  nnx             (import omnimoe_jax.nnx) every layer from Flax NNX: Linen(module, sample_input, rngs=...)
  testing         (import omnimoe_jax.testing) the tests' tolerance table and relative error
"""

from omnimoe_jax import convert, ffn_registry, parallel
from omnimoe_jax._batch_norm import RouterBatchNorm, TorchBatchNorm
from omnimoe_jax._config import FlashMoEConfig, OmniMoEConfig
from omnimoe_jax._experts import AtomicExperts
from omnimoe_jax._flashmoe import FlashMoE
from omnimoe_jax._layer import OmniMoE
from omnimoe_jax._model import FFN_KINDS, LMConfig, TransformerLM, parameter_counts
from omnimoe_jax._router import CartesianRouter, RoutingResult, routing_statistics
from omnimoe_jax._shared_mlp import SharedMLP

__version__ = "0.1.0"

__all__ = [
    "FFN_KINDS",
    "AtomicExperts",
    "CartesianRouter",
    "FlashMoE",
    "FlashMoEConfig",
    "LMConfig",
    "OmniMoE",
    "OmniMoEConfig",
    "RouterBatchNorm",
    "RoutingResult",
    "SharedMLP",
    "TorchBatchNorm",
    "TransformerLM",
    "convert",
    "ffn_registry",
    "parallel",
    "parameter_counts",
    "routing_statistics",
]
