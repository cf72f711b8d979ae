"""What every baseline config shares: field checks that name the field, dtype normalisation, dict round trip."""

from __future__ import annotations

import dataclasses
import math

from omnimoe_jax._config import IMPLEMENTATIONS as IMPLEMENTATIONS  # re-exported: one list for every config
from omnimoe_jax._config import FFNConfig
from omnimoe_jax._config_fields import float_dtype
from pallas_kernels.activations import ACTIVATIONS

ACTIVATION_NAMES = tuple(sorted(ACTIVATIONS))
QUERY_NORMS = ("batchnorm", "none")


@dataclasses.dataclass(frozen=True)
class BaselineConfig(FFNConfig):
    """Base of the baseline configs (no fields of its own). Subclasses call the `_check_*` helpers
    (`ConfigMethods`'s, and `_check_square`) from `__post_init__` and then `super().__post_init__()`, which
    normalises `dtype` and `param_dtype` (every subclass has both)."""

    def __post_init__(self):
        for field in ("dtype", "param_dtype"):
            # Normalised so equal configs compare (and hash) equal whether given as a str or a type.
            object.__setattr__(self, field, float_dtype(field, getattr(self, field)))

    def _check_square(self, field: str) -> int:
        """sqrt of a perfect square >= 4 (product keys index a table by a row and a column)."""
        value = getattr(self, field)
        n = math.isqrt(value)
        if n * n != value or n < 2:
            nearest = sorted({max(n, 2) ** 2, (max(n, 1) + 1) ** 2} - {value})
            raise ValueError(
                f"{field}={value} must be a perfect square n*n with n >= 2 (product keys index it by a row and a "
                f"column); nearest valid counts: {nearest}"
            )
        return n
