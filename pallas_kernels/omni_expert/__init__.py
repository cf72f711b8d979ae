"""Atomic experts: y[t] = sum_k w[t,k] act(up[e] . x[t]) down[e], the dynamic expert assembly step."""

from pallas_kernels.omni_expert.api import omni_expert
from pallas_kernels.omni_expert.reference import omni_expert_reference

__all__ = ["omni_expert", "omni_expert_reference"]
