"""What the coarse MoEs (GShard, DeepSeekMoE) share: their config checks (`CoarseMoEConfig`), softmax top-k
gating, the balance loss, and routed SwiGLU experts computed grouped by expert (`routed_experts`).

Routed experts never form a dense [T, E, ...] tensor. The T*k (token, expert) pairs are laid out slot-major
(pair p = slot * T + t: every token's first choice before any token's second, which is GShard's priority
order) and sorted by expert with a stable argsort; then either

  "sorted":   dropless: each expert's sorted rows are padded to whole tiles of m rows (`ExpertTiles`), and the
              experts run as one batched product of the tiles with their experts' matrices, or
  "capacity": each expert gets a fixed buffer of C rows; a pair's slot is its rank among its expert's pairs
              in priority order, pairs ranked C or later are dropped (counted), and the experts run as one
              batched [E, C, d] x [E, d, I] product.

The outputs return to pair order and are summed per token with the gates.

Every move of rows between token order, pair order and the tiles is a gather, forward and backward
(`gather_rows`: the gradient of a permutation is the gather by its inverse), and the gates of the chosen experts
are a one-hot contraction: autodiff would transpose gathers and `top_k` into float scatter-adds, which the GPU
runs as one atomic add per element (a compare-and-swap loop in bf16), and those dominated the step of the
`small-deepseekmoe` preset. The tiles cost at most E - 1 partial tiles of padding (m is chosen from the mean
group size) and a copy of one weight matrix per tile, whose gradient is summed per expert by a one-hot product
on the matrix units. `jax.lax.ragged_dot`, the obvious primitive, is not used: XLA on GPUs (jax 0.10-0.11) and
jax's CPU fallback lower it to a product of every row with every group's matrix, E times the work and an
[E, P, I] buffer (12 GiB at the `small-deepseekmoe` preset's 32,768 tokens). The capacity buffers cost
(capacity_factor - 1) of padding and drop overflow. benchmarks/compare.py times both ("deepseekmoe-matched" vs
"deepseekmoe-capacity").
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnimoe_jax.baselines._config import ACTIVATION_NAMES, BaselineConfig
from pallas_kernels import get_activation

DISPATCHES = ("sorted", "capacity")


@dataclasses.dataclass(frozen=True)
class CoarseMoEConfig(BaselineConfig):
    """Base of GShardMoEConfig and DeepSeekMoEConfig: E SwiGLU experts of width I_e behind a softmax top-k
    gate, with a balance loss sown when training. No fields of its own: the checks the two share (each error
    naming the field) and the active parameters of the gate and the routed experts.

    A subclass has hidden_size, num_experts, expert_intermediate_size, num_experts_per_token, capacity_factor,
    norm_topk_prob, hidden_act, aux_loss_weight, dtype and param_dtype.
    """

    sows_aux_loss: ClassVar[bool] = True

    def __post_init__(self):
        self._check_positive_ints("hidden_size", "num_experts", "expert_intermediate_size", "num_experts_per_token")
        self._check_at_most("num_experts_per_token", "num_experts")
        self._check_positive_number("capacity_factor")
        self._check_bool("norm_topk_prob")
        self._check_non_negative_number("aux_loss_weight")
        self._check_choice("hidden_act", ACTIVATION_NAMES)
        super().__post_init__()

    def active_parameters(self) -> int:
        d = self.hidden_size  # d E (gate) + 3 d I_e k
        return d * self.num_experts + 3 * d * self.expert_intermediate_size * self.num_experts_per_token


def routed_experts(
    module: nn.Module,
    tokens: jax.Array,
    *,
    dispatch: str,
    balance_first_choices: bool,
    train: bool,
) -> jax.Array:
    """The routed part of a coarse MoE, built inside `module`'s compact call (its config a `CoarseMoEConfig`):
    `gate` (bias-free d -> E), the softmax top-k gates, then `experts` (`RoutedSwiGLUExperts` with `dispatch`).
    tokens [T, d] -> [T, d] in the config's dtype.

    Sown into `module` outside `init`: "losses"/"aux_loss" (aux_loss_weight * balance loss, when `train`),
    "metrics"/"balance_loss", "metrics"/"expert_counts" and, for dispatch="capacity", "metrics"/"dropped_pairs".
    The balance loss counts every choice as load, or only the first (`balance_first_choices`, GShard's).
    """
    cfg = module.config
    gate = nn.Dense(cfg.num_experts, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="gate")
    probs, weights, experts = softmax_top_k(
        gate(tokens), cfg.num_experts_per_token, normalize=cfg.norm_topk_prob
    )  # [T, E], [T, k], [T, k]
    y, dropped = RoutedSwiGLUExperts(
        num_experts=cfg.num_experts,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.expert_intermediate_size,
        hidden_act=cfg.hidden_act,
        dispatch=dispatch,
        capacity_factor=cfg.capacity_factor,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        name="experts",
    )(tokens, weights, experts)  # [T, d]
    if not module.is_initializing():
        balance = balance_loss(probs, experts[:, :1] if balance_first_choices else experts)
        if train:
            module.sow("losses", "aux_loss", cfg.aux_loss_weight * balance)
        module.sow("metrics", "balance_loss", balance)
        module.sow("metrics", "expert_counts", expert_counts(experts, cfg.num_experts))
        if dispatch == "capacity":
            module.sow("metrics", "dropped_pairs", dropped)
    return y


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
    _, experts = jax.lax.top_k(jax.lax.stop_gradient(probs), top_k)  # [T, k]
    # The chosen gates as a one-hot contraction (exact: one product by 1, the rest by 0) rather than top_k's
    # own gradient, a scatter-add of T*k elements that the GPU runs as atomics; E is small for coarse MoEs.
    chosen = experts[:, :, None] == jnp.arange(probs.shape[-1], dtype=experts.dtype)  # [T, k, E]
    weights = jnp.sum(jnp.where(chosen, probs[:, None, :], 0), axis=-1)  # [T, k]
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
    counts = count_per_expert(counted, num_experts).astype(probs.dtype)  # [E]
    fraction = counts / counted.size  # [E], sums to 1
    return num_experts * jnp.sum(fraction * jnp.mean(probs, axis=0))


def count_per_expert(experts: jax.Array, num_experts: int) -> jax.Array:
    """[E] int32: how often each expert id occurs in `experts` (any shape).

    A one-hot sum rather than `bincount`: a scatter-add of T*k ones into E counters serialises on the GPU's
    atomics (every update of one expert hits one address), while [T*k, E] compares fuse into one reduction
    (E is at most a few hundred for the coarse MoEs)."""
    one_hot = experts.reshape(-1, 1) == jnp.arange(num_experts, dtype=experts.dtype)  # [T*k, E]
    return jnp.sum(one_hot, axis=0, dtype=jnp.int32)  # [E]


def expert_counts(experts: jax.Array, num_experts: int) -> jax.Array:
    """[E] int32: how many of the T*k assignments each expert received (sums to T*k; before any drop).

    Counts rather than fractions so that a training loop can add them up over batches."""
    return count_per_expert(experts, num_experts)


def expert_capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * k * T / E), at most T (an expert cannot get a token twice), at least 1."""
    return max(1, min(tokens, math.ceil(capacity_factor * top_k * tokens / num_experts)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather_rows(rows: jax.Array, index: jax.Array, transpose_index: jax.Array, copies: int) -> jax.Array:
    """rows[index] ([len(index), f]; an index >= len(rows) reads a zero row), with a gradient that gathers too.

    Autodiff would transpose the gather into a scatter-add, which the GPU runs as one atomic add per element
    (and as a compare-and-swap loop in bf16). Every gather here is a permutation, possibly with padding and
    with each row read `copies` times, so its transpose is the gather by the inverse map: `transpose_index`
    [copies * len(rows)] lists, for copy c of row r at c * len(rows) + r, the output row that read it (or an
    index >= len(index) if none did). The gradient sums the copies in f32 at least.
    """
    return rows.at[index].get(mode="fill", fill_value=0)


def _gather_rows_forward(rows, index, transpose_index, copies):
    return gather_rows(rows, index, transpose_index, copies), transpose_index


def _gather_rows_backward(copies, transpose_index, grad):
    num_rows = transpose_index.shape[0] // copies
    picked = grad.at[transpose_index].get(mode="fill", fill_value=0)  # [copies * rows, f]
    if copies > 1:
        acc = jnp.promote_types(grad.dtype, jnp.float32)
        picked = jnp.sum(picked.reshape(copies, num_rows, -1).astype(acc), axis=0)
    return picked.astype(grad.dtype), None, None


gather_rows.defvjp(_gather_rows_forward, _gather_rows_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def gather_tile_weights(weights: jax.Array, tile_expert: jax.Array, num_experts: int) -> jax.Array:
    """weights[tile_expert]: [E, f_in, f_out] -> [tiles, f_in, f_out] (E = `num_experts`).

    The gradient sums each expert's tiles by a one-hot product [E, tiles] x [tiles, f_in * f_out] on the
    matrix units (accumulated in f32 at least) rather than by autodiff's scatter-add of every element.
    """
    return weights[tile_expert]


def _gather_tile_weights_forward(weights, tile_expert, num_experts):
    return weights[tile_expert], tile_expert


def _gather_tile_weights_backward(num_experts, tile_expert, grad):
    one_hot = (jnp.arange(num_experts)[:, None] == tile_expert[None, :]).astype(grad.dtype)  # [E, tiles]
    acc = jnp.promote_types(grad.dtype, jnp.float32)
    summed = jnp.einsum("et,tio->eio", one_hot, grad, preferred_element_type=acc)  # [E, f_in, f_out]
    return summed.astype(grad.dtype), None


gather_tile_weights.defvjp(_gather_tile_weights_forward, _gather_tile_weights_backward)


class ExpertTiles:
    """A layout of the (token, expert) pairs as tiles of `m` rows that each belong to one expert.

    The P = T*k pairs come slot-major (pair p = c * T + t is token t's c-th choice) with their experts
    `pair_expert` [P]. A stable sort by expert keeps that priority order inside each expert's group; then

      dropless (capacity=None): group e's rows fill ceil(size_e / m) tiles, the last one padded with zero
        rows. The tile count is static: at most ceil(P / m) + E - 1 tiles hold rows, the spare ones are all
        padding (m = `tile_rows`).
      capacity C: expert e owns one tile of m = C rows; its pairs ranked C or later are dropped (they read
        zero on the way back), `dropped` counts them.

    `dispatch` gathers the tokens into the tiles, `matmul` multiplies every tile by its expert's matrix in one
    batched product, so a SwiGLU stays in the tiled layout from its first product to its last, and `combine`
    gathers the tiles' rows back to pair order. Every move is a gather, forward and backward (`gather_rows`).
    """

    def __init__(
        self, pair_expert: jax.Array, num_experts: int, *, tile_rows: int | None = None, capacity: int | None = None
    ):
        if (tile_rows is None) == (capacity is None):
            raise ValueError(f"give one of tile_rows={tile_rows!r} (dropless) and capacity={capacity!r}")
        num_pairs = pair_expert.shape[0]
        self.num_pairs, self.num_experts = num_pairs, num_experts
        self.tile_rows = tile_rows if capacity is None else capacity
        m = self.tile_rows
        self.num_tiles = -(-num_pairs // m) + num_experts - 1 if capacity is None else num_experts  # static
        order = jnp.argsort(pair_expert, stable=True)  # [P] sorted position -> pair
        group_sizes = count_per_expert(pair_expert, num_experts)  # [E]
        tiles = -(-group_sizes // m) if capacity is None else jnp.ones_like(group_sizes)  # [E] tiles per group
        first_tile = jnp.cumsum(tiles) - tiles  # [E], exclusive prefix sums
        first_row = jnp.cumsum(group_sizes) - group_sizes  # [E]
        # sorted row s of group e, rank r = s - first_row[e] in it, goes to slot first_tile[e] * m + r if r < C
        group = pair_expert[order]  # [P]
        rank = jnp.arange(num_pairs) - first_row[group]  # [P]
        slot_count = self.num_tiles * m
        kept = rank < tiles[group] * m  # [P], all True when dropless
        sorted_slot = jnp.where(kept, first_tile[group] * m + rank, slot_count)  # [P]
        self.dropped = num_pairs - jnp.sum(kept, dtype=jnp.int32)
        # each pair's slot (slot_count if dropped): sorted_slot in pair order (a permutation: plain stores)
        self.pair_slot = jnp.zeros(num_pairs, sorted_slot.dtype).at[order].set(sorted_slot, unique_indices=True)
        # each tile's expert; the dropless layout's spare tiles past the last group (all padding) take the last
        self.tile_expert = jnp.minimum(
            jnp.searchsorted(jnp.cumsum(tiles), jnp.arange(self.num_tiles), side="right"), num_experts - 1
        )  # [num_tiles]
        # and the inverse map: the pair in each slot, num_pairs for padding
        slot = jnp.arange(slot_count)
        slot_expert = self.tile_expert[slot // m]
        offset = slot - first_tile[slot_expert] * m  # the slot's rank within its group
        filled = offset < jnp.minimum(group_sizes, tiles * m)[slot_expert]
        self.slot_pair = jnp.where(
            filled, order[jnp.minimum(first_row[slot_expert] + offset, num_pairs - 1)], num_pairs
        )
        self.capacity = capacity

    def _tiled(self, flat: jax.Array) -> jax.Array:
        return flat.reshape(self.num_tiles, self.tile_rows, flat.shape[-1])

    def to_tiles(self, rows: jax.Array) -> jax.Array:
        """[P, f] rows in pair order -> [num_tiles, m, f], zero rows as padding."""
        return self._tiled(gather_rows(rows, self.slot_pair, self.pair_slot, 1))

    def dispatch(self, tokens: jax.Array) -> jax.Array:
        """[T, f] tokens (pair p = c * T + t reads token t) -> [num_tiles, m, f], zero rows as padding."""
        num_tokens = tokens.shape[0]
        slot_token = jnp.where(self.slot_pair < self.num_pairs, self.slot_pair % num_tokens, num_tokens)
        return self._tiled(gather_rows(tokens, slot_token, self.pair_slot, self.num_pairs // num_tokens))

    def combine(self, tiled: jax.Array) -> jax.Array:
        """[num_tiles, m, f] -> [P, f] in pair order (a dropped pair reads zeros; padding is left behind)."""
        flat = tiled.reshape(self.num_tiles * self.tile_rows, tiled.shape[-1])
        return gather_rows(flat, self.pair_slot, self.slot_pair, 1)

    def matmul(self, tiled: jax.Array, weights: jax.Array) -> jax.Array:
        """[num_tiles, m, f_in] x weights [E, f_in, f_out] -> [num_tiles, m, f_out], each tile by its expert's.

        In the inputs' dtype (the matrix units accumulate in f32 either way): an f32 result would make the
        backward products f32 x bf16, which XLA runs as f32 (TF32) matrix products.
        """
        if self.capacity is not None:  # one tile per expert, in expert order
            return jnp.einsum("tmi,tio->tmo", tiled, weights)
        per_tile = gather_tile_weights(weights, self.tile_expert, self.num_experts)  # [num_tiles, f_in, f_out]
        return jnp.einsum("tmi,tio->tmo", tiled, per_tile)


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
        if self.dispatch == "sorted":
            layout = ExpertTiles(pair_expert, e, tile_rows=tile_rows_for(pairs, e))
        else:
            layout = ExpertTiles(pair_expert, e, capacity=expert_capacity(num_tokens, top_k, e, self.capacity_factor))
        tiled = layout.dispatch(tokens)  # [tiles, m, d]
        hidden = get_activation(self.hidden_act).forward(layout.matmul(tiled, gate_w)) * layout.matmul(tiled, up_w)
        out = layout.combine(layout.matmul(hidden.astype(self.dtype), down_w))  # [P, d] in pair order
        out = out.reshape(top_k, num_tokens, d)  # [k, T, d], in `dtype`
        acc = jnp.promote_types(self.dtype, jnp.float32)
        y = jnp.sum(weights.T[:, :, None].astype(acc) * out, axis=0)  # [T, d], summed in f32 at least
        return y.astype(self.dtype), layout.dropped
