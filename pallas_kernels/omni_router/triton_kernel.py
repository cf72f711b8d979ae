"""The router's step 1 (sorted axes) as a native Triton kernel, called through jax-triton.

Pallas has no sort, so the Pallas kernel sorts each axis with k' passes of max/argmax: O(k' n) per token.
Native Triton has `tl.topk`, a bitonic top-k: about n log^2 k' compare-exchanges per token, which wins
when k' is large (the paper's n = 320, K = 512 sorts all 320 entries of both axes). Each (order key,
column) pair is packed into one int64, key in the high half and (n_pad - 1 - column) in the low half, so
that one descending sort orders by key and then by lower column: exactly `lax.top_k`'s order.

This module imports triton (for the kernel definitions) and, when called, jax_triton (which refuses to
import without a GPU-enabled jax); `api` imports it only for implementation="triton", on a GPU. The `triton`
extra installs both. The steps 2-4 and the backward are the Pallas kernels of `kernel.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from pallas_kernels.omni_router.config import RouterConfig, next_power_of_2


@triton.jit
def _order_key(x):
    # The same order-preserving f32 -> int32 map as `kernel.order_key`.
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _sort_rows(
    src_ptr,
    pos_ptr,
    t0,
    TOKENS: tl.constexpr,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    K_AXIS: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
):
    rows = (t0 + tl.arange(0, BLOCK_TOKENS)).to(tl.int64)[:, None]  # [bt, 1]; 64-bit addresses
    cols = tl.arange(0, N_PAD)[None, :]  # [1, n_pad]
    inside = (rows < TOKENS) & (cols < N)
    x = tl.load(src_ptr + rows * N + cols, mask=inside, other=0.0).to(tl.float32)
    key = tl.where(inside, _order_key(x), -2147483648)  # [bt, n_pad]; padding sorts last
    packed = (key.to(tl.int64) << 32) | (N_PAD - 1 - cols).to(tl.int64)
    top = tl.topk(packed, K_PAD)  # [bt, k_pad], descending along the last axis
    top_pos = (N_PAD - 1 - (top & 0xFFFFFFFF)).to(tl.int32)
    ranks = tl.arange(0, K_PAD)[None, :]  # [1, k_pad]
    stored = (rows < TOKENS) & (ranks < K_AXIS)
    tl.store(pos_ptr + rows * K_AXIS + ranks, top_pos, mask=stored)


@triton.jit
def sort_axes_kernel(
    lpx_ptr,
    lpy_ptr,
    x_pos_ptr,
    y_pos_ptr,
    TOKENS: tl.constexpr,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    K_AXIS: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
):
    """Grid (token tiles, 2): program (i, 0) sorts tile i of the row axis, (i, 1) of the column axis."""
    t0 = tl.program_id(0) * BLOCK_TOKENS
    if tl.program_id(1) == 0:
        _sort_rows(lpx_ptr, x_pos_ptr, t0, TOKENS, N, N_PAD, K_AXIS, K_PAD, BLOCK_TOKENS)
    else:
        _sort_rows(lpy_ptr, y_pos_ptr, t0, TOKENS, N, N_PAD, K_AXIS, K_PAD, BLOCK_TOKENS)


def sort_axes(
    log_probs_x: jax.Array, log_probs_y: jax.Array, top_k: int, *, config: RouterConfig
) -> tuple[jax.Array, jax.Array]:
    """Per-axis top k' = min(K, n) positions, [T, k'] int32 each: per token the columns of the k' largest
    log-probs, largest first, ties by lower column. The input of `kernel.router_merge`.
    """
    import jax_triton  # imported here: it refuses to import without a GPU-enabled jax

    tokens, n = log_probs_x.shape
    k_axis = min(top_k, n)
    sorted_list = jax.ShapeDtypeStruct((tokens, k_axis), jnp.int32)
    positions_x, positions_y = jax_triton.triton_call(
        log_probs_x,
        log_probs_y,
        kernel=sort_axes_kernel,
        out_shape=(sorted_list,) * 2,
        grid=(triton.cdiv(tokens, config.block_tokens), 2),
        name="omni_router_sort_axes",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        TOKENS=tokens,
        N=n,
        N_PAD=next_power_of_2(n),
        K_AXIS=k_axis,
        # tl.topk wants 2 <= k <= the row (older Triton versions have no k = 1 case); rank 1 is not stored.
        K_PAD=max(2, next_power_of_2(k_axis)),
        BLOCK_TOKENS=config.block_tokens,
    )
    return positions_x, positions_y
