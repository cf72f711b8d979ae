"""What every baseline config shares: field checks that name the field, dtype normalisation, dict round trip."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from omnimoe_jax._config import IMPLEMENTATIONS as IMPLEMENTATIONS  # re-exported: one list for every config
from omnimoe_jax._config import FFNConfig, _float_dtype
from pallas_kernels.activations import ACTIVATIONS

ACTIVATION_NAMES = tuple(sorted(ACTIVATIONS))
QUERY_NORMS = ("batchnorm", "none")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class BaselineConfig(FFNConfig):
    """Base of the baseline configs (no fields of its own). Subclasses call the `_check_*` helpers from
    `__post_init__` and then `super().__post_init__()`, which normalises `dtype` and `param_dtype` (every
    subclass has both)."""

    def __post_init__(self):
        for field in ("dtype", "param_dtype"):
            # Normalised so equal configs compare (and hash) equal whether given as a str or a type.
            object.__setattr__(self, field, _float_dtype(field, getattr(self, field)))

    def _check_positive_ints(self, *fields: str) -> None:
        for field in fields:
            value = getattr(self, field)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{field}={value!r} must be a positive int")

    def _check_non_negative_int(self, field: str) -> None:
        value = getattr(self, field)
        if not _is_int(value) or value < 0:
            raise ValueError(f"{field}={value!r} must be an int >= 0")

    def _check_at_most(self, field: str, limit_field: str) -> None:
        value, limit = getattr(self, field), getattr(self, limit_field)
        if value > limit:
            raise ValueError(f"{field}={value} must be <= {limit_field}={limit}")

    def _check_choice(self, field: str, choices: tuple[Any, ...]) -> None:
        value = getattr(self, field)
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{field}={value!r} must be one of {choices}")

    def _check_positive_number(self, field: str) -> None:
        value = getattr(self, field)
        if not _is_number(value) or not value > 0 or not math.isfinite(value):
            raise ValueError(f"{field}={value!r} must be a positive finite number")

    def _check_non_negative_number(self, field: str) -> None:
        value = getattr(self, field)
        if not _is_number(value) or not value >= 0 or not math.isfinite(value):
            raise ValueError(f"{field}={value!r} must be a finite number >= 0")

    def _check_fraction(self, field: str) -> None:
        value = getattr(self, field)
        if not _is_number(value) or not 0 < value <= 1:
            raise ValueError(f"{field}={value!r} must be in (0, 1]")

    def _check_bool(self, field: str) -> None:
        value = getattr(self, field)
        if not isinstance(value, bool):
            raise ValueError(f"{field}={value!r} must be a bool")

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
