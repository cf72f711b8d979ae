"""Cartesian top-K router: exact top-K of lp_x[i] + lp_y[j] without scoring all n*n experts."""

from pallas_kernels.omni_router.api import omni_router
from pallas_kernels.omni_router.config import RouterConfig, default_config
from pallas_kernels.omni_router.reference import omni_router_reference

__all__ = ["RouterConfig", "default_config", "omni_router", "omni_router_reference"]
