"""Expert-parallel atomic experts: tokens travel to the shards that own their experts, partial outputs return.

Layout (see `omnimoe_jax.parallel`): tokens [T, d] and their routing [T, K] are split over the batch axes;
the expert tables [N, d] are split by rows over the expert axis (E shards of N/E rows; shard s owns experts
[s N/E, (s+1) N/E)) and replicated over the others. Inside `jax.shard_map`, each device:

1. For each of its T_l tokens and each expert shard s, decides whether any of the token's K experts lives on
   s. Such a (token, shard) pair takes the next of C slots in the buffer for s (token order); pairs past C
   are dropped and counted.
2. Fills the send buffers: the token row [E, C, d], and its K (weight, local row) entries [E, C, K] with
   weight 0 for the entries that live on another shard. One row per (token, shard), not per expert.
3. all_to_all over the expert axis: shard s receives [E, C, ...] from the E devices of its expert group.
4. Runs the same `omni_expert` on what it received with its own N/E rows: one partial d-vector per slot.
5. all_to_all back; each device adds the partials of its tokens over the shards.

Per device and direction that is E * C * (d + 2K) numbers out and E * C * d back, with C <= T_l: bounded by
tokens x shards x d and independent of N. C = T_l (the default) can never overflow, whatever the routing.

The price of static shapes: each owner runs the expert op over all E * C received slots with K entries each,
of which only those on its shard carry weight. With C = T_l that is E times the pair work of one device's
tokens (when K >= E nearly every token needs every shard, so a capacity factor cannot shrink C either);
a per-slot entry capacity (send only the entries on the destination shard, K/E on average) would remove
that factor and is not implemented.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from omnimoe_jax.parallel._device_mesh import token_split
from pallas_kernels import omni_expert


def dispatch_capacity(local_tokens: int, num_shards: int, top_k: int, capacity_factor: float | None) -> int:
    """C, the slots each device keeps per destination shard.

    None: C = local_tokens, enough for any routing. A factor f: f times the number of the device's tokens
    expected to need one shard under uniform routing, local_tokens * (1 - (1 - 1/E)^K), rounded up and
    kept within [1, local_tokens] (more slots than tokens could never be filled).
    """
    if capacity_factor is None:
        return local_tokens
    expected = local_tokens * (1.0 - (1.0 - 1.0 / num_shards) ** top_k)
    return max(1, min(local_tokens, math.ceil(capacity_factor * expected)))


def dispatch_payload_bytes(num_shards: int, capacity: int, top_k: int, hidden: int, token_dtype) -> dict[str, int]:
    """Bytes one device hands to all_to_all per layer call, from the buffer shapes (E = num_shards, C = capacity).

    Forward: token rows [E, C, d] in `token_dtype`, weights [E, C, K] f32 and local rows [E, C, K] int32
    out; partial outputs [E, C, d] back. Backward: the transposed all_to_alls move the cotangents of the
    partial outputs [E, C, d] out, and those of the token rows [E, C, d] (when the layer's input needs a
    gradient, as inside a model) and weights [E, C, K] back; the indices have none. No term depends on the
    number of experts N.
    """
    row = jnp.dtype(token_dtype).itemsize * hidden
    slots = num_shards * capacity
    forward = slots * (row + 4 * top_k + 4 * top_k) + slots * row
    backward = slots * row + slots * (row + 4 * top_k)
    return {"forward": forward, "forward_backward": forward + backward}


def _exchange(x: jax.Array, axis: str) -> jax.Array:
    """all_to_all over `axis` of a buffer [E, ...]: block s goes to shard s; returns [E, ...] by sender."""
    return jax.lax.all_to_all(x, axis, split_axis=0, concat_axis=0, tiled=True)


def _local_dispatch(
    x: jax.Array,
    up: jax.Array,
    down: jax.Array,
    weights: jax.Array,
    indices: jax.Array,
    *,
    expert_axis: str,
    num_shards: int,
    capacity: int,
    token_axes: tuple[str, ...],
    activation: str,
    implementation: str,
    interpret: bool | None,
) -> tuple[jax.Array, jax.Array]:
    """Body of the shard_map. x [T_l, d]; up, down [N/E, d] (this shard's rows); weights, indices [T_l, K]."""
    tokens, _ = x.shape
    top_k = indices.shape[1]
    rows = up.shape[0]
    token_ids = jnp.arange(tokens, dtype=jnp.int32)  # [T_l]
    shard_ids = jnp.arange(num_shards, dtype=jnp.int32)  # [E]

    # 1. Which shards each token needs, and its slot in each shard's buffer.
    owner = indices // rows  # [T_l, K] shard that owns each chosen expert
    local_row = indices - owner * rows  # [T_l, K] the expert's row within its owner's table
    on_shard = owner[:, None, :] == shard_ids[None, :, None]  # [T_l, E, K]
    needs = jnp.any(on_shard, axis=-1)  # [T_l, E]
    slot = jnp.cumsum(needs, axis=0, dtype=jnp.int32) - 1  # [T_l, E] position among tokens needing shard s
    kept = needs & (slot < capacity)  # [T_l, E]
    dropped = jnp.sum(on_shard & ~kept[:, :, None], dtype=jnp.int32)  # (token, expert) pairs with no slot

    # 2. slot_token[s, c]: the token in slot c for shard s; `tokens` marks an empty slot. Dropped pairs
    # scatter to the out-of-range slot `capacity`, which mode="drop" discards (counted above).
    target = jnp.where(kept, slot, capacity)  # [T_l, E]
    slot_token = jnp.full((num_shards, capacity), tokens, jnp.int32)  # [E, C]
    slot_token = slot_token.at[shard_ids[None, :], target].set(token_ids[:, None], mode="drop")  # [E, C]
    filled = slot_token < tokens  # [E, C]
    source = jnp.minimum(slot_token, tokens - 1)  # [E, C] a valid token id to gather from (masked if empty)
    entry_here = on_shard[source, shard_ids[:, None], :] & filled[:, :, None]  # [E, C, K]
    send_x = jnp.where(filled[:, :, None], x[source], 0)  # [E, C, d]
    send_w = jnp.where(entry_here, weights[source].astype(jnp.float32), 0)  # [E, C, K]
    # Entries that are not on shard s keep weight 0 (they add nothing, forward or backward) but still pass
    # through the expert op; spread their rows over the table instead of piling them on row 0, whose
    # segment the expert-sorted kernels would otherwise walk serially.
    spread = jnp.arange(capacity * top_k, dtype=jnp.int32).reshape(capacity, top_k) % rows  # [C, K]
    send_rows = jnp.where(entry_here, local_row[source], spread[None])  # [E, C, K]

    # 3. Each shard receives the buffers addressed to it, blocks ordered by sending device.
    recv_x = _exchange(send_x, expert_axis).reshape(num_shards * capacity, -1)  # [E*C, d]
    recv_w = _exchange(send_w, expert_axis).reshape(num_shards * capacity, -1)  # [E*C, K]
    recv_rows = _exchange(send_rows, expert_axis).reshape(num_shards * capacity, -1)  # [E*C, K]

    # 4. The same expert op as on one device, over this shard's rows; zero weights contribute nothing.
    partial = omni_expert(
        recv_x, up, down, recv_w, recv_rows, activation=activation, implementation=implementation, interpret=interpret
    )

    # 5. Partials return to their senders; each token gathers its partials from its slots and adds them
    # over the shards in a fixed order (f32, then x.dtype): no scatter, so the sum is deterministic.
    back = _exchange(partial.reshape(num_shards, capacity, -1), expert_axis)  # [E, C, d] by owner shard
    mine = back[shard_ids[None, :], jnp.where(kept, slot, 0)]  # [T_l, E, d] this token's partial from shard s
    y = jnp.sum(jnp.where(kept[:, :, None], mine.astype(jnp.float32), 0), axis=1)  # [T_l, d]
    return y.astype(x.dtype), jax.lax.psum(dropped, token_axes)


def expert_parallel_omni_expert(
    x: jax.Array,
    up: jax.Array,
    down: jax.Array,
    weights: jax.Array,
    indices: jax.Array,
    *,
    mesh: Mesh | AbstractMesh,
    expert_axis: str,
    capacity_factor: float | None = None,
    activation: str = "silu",
    implementation: str = "auto",
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`omni_expert` with the tables row-sharded over `expert_axis` of `mesh`; returns (y, dropped_pairs).

    | argument | shape | sharding (inside jit; other layouts are resharded on entry) |
    | --- | --- | --- |
    | x | [T, d] | rows split over `batch_axes(mesh)` ("data", "expert") |
    | up, down | [N, d] | rows split over `expert_axis`, replicated over the others |
    | weights, indices | [T, K] | like x |
    | returns y | [T, d] x.dtype | like x |
    | returns dropped_pairs | [] int32 | replicated: (token, expert) pairs dropped for lack of capacity, all devices |

    `activation`, `implementation`, `interpret`: as in `omni_expert`, which each device runs on what it received.
    Raises ValueError if T does not divide over the mesh or N over the expert axis.
    """
    tokens, top_k = indices.shape
    token_axes, token_shards = token_split(mesh, expert_axis, tokens)
    num_shards = mesh.shape[expert_axis]
    if up.shape[0] % num_shards:
        raise ValueError(
            f"num_experts={up.shape[0]} rows do not divide over the {num_shards} shards of mesh axis {expert_axis!r}"
        )
    capacity = dispatch_capacity(tokens // token_shards, num_shards, top_k, capacity_factor)
    body = functools.partial(
        _local_dispatch,
        expert_axis=expert_axis,
        num_shards=num_shards,
        capacity=capacity,
        token_axes=token_axes,
        activation=activation,
        implementation=implementation,
        interpret=interpret,
    )
    token_spec = PartitionSpec(token_axes)
    table_spec = PartitionSpec(expert_axis, None)
    # check_vma=False: Pallas kernels (the GPU expert op) do not declare how their outputs vary over mesh
    # axes, which shard_map's checker requires. The specs hold by construction: y is per token, and
    # dropped_pairs is psum-ed over every axis that splits tokens, so it is replicated.
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(token_spec, table_spec, table_spec, token_spec, token_spec),
        out_specs=(token_spec, PartitionSpec()),
        check_vma=False,
    )(x, up, down, weights, indices)
