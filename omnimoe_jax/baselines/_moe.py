"""What the coarse MoEs (GShard, DeepSeekMoE) share: softmax top-k gating, the balance loss, and routed
SwiGLU experts computed grouped by expert.

Routed experts never form a dense [T, E, ...] tensor. The T*k (token, expert) pairs are laid out slot-major
(pair p = slot * T + t: every token's first choice before any token's second, which is GShard's priority
order) and sorted by expert with a stable argsort; then either

  "sorted":   dropless: each expert's sorted rows are padded to whole tiles of m rows (`ExpertTiles`), and the
              experts run as one batched product of the tiles with their experts' matrices, or
  "capacity": each expert gets a fixed buffer of C rows; a pair's slot is its rank among its expert's pairs
              in priority order, pairs ranked C or later are dropped (counted), and the experts run as one
              batched [E, C, d] x [E, d, I] product.

The outputs return to pair order through the inverse permutation and are summed per token with the gates.

The tiles cost at most E - 1 partial tiles of padding (m is chosen from the mean group size) and a gather of
one weight matrix per tile. `jax.lax.ragged_dot`, the obvious primitive, is not used: XLA on GPUs (jax 0.10-
0.11) and jax's CPU fallback lower it to a product of every row with every group's matrix, E times the work
and an [E, P, I] buffer (12 GiB at the `small-deepseekmoe` preset's 32,768 tokens). The capacity buffers cost
(capacity_factor - 1) of padding and drop overflow. benchmarks/compare.py times both ("deepseekmoe-matched" vs
"deepseekmoe-capacity").
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels import get_activation

DISPATCHES = ("sorted", "capacity")


def softmax_top_k(logits: jax.Array, top_k: int, *, normalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Softmax gate and its top k experts per token.

    Args:
      logits: [T, E] gate logits (any float; the softmax runs in f32, or f64 for f64 logits).
      top_k: k experts per token.
      normalize: rescale the k chosen probabilities to sum to 1 (GShard's combine weights).

    Returns:
      probs: [T, E] softmax over all experts (the balance loss needs them), f32 (f64 for f64 logits).
      weights: [T, k] gates of the chosen experts, descending, same dtype.
      experts: [T, k] int32 chosen experts (ties to the lower index).
    """
    acc = jnp.promote_types(logits.dtype, jnp.float32)  # routing hinges on small gaps: f32 at least
    probs = jax.nn.softmax(logits.astype(acc), axis=-1)  # [T, E]
    weights, experts = jax.lax.top_k(probs, top_k)  # [T, k] each
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, weights, experts.astype(jnp.int32)


def balance_loss(probs: jax.Array, counted: jax.Array) -> jax.Array:
    """E/(j T) * sum_e count_e * mean_t probs[t, e]: 1 when both the routing and the gate are uniform.

    Args:
      probs: [T, E] gate probabilities.
      counted: [T, j] int32 assignments that count as load (DeepSeekMoE: all k; GShard: the first choice).

    This is DeepSeekMoE's expert-level balance loss (f_i P_i with f_i = E/(kT) * count_i) and, with j = 1,
    Switch/GShard's E * sum_e (fraction of tokens whose first choice is e) * (mean gate probability of e).
    Gradients flow through `probs` only (the counts are piecewise constant).
    """
    num_experts = probs.shape[-1]
    counts = jnp.zeros(num_experts, probs.dtype).at[counted.reshape(-1)].add(1.0)  # [E]
    fraction = counts / counted.size  # [E], sums to 1
    return num_experts * jnp.sum(fraction * jnp.mean(probs, axis=0))


def expert_counts(experts: jax.Array, num_experts: int) -> jax.Array:
    """[E] int32: how many of the T*k assignments each expert received (sums to T*k; before any drop).

    Counts rather than fractions so that a training loop can add them up over batches."""
    return jnp.bincount(experts.reshape(-1), length=num_experts).astype(jnp.int32)  # [E]


def expert_capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * k * T / E), at most T (an expert cannot get a token twice), at least 1."""
    return max(1, min(tokens, math.ceil(capacity_factor * top_k * tokens / num_experts)))


class ExpertTiles:
    """Rows sorted by expert, laid out as whole tiles of `m` rows that each belong to one expert.

    Group e's rows (`group_sizes[e]` of them, consecutive in the sorted order) fill ceil(size / m) tiles; the
    last one is padded with zero rows. The tile count is static: at most ceil(P / m) + E - 1 tiles hold rows,
    and the spare ones are all padding. `matmul` multiplies every tile by its expert's matrix in one batched
    product, so a SwiGLU stays in the tiled layout from its first product to its last.
    """

    def __init__(self, group_sizes: jax.Array, num_rows: int, tile_rows: int):
        num_experts = group_sizes.shape[0]
        self.num_rows, self.tile_rows = num_rows, tile_rows
        self.num_tiles = -(-num_rows // tile_rows) + num_experts - 1  # static bound on the tiles in use
        tiles = -(-group_sizes // tile_rows)  # [E] tiles per group
        first_tile = jnp.cumsum(tiles) - tiles  # [E], exclusive prefix sum
        first_row = jnp.cumsum(group_sizes) - group_sizes  # [E]
        group = jnp.repeat(jnp.arange(num_experts), group_sizes, total_repeat_length=num_rows)  # [P], each row's
        # where each sorted row goes in the tiled layout [num_tiles * m]
        self.destination = first_tile[group] * tile_rows + jnp.arange(num_rows) - first_row[group]  # [P]
        # the expert of each tile; the spare tiles past the last group (all padding) take the last expert
        ends = jnp.cumsum(tiles)  # [E]
        self.tile_expert = jnp.minimum(
            jnp.searchsorted(ends, jnp.arange(self.num_tiles), side="right"), num_experts - 1
        )  # [num_tiles]

    def to_tiles(self, rows: jax.Array) -> jax.Array:
        """[P, f] sorted rows -> [num_tiles, m, f], zero rows as padding."""
        tiled = jnp.zeros((self.num_tiles * self.tile_rows, rows.shape[-1]), rows.dtype)
        tiled = tiled.at[self.destination].set(rows, unique_indices=True, indices_are_sorted=True)
        return tiled.reshape(self.num_tiles, self.tile_rows, rows.shape[-1])

    def from_tiles(self, tiled: jax.Array) -> jax.Array:
        """[num_tiles, m, f] -> [P, f] in the sorted order (padding left behind)."""
        flat = tiled.reshape(self.num_tiles * self.tile_rows, tiled.shape[-1])
        return flat.at[self.destination].get(unique_indices=True, indices_are_sorted=True)

    def matmul(self, tiled: jax.Array, weights: jax.Array, *, preferred_element_type) -> jax.Array:
        """[num_tiles, m, f_in] x weights [E, f_in, f_out] -> [num_tiles, m, f_out], each tile by its expert's."""
        per_tile = weights[self.tile_expert]  # [num_tiles, f_in, f_out]
        return jnp.einsum("tmi,tio->tmo", tiled, per_tile, preferred_element_type=preferred_element_type)


def tile_rows_for(num_rows: int, num_experts: int) -> int:
    """m: the power of two at or above the mean group size, within [8, 128] (padding <= E partial tiles)."""
    mean = max(1, -(-num_rows // num_experts))
    return min(128, max(8, 1 << (mean - 1).bit_length()))


def _expert_kernel_init(key, shape, dtype):
    # [E, fan_in, fan_out]: each expert's matrix initialised like an nn.Dense kernel (LeCun normal on fan_in).
    return nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))(key, shape, dtype)


class RoutedSwiGLUExperts(nn.Module):
    """E SwiGLU experts of width I: y[t] = sum_k weights[t,k] * expert_{experts[t,k]}(x[t]).

    Variables: "params" {gate_proj [E, d, I], up_proj [E, d, I], down_proj [E, I, d]}.
    Call `(tokens [T, d], weights [T, k], experts [T, k])` -> (y [T, d] in `dtype`, dropped pairs: int32
    scalar, always 0 for the dropless "sorted" dispatch).
    """

    num_experts: int
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dispatch: str
    capacity_factor: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, tokens: jax.Array, weights: jax.Array, experts: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"dispatch={self.dispatch!r} must be one of {DISPATCHES}")
        e, d, inter = self.num_experts, self.hidden_size, self.intermediate_size
        gate_w = self.param("gate_proj", _expert_kernel_init, (e, d, inter), self.param_dtype).astype(self.dtype)
        up_w = self.param("up_proj", _expert_kernel_init, (e, d, inter), self.param_dtype).astype(self.dtype)
        down_w = self.param("down_proj", _expert_kernel_init, (e, inter, d), self.param_dtype).astype(self.dtype)
        tokens = tokens.astype(self.dtype)
        num_tokens, top_k = experts.shape
        pairs = num_tokens * top_k
        pair_expert = experts.T.reshape(pairs)  # [P], slot-major: p = slot * T + t
        pair_token = jnp.tile(jnp.arange(num_tokens, dtype=jnp.int32), top_k)  # [P]
        order = jnp.argsort(pair_expert, stable=True)  # [P], grouped by expert, priority order kept inside
        group_sizes = jnp.zeros(e, jnp.int32).at[pair_expert].add(1)  # [E]
        if self.dispatch == "sorted":
            dropped = 0
            out = self._sorted(tokens[pair_token[order]], group_sizes, gate_w, up_w, down_w)  # [P, d] sorted
            inverse = jnp.zeros_like(order).at[order].set(jnp.arange(pairs, dtype=order.dtype))  # [P]
            out = out[inverse]  # [P, d], back to pair order
        else:
            group_start = jnp.cumsum(group_sizes) - group_sizes  # [E], exclusive prefix sum
            rank = jnp.arange(pairs, dtype=jnp.int32) - group_start[pair_expert[order]]  # [P] in sorted order
            position = jnp.zeros(pairs, jnp.int32).at[order].set(rank)  # [P] in pair order
            capacity = expert_capacity(num_tokens, top_k, e, self.capacity_factor)
            kept = position < capacity  # [P]
            dropped = pairs - jnp.sum(kept, dtype=jnp.int32)
            out = self._capacity(tokens, pair_token, pair_expert, position, kept, capacity, gate_w, up_w, down_w)
        out = out.reshape(top_k, num_tokens, d)  # [k, T, d], in `dtype`
        acc = jnp.promote_types(self.dtype, jnp.float32)
        y = jnp.einsum("kt,ktd->td", weights.T.astype(self.dtype), out, preferred_element_type=acc)  # [T, d]
        return y.astype(self.dtype), jnp.asarray(dropped, jnp.int32)

    def _swiglu(self, gate: jax.Array, up: jax.Array) -> jax.Array:
        return (get_activation(self.hidden_act).forward(gate) * up).astype(self.dtype)

    def _sorted(self, rows, group_sizes, gate_w, up_w, down_w) -> jax.Array:
        # rows: [P, d] sorted by expert -> [P, d]; each expert's run multiplied by its matrices, tile by tile.
        acc = jnp.promote_types(self.dtype, jnp.float32)
        tiles = ExpertTiles(group_sizes, rows.shape[0], tile_rows_for(rows.shape[0], self.num_experts))
        tiled = tiles.to_tiles(rows)  # [tiles, m, d]
        dot = functools.partial(tiles.matmul, preferred_element_type=acc)
        hidden = self._swiglu(dot(tiled, gate_w), dot(tiled, up_w))  # [tiles, m, I]
        return tiles.from_tiles(dot(hidden, down_w).astype(self.dtype))  # [P, d]

    def _capacity(self, tokens, pair_token, pair_expert, position, kept, capacity, gate_w, up_w, down_w):
        # -> [P, d] in pair order; a dropped pair writes nowhere (its slot index C is out of bounds) and reads 0.
        acc = jnp.promote_types(self.dtype, jnp.float32)
        slot = jnp.where(kept, position, capacity)  # [P]
        buffer = jnp.zeros((self.num_experts, capacity, self.hidden_size), self.dtype)  # [E, C, d]
        buffer = buffer.at[pair_expert, slot].set(tokens[pair_token], mode="drop")  # [E, C, d]
        gate = jnp.einsum("ecd,edi->eci", buffer, gate_w, preferred_element_type=acc)  # [E, C, I]
        up = jnp.einsum("ecd,edi->eci", buffer, up_w, preferred_element_type=acc)  # [E, C, I]
        out = jnp.einsum("eci,eid->ecd", self._swiglu(gate, up), down_w, preferred_element_type=acc)  # [E, C, d]
        return out.astype(self.dtype).at[pair_expert, slot].get(mode="fill", fill_value=0)  # [P, d]
