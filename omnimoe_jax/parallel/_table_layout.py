"""Which way the expert tables split over the expert axis: by rows or by columns (`expert_parallel_layout`).

- "rows" (`_expert_dispatch`): each of the E shards owns N/E whole experts; a device sends each token
  that needs a shard to it, once per shard (E C slots of d, C = the dispatch capacity, T_l by default),
  and the owners send partial outputs back.
- "hidden" (`_hidden_dispatch`): each shard holds d/E columns of every expert; the token rows are
  exchanged by columns, the group's routing gathered and the [T, K] partial pre-activations summed.
- "auto": the one of the two that moves fewer bytes per training step, by `choose_table_layout`.

The rule (bytes per device per forward + backward of one layer; T_l tokens per device, K experts per token,
b bytes per token element, C slots per destination shard):

    rows    E C (4 d b + 12 K)                 tokens and (weight, row) pairs out, partials back, and
                                               their transposes (`dispatch_payload_bytes`)
    hidden  4 T_l d b + 16 E T_l K + 4 T_l K   token and output columns both ways, the group's weights and
                                               indices gathered, s and ds summed, d weights scattered
                                               (`hidden_payload_bytes`)

Neither depends on N. With the default capacity (C = T_l) T_l cancels too, and hidden moves fewer bytes
exactly when d b (E - 1) > K (E + 1): small K next to the row width (the `small` preset: d = 512, K = 32,
bf16) favours hidden, K of the order of d (K = 5d/2 in the matched presets) rows. A capacity factor (which
shrinks C) is a setting of the row dispatch that the hidden layout, computing every pair, would ignore: with
one "auto" takes rows, and "hidden" refuses it (`RoutedConfig`).
The row layout also runs E times the pair work of a device's tokens (each owner computes over every slot
it receives), which bytes do not count; the rule leaves it out and so leans towards rows. A layout that
cannot split the tables is never chosen: rows needs N divisible by E, hidden d divisible by E into slices
the kernels take (multiples of 16). With one expert shard nothing moves either way: "rows", today's.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from omnimoe_jax.parallel._expert_dispatch import dispatch_capacity, dispatch_payload_bytes
from omnimoe_jax.parallel._hidden_dispatch import KERNEL_WIDTH_MULTIPLE, hidden_payload_bytes

TABLE_LAYOUTS = ("rows", "hidden", "auto")


def layout_traffic_bytes(
    layout: str,
    *,
    local_tokens: int,
    top_k: int,
    num_shards: int,
    hidden: int,
    token_dtype: Any,
    capacity_factor: float | None = None,
) -> int:
    """Bytes one device's collectives hand over per training step (forward + backward) of one layer, for
    `layout` "rows" or "hidden" (the module docstring has the formulas)."""
    if layout == "rows":
        if num_shards == 1:
            return 0
        capacity = dispatch_capacity(local_tokens, num_shards, top_k, capacity_factor)
        return dispatch_payload_bytes(num_shards, capacity, top_k, hidden, token_dtype)["forward_backward"]
    if layout == "hidden":
        return hidden_payload_bytes(num_shards, local_tokens, top_k, hidden, token_dtype)["forward_backward"]
    raise ValueError(f"layout={layout!r} must be 'rows' or 'hidden'")


def choose_table_layout(
    layout: str,
    *,
    num_experts: int,
    hidden: int,
    top_k: int,
    local_tokens: int,
    num_shards: int,
    token_dtype: Any,
    capacity_factor: float | None = None,
) -> str:
    """ "rows" or "hidden": `layout` itself unless it is "auto", then the rule of the module docstring."""
    if layout not in TABLE_LAYOUTS:
        raise ValueError(f"expert_parallel_layout={layout!r} must be one of {TABLE_LAYOUTS}")
    if layout != "auto":
        return layout
    if num_shards == 1:
        return "rows"
    rows_fit = num_experts % num_shards == 0
    if capacity_factor is not None:  # a setting of the row dispatch, which the hidden layout would ignore
        if not rows_fit:
            raise ValueError(
                f"expert_capacity_factor={capacity_factor} caps the row layout's dispatch, but num_experts="
                f"{num_experts} rows do not divide over the {num_shards} expert shards"
            )
        return "rows"
    hidden_fit = hidden % num_shards == 0 and (hidden // num_shards) % KERNEL_WIDTH_MULTIPLE == 0
    if rows_fit != hidden_fit:
        return "rows" if rows_fit else "hidden"
    traffic = {
        name: layout_traffic_bytes(
            name,
            local_tokens=local_tokens,
            top_k=top_k,
            num_shards=num_shards,
            hidden=hidden,
            token_dtype=token_dtype,
            capacity_factor=capacity_factor,
        )
        for name in ("rows", "hidden")
    }
    return "hidden" if traffic["hidden"] < traffic["rows"] else "rows"


def config_table_layout(config: Any, *, local_tokens: int, num_shards: int) -> str:
    """`choose_table_layout` for an OmniMoEConfig or FlashMoEConfig (K read under either seed's name)."""
    top_k = getattr(config, "num_experts_per_token", None) or config.num_experts_per_tok
    return choose_table_layout(
        config.expert_parallel_layout,
        num_experts=config.num_experts,
        hidden=config.hidden_size,
        top_k=top_k,
        local_tokens=local_tokens,
        num_shards=num_shards,
        token_dtype=jnp.dtype(config.dtype),
        capacity_factor=config.expert_capacity_factor,
    )
