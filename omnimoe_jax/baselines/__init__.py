"""Baseline FFNs beside OmniMoE, each with OmniMoE's call signature `(x, *, train=False)`, x [..., d] -> [..., d].

Public surface:
  DenseFFN, DenseFFNConfig          SwiGLU (omnimoe_jax.SharedMLP as a stand-alone FFN)
  DeepSeekMoE, DeepSeekMoEConfig    fine-grained routed SwiGLU experts, top-k softmax gate, shared experts
  GShardMoE, GShardMoEConfig        coarse top-2 MoE with expert capacity
  PEER, PEERConfig                  product-key retrieval of single-neuron experts (arXiv 2407.04153)
  PKM, PKMConfig                    product-key memory (arXiv 1907.05242)
  presets                           paper_presets(), small_presets(d), active_parameters(config)

Sown collections (never during `init`): "losses" holds scalars to add to the training objective (MoE
auxiliary losses, only with train=True); "metrics" holds routing-health numbers, among them, for every
sparse FFN, "expert_counts" [E or N] int32 (assignments per expert or value row in the call, which add up
over batches). Each module's docstring lists its names.
"""

from omnimoe_jax.baselines import presets
from omnimoe_jax.baselines._deepseek import DeepSeekMoE, DeepSeekMoEConfig
from omnimoe_jax.baselines._dense import DenseFFN, DenseFFNConfig
from omnimoe_jax.baselines._gshard import GShardMoE, GShardMoEConfig
from omnimoe_jax.baselines._peer import PEER, PEERConfig
from omnimoe_jax.baselines._pkm import PKM, PKMConfig

__all__ = [
    "PEER",
    "PKM",
    "DeepSeekMoE",
    "DeepSeekMoEConfig",
    "DenseFFN",
    "DenseFFNConfig",
    "GShardMoE",
    "GShardMoEConfig",
    "PEERConfig",
    "PKMConfig",
    "presets",
]
