"""Pallas GPU kernels (Triton lowering) for OmniMoE, each beside its plain-jnp reference.

Pure JAX: this package never imports Flax. Each op lives in its own folder with `reference.py` (the oracle
and the `implementation="xla"` path), `kernel.py` (the pallas_calls) and `api.py` (the public function).
"""

from pallas_kernels.activations import ACTIVATIONS, Activation, get_activation
from pallas_kernels.embedding_bag import embedding_bag, embedding_bag_reference
from pallas_kernels.omni_expert import omni_expert, omni_expert_reference
from pallas_kernels.omni_router import omni_router, omni_router_reference
from pallas_kernels.row_dots import row_dots, row_dots_reference

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "embedding_bag",
    "embedding_bag_reference",
    "get_activation",
    "omni_expert",
    "omni_expert_reference",
    "omni_router",
    "omni_router_reference",
    "row_dots",
    "row_dots_reference",
]
