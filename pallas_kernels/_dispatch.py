"""Choosing an implementation and the Pallas interpret flag, shared by every op's `api`."""

from __future__ import annotations

import jax


def on_gpu() -> bool:
    """True when JAX's default backend is a GPU (where the Triton-lowered kernels run natively)."""
    return jax.default_backend() == "gpu"


def resolve_implementation(implementation: str, *, supported: tuple[str, ...]) -> str:
    """Map "auto" to "pallas" on GPU and "xla" elsewhere; refuse names this op does not offer."""
    choices = ("auto", *supported)
    if implementation not in choices:
        raise ValueError(f"implementation={implementation!r} is not supported; expected one of {choices}")
    if implementation == "auto":
        return "pallas" if on_gpu() and "pallas" in supported else "xla"
    return implementation


def resolve_interpret(interpret: bool | None) -> bool:
    """None means: run the kernel natively on a GPU, in Pallas interpret mode anywhere else."""
    if interpret is None:
        return not on_gpu()
    if not isinstance(interpret, bool):
        raise TypeError(f"interpret={interpret!r} must be a bool or None")
    return interpret
