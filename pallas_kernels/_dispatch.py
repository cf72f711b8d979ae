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


def choose_implementation(implementation: str, *, supported: tuple[str, ...], check_kernel_inputs) -> str:
    """`resolve_implementation`, then `check_kernel_inputs(impl)` for a kernel choice: "auto" means the
    kernels where they apply and "xla" for inputs they do not take; a kernel named outright raises the
    check's ValueError/TypeError, which names the argument."""
    impl = resolve_implementation(implementation, supported=supported)
    if impl == "xla":
        return impl
    try:
        check_kernel_inputs(impl)
    except (ValueError, TypeError):
        if implementation != "auto":
            raise
        return "xla"
    return impl


def resolve_interpret(interpret: bool | None) -> bool:
    """None means: run the kernel natively on a GPU, in Pallas interpret mode anywhere else."""
    if interpret is None:
        return not on_gpu()
    if not isinstance(interpret, bool):
        raise TypeError(f"interpret={interpret!r} must be a bool or None")
    return interpret
