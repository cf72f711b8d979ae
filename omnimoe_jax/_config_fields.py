"""What every config of omnimoe_jax shares: the field checks (each error names the field), dtype
normalisation, the dict round trip (`ConfigMethods`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Self

import jax.numpy as jnp

# One definition for the kernels and the configs: pallas_kernels sits below omnimoe_jax. Re-exported for
# omnimoe_jax.parallel and train.
from pallas_kernels._checks import is_int as is_int


def is_number(value: Any) -> bool:
    """A Python int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def float_dtype(field: str, value: Any) -> jnp.dtype:
    """`value` as a floating jnp.dtype (a name or a type); ValueError naming `field` otherwise."""
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        raise ValueError(
            f"{field}={value!r} is not a dtype; expected a floating dtype such as float32 or bfloat16"
        ) from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{field}={value!r} must be a floating dtype such as float32 or bfloat16")
    return dtype


def check_known_fields(cls: type, fields: dict[str, Any]) -> None:
    """ValueError naming the keys of `fields` that are not fields of the dataclass `cls` (a from_dict's input)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; valid fields: {sorted(known)}")


class ConfigMethods:
    """replace / to_dict / from_dict of the frozen, validated configs (OmniMoEConfig, LMConfig, the
    baselines'), and the `_check_*` field checks their `__post_init__`s call (each error names the field):
    no fields of its own; subclasses have `dtype` and `param_dtype`, stored as names."""

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable fields (dtypes as names), inverse of `from_dict`."""
        fields = dataclasses.asdict(self)
        fields["dtype"] = jnp.dtype(self.dtype).name
        fields["param_dtype"] = jnp.dtype(self.param_dtype).name
        return fields

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> Self:
        check_known_fields(cls, fields)
        return cls(**fields)

    def _check_positive_ints(self, *fields: str) -> None:
        for field in fields:
            value = getattr(self, field)
            if not is_int(value) or value < 1:
                raise ValueError(f"{field}={value!r} must be a positive int")

    def _check_non_negative_int(self, field: str) -> None:
        value = getattr(self, field)
        if not is_int(value) or value < 0:
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
        if not is_number(value) or not 0 < value < math.inf:
            raise ValueError(f"{field}={value!r} must be a positive finite number")

    def _check_non_negative_number(self, field: str) -> None:
        value = getattr(self, field)
        if not is_number(value) or not 0 <= value < math.inf:
            raise ValueError(f"{field}={value!r} must be a finite number >= 0")

    def _check_fraction(self, field: str) -> None:
        value = getattr(self, field)
        if not is_number(value) or not 0 < value <= 1:
            raise ValueError(f"{field}={value!r} must be in (0, 1]")

    def _check_bool(self, field: str) -> None:
        value = getattr(self, field)
        if not isinstance(value, bool):
            raise ValueError(f"{field}={value!r} must be a bool")
