"""Atomic experts: y[t] = sum_k w[t,k] act(up[e] . x[t]) down[e], the dynamic expert assembly step."""

from pallas_kernels.omni_expert.api import omni_expert
from pallas_kernels.omni_expert.config import ExpertKernelConfig, default_config
from pallas_kernels.omni_expert.reference import omni_expert_reference
from pallas_kernels.omni_expert.scheduling import ExpertSchedule, build_schedule

__all__ = [
    "ExpertKernelConfig",
    "ExpertSchedule",
    "build_schedule",
    "default_config",
    "omni_expert",
    "omni_expert_reference",
]
