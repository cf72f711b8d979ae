"""Public entry point of the Cartesian top-K router."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _dispatch
from pallas_kernels._checks import KERNEL_DTYPES, check_float_arrays, is_int
from pallas_kernels.omni_router import kernel
from pallas_kernels.omni_router.config import MAX_AXIS_SIZE, MAX_TOP_K, RouterConfig, default_config
from pallas_kernels.omni_router.reference import omni_router_reference

SUPPORTED_IMPLEMENTATIONS = ("xla", "pallas", "triton")
# "auto" on a GPU uses the jax-triton variant from this K up, where its native sort paid at the paper's
# setting (n=320, K=512); at K <= 64 the two were too close for a rule either way, and K between 64 and
# 512 is unmeasured (the timings: benchmarks/results/router.json). Those measurements predate the bucketed
# step 1 of `kernel.py` (issue 18), which removed the k'^2 rank count that made "pallas" slow at K = 512:
# the rule stands until benchmarks/router.py measures both again.
AUTO_TRITON_MIN_TOP_K = 65


def validate_router_inputs(log_probs_x, log_probs_y, top_k) -> None:
    """ValueError/TypeError naming the argument for anything the router cannot take."""
    for name, arr in (("log_probs_x", log_probs_x), ("log_probs_y", log_probs_y)):
        if arr.ndim != 2:
            raise ValueError(f"{name} must be [tokens, n], got shape {arr.shape}")
    check_float_arrays(log_probs_x=log_probs_x, log_probs_y=log_probs_y)
    if log_probs_x.shape != log_probs_y.shape:
        raise ValueError(
            f"log_probs_x and log_probs_y must have the same shape, got {log_probs_x.shape} and {log_probs_y.shape}"
        )
    n = log_probs_x.shape[1]
    if not is_int(top_k):
        raise TypeError(f"top_k must be a Python int, got {top_k!r}")
    if not 1 <= top_k <= n * n:
        raise ValueError(f"top_k={top_k} must be in [1, n*n] = [1, {n * n}] for n={n}")


def validate_kernel_inputs(log_probs_x, log_probs_y, top_k, implementation: str) -> None:
    """What the kernels add to `validate_router_inputs`: dtypes and the size limits of their tiles."""
    hint = 'implementation="xla" takes it'
    for name, arr in (("log_probs_x", log_probs_x), ("log_probs_y", log_probs_y)):
        if arr.dtype not in KERNEL_DTYPES:
            raise ValueError(
                f"{name} has dtype {arr.dtype}; implementation={implementation!r} takes float32 or bfloat16 ({hint})"
            )
    if log_probs_x.dtype != log_probs_y.dtype:
        raise ValueError(
            f"log_probs_x and log_probs_y must have one dtype for implementation={implementation!r}, "
            f"got {log_probs_x.dtype} and {log_probs_y.dtype}"
        )
    n = log_probs_x.shape[1]
    if not 2 <= n <= MAX_AXIS_SIZE:
        raise ValueError(
            f"log_probs_x has n={n} experts per axis; implementation={implementation!r} takes "
            f"2 <= n <= {MAX_AXIS_SIZE} ({hint})"
        )
    if top_k > MAX_TOP_K:
        raise ValueError(f"top_k={top_k}; implementation={implementation!r} takes top_k <= {MAX_TOP_K} ({hint})")


def omni_router(
    log_probs_x: jax.Array,
    log_probs_y: jax.Array,
    top_k: int,
    *,
    implementation: str = "auto",
    interpret: bool | None = None,
    config: RouterConfig | None = None,
    sort_by_score: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Exact top-K of the Cartesian product scores lp_x[i] + lp_y[j] over N = n*n experts.

    | argument | shape | dtype |
    | --- | --- | --- |
    | log_probs_x, log_probs_y | [T, n] | f32 or bf16 (kernels); any float for "xla" |
    | returns scores | [T, K] | f32, descending, ties by lowest expert index (see `sort_by_score`) |
    | returns indices | [T, K] | int32, e = i * n + j |

    `sort_by_score`: True (default) orders each row by score descending, ties by lowest expert index. False
    returns the same K (score, index) pairs per row, in an order that is deterministic but not by score: for
    the kernels their slot order (`kernel.py`, step 4: by the row expert's position in step 1's order of the
    x axis, then the column expert's in y's, so it differs between step-1 methods and "triton"), which
    skips one XLA sort of the [T, K] result; for "xla" the score order (its selection is that sort). For
    callers that need only the set, such as the expert op, which groups the pairs by expert itself.

    `implementation`:
      - "auto": on a GPU "pallas", or "triton" for K >= AUTO_TRITON_MIN_TOP_K when jax-triton is
        installed (where the kernels take the input); "xla" otherwise.
      - "xla": `omni_router_reference` (plain jnp, `lax.top_k`).
      - "pallas": the Pallas kernels of `kernel.py` (Triton lowering; Pallas interpret mode off the GPU).
        Takes 2 <= n <= 4096 and K <= 4096.
      - "triton": the sorting step as a native Triton kernel through jax-triton (`tl.topk`), the rest as
        "pallas". GPU only; needs the `triton` extra.
    The kernels return the reference's scores and indices bit for bit; the one exception is which of
    several experts whose sums tie only through rounding or -inf fill the last places (`kernel.py`
    explains why; the scores agree even then). `interpret` (pallas only): None = off on a GPU, on
    elsewhere. `config`: kernel tiling and step-1 method, `default_config(T, n, K)` (config.py) when None.

    Differentiable with respect to both inputs: the cotangent of each score flows to lp_x[i] and lp_y[j]
    of its expert (summed where a token picks one row or column several times).
    """
    validate_router_inputs(log_probs_x, log_probs_y, top_k)
    if not isinstance(sort_by_score, bool):
        raise TypeError(f"sort_by_score must be a bool, got {sort_by_score!r}")
    impl = _dispatch.choose_implementation(
        implementation,
        supported=SUPPORTED_IMPLEMENTATIONS,
        check_kernel_inputs=lambda impl: validate_kernel_inputs(log_probs_x, log_probs_y, top_k, impl),
    )
    if impl == "xla":
        return omni_router_reference(log_probs_x, log_probs_y, top_k)
    if implementation == "auto" and top_k >= AUTO_TRITON_MIN_TOP_K and not interpret and _triton_available():
        impl = "triton"
    if config is None:
        config = default_config(log_probs_x.shape[0], log_probs_x.shape[1], top_k)
    elif not isinstance(config, RouterConfig):
        raise TypeError(f"config must be a RouterConfig or None, got {config!r}")
    if impl == "triton":
        if interpret:
            raise ValueError('interpret=True is not available for implementation="triton" (jax-triton has none)')
        _require_triton()
        return _kernel_router(log_probs_x, log_probs_y, top_k, impl, config, False, sort_by_score)
    interpret = _dispatch.resolve_interpret(interpret)
    return _kernel_router(log_probs_x, log_probs_y, top_k, impl, config, interpret, sort_by_score)


@functools.cache
def _triton_available() -> bool:
    """Whether the optional jax-triton variant can run here (a GPU and the `triton` extra)."""
    try:
        _require_triton()
    except (ImportError, ValueError):
        return False
    return True


def _require_triton() -> None:
    """implementation="triton" needs a CUDA GPU and the jax-triton package."""
    if not _dispatch.on_gpu():
        raise ValueError(
            f'implementation="triton" runs only on a GPU (jax backend here: {jax.default_backend()}); '
            'use implementation="pallas", which runs in Pallas interpret mode elsewhere'
        )
    try:
        import jax_triton  # noqa: F401  (only checking that the optional dependency is there)

        from pallas_kernels.omni_router import triton_kernel  # noqa: F401
    except ImportError as err:
        raise ImportError(
            'implementation="triton" needs jax-triton (and triton): pip install "omnimoe-jax[triton]"'
        ) from err


def _forward(log_probs_x, log_probs_y, top_k, implementation, config, interpret, sort_by_score):
    order = dict(config=config, sort_by_score=sort_by_score)
    if implementation == "triton":
        from pallas_kernels.omni_router import triton_kernel

        positions = triton_kernel.sort_axes(log_probs_x, log_probs_y, top_k, config=config)
        return kernel.router_merge(log_probs_x, log_probs_y, *positions, top_k=top_k, interpret=False, **order)
    return kernel.router_forward(log_probs_x, log_probs_y, top_k, interpret=interpret, **order)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _kernel_router(log_probs_x, log_probs_y, top_k, implementation, config, interpret, sort_by_score):
    return _forward(log_probs_x, log_probs_y, top_k, implementation, config, interpret, sort_by_score)


def _kernel_router_fwd(log_probs_x, log_probs_y, top_k, implementation, config, interpret, sort_by_score):
    scores, indices = _forward(log_probs_x, log_probs_y, top_k, implementation, config, interpret, sort_by_score)
    # Residuals must be arrays: a zero-size [0, n] array carries n and the input dtype to the backward.
    input_like = jnp.zeros((0, log_probs_x.shape[1]), log_probs_x.dtype)
    return (scores, indices), (indices, input_like)


def _kernel_router_bwd(top_k, implementation, config, interpret, sort_by_score, residuals, cotangents):
    del top_k, implementation, sort_by_score  # one Pallas backward for both, by index: any order of the K
    indices, input_like = residuals
    dscores, _ = cotangents  # the integer indices have no cotangent
    return kernel.router_backward(
        dscores, indices, n=input_like.shape[1], dtype=input_like.dtype, config=config, interpret=interpret
    )


_kernel_router.defvjp(_kernel_router_fwd, _kernel_router_bwd)
