"""Expert-parallel atomic experts with the tables sharded on the hidden dimension: every shard holds d/E
columns of EVERY expert row (Meta's memory layers' `ColwiseEmbeddingBag`, UltraMemV2's
`ImplicitValueExpansionParallel`), so no token travels to an expert and no shard is busier than another.

Layout (see `omnimoe_jax.parallel`): tokens [T, d] and their routing [T, K] are split over the batch axes
("data", "expert"), as for the row layout; the tables up/down [N, d] are split by columns over the expert
axis (shard s holds columns [s d/E, (s+1) d/E) of every row) and replicated over the others. Inside
`jax.shard_map`, the E devices of one expert group (T_g = E T_l tokens, T_l on each) each:

1. all_to_all of the tokens by columns: the device sends column slice s of its T_l token rows to shard s
   and receives its own column slice of all T_g tokens of the group, x_c [T_g, d/E].
2. all_gather of the group's routing: weights and indices [T_g, K] (each device routed its own tokens).
3. Partial pre-activations on its columns, s_c[t, k] = up[e_tk, cols] . x_c[t] (`row_dots`, f32), summed
   over the expert axis (psum): every shard then holds the full s [T_g, K].
4. h = act(s) * w, and its columns of the output, y_c[t] = sum_k h[t, k] down[e_tk, cols]
   (`embedding_bag`) [T_g, d/E].
5. all_to_all back: the device returns token block r of y_c to device r and receives, from every shard,
   its columns of its own T_l tokens: y [T_l, d].

Gradients follow from the collectives' transposes (all_to_all back, psum of ds, reduce-scatter of the
weights' cotangent over the group), so the backward is exact too. Per device and training step (forward
and backward) that is, in bytes (b the token dtype's size, `hidden_payload_bytes`): 4 T_l d b for the four
all_to_alls (x, y and their cotangents), 16 E T_l K for the f32/int32 [T_g, K] arrays (weights and indices
gathered, s and ds summed) and 4 T_l K for the weights' reduce-scatter: nothing depends on N or on where
the chosen experts live. Each shard does 1/E of the group's pair work, whatever the routing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from omnimoe_jax.parallel._device_mesh import token_split
from pallas_kernels import _dispatch, embedding_bag, row_dots
from pallas_kernels.activations import get_activation

# The kernels take rows whose width is a multiple of this (pallas_kernels.omni_expert.config).
KERNEL_WIDTH_MULTIPLE = 16


def hidden_payload_bytes(num_shards: int, local_tokens: int, top_k: int, hidden: int, token_dtype) -> dict[str, int]:
    """Bytes in the results of the collectives one device runs per layer call (what `collective_bytes` reads
    from the compiled program), E = num_shards, T_l = local_tokens, K = top_k, d = hidden.

    Forward: x's column slices [E T_l, d/E] and y's [T_l, d] (all_to_all, token dtype); weights and indices
    gathered [E T_l, K] (f32, int32); s summed [E T_l, K] f32 (all-reduce). Backward: the all_to_alls of
    dy and dx, ds summed [E T_l, K], and the weights' cotangent reduce-scattered to [T_l, K]. None with
    one shard (the collectives then move nothing).
    """
    if num_shards == 1:
        return {"forward": 0, "forward_backward": 0, "all_to_all": 0, "all_gather": 0, "all_reduce": 0}
    rows = local_tokens * hidden * jnp.dtype(token_dtype).itemsize
    group = num_shards * local_tokens * top_k * 4  # one f32 or int32 [E T_l, K] array
    all_to_all = {"forward": 2 * rows, "forward_backward": 4 * rows}
    gathered = 2 * group
    summed = {"forward": group, "forward_backward": 2 * group}
    scattered = local_tokens * top_k * 4
    return {
        "forward": all_to_all["forward"] + gathered + summed["forward"],
        "forward_backward": all_to_all["forward_backward"] + gathered + summed["forward_backward"] + scattered,
        "all_to_all": all_to_all["forward_backward"],
        "all_gather": gathered,
        "all_reduce": summed["forward_backward"],
    }


def check_hidden_width(hidden: int, num_shards: int, implementation: str) -> None:
    """ValueError unless d columns split over the expert axis into slices the chosen expert op takes."""
    if hidden % num_shards:
        raise ValueError(
            f'expert_parallel_layout="hidden" splits hidden_size d={hidden} into columns over the {num_shards} '
            f"devices of the expert axis; d must be a multiple of {num_shards}"
        )
    width = hidden // num_shards
    kernels = _dispatch.resolve_implementation(implementation, supported=("xla", "pallas")) == "pallas"
    if kernels and width % KERNEL_WIDTH_MULTIPLE:
        raise ValueError(
            f'expert_parallel_layout="hidden" with the Pallas kernels (implementation={implementation!r}) needs '
            f"d / E a multiple of {KERNEL_WIDTH_MULTIPLE}: hidden_size d={hidden} over an expert axis of "
            f'{num_shards} devices gives {width}-column slices (use expert_parallel_layout="rows", a d that is a '
            f'multiple of {KERNEL_WIDTH_MULTIPLE * num_shards}, or implementation="xla")'
        )


def _local_columns(
    x: jax.Array,
    up: jax.Array,
    down: jax.Array,
    weights: jax.Array,
    indices: jax.Array,
    *,
    expert_axis: str,
    activation: str,
    implementation: str,
    interpret: bool | None,
) -> jax.Array:
    """Body of the shard_map. x [T_l, d]; up, down [N, d/E] (this shard's columns); weights, indices [T_l, K]."""
    act = get_activation(activation)
    kernels = dict(implementation=implementation, interpret=interpret)
    # 1. Column slice s of every token row to shard s: this shard's columns of the group's tokens.
    x_cols = jax.lax.all_to_all(x, expert_axis, split_axis=1, concat_axis=0, tiled=True)  # [T_g, d/E]
    # 2. The group's routing, blocks in the same (sender) order as x_cols' rows.
    w = jax.lax.all_gather(weights.astype(jnp.float32), expert_axis, axis=0, tiled=True)  # [T_g, K]
    ids = jax.lax.all_gather(indices.astype(jnp.int32), expert_axis, axis=0, tiled=True)  # [T_g, K]
    # 3. Partial pre-activations over this shard's columns, summed over the shards: the full u_e . x_t.
    s = jax.lax.psum(row_dots(up, x_cols, ids, **kernels), expert_axis)  # [T_g, K] f32
    # 4. This shard's columns of the output.
    h = act.forward(s) * w  # [T_g, K] f32
    y_cols = embedding_bag(down, h, ids, **kernels).astype(x.dtype)  # [T_g, d/E]
    # 5. Token block r back to device r, every shard's columns side by side: the device's own rows.
    return jax.lax.all_to_all(y_cols, expert_axis, split_axis=0, concat_axis=1, tiled=True)  # [T_l, d]


def hidden_parallel_omni_expert(
    x: jax.Array,
    up: jax.Array,
    down: jax.Array,
    weights: jax.Array,
    indices: jax.Array,
    *,
    mesh: Mesh | AbstractMesh,
    expert_axis: str,
    activation: str = "silu",
    implementation: str = "auto",
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`omni_expert` with the tables column-sharded over `expert_axis` of `mesh`; returns (y, dropped_pairs).

    | argument | shape | sharding (inside jit; other layouts are resharded on entry) |
    | --- | --- | --- |
    | x | [T, d] | rows split over `batch_axes(mesh)` ("data", "expert") |
    | up, down | [N, d] | columns split over `expert_axis`, replicated over the others |
    | weights, indices | [T, K] | like x |
    | returns y | [T, d] x.dtype | like x |
    | returns dropped_pairs | [] int32 | always 0 (no capacity: every pair is computed), as the row layout's |

    `activation`, `implementation`, `interpret`: as in `omni_expert`; each device runs `row_dots` and
    `embedding_bag` with them on its column slice. Raises ValueError if T does not divide over the mesh, d
    over the expert axis, or (for the Pallas kernels) d / E is not a multiple of 16.
    """
    token_axes, _ = token_split(mesh, expert_axis, indices.shape[0])
    check_hidden_width(x.shape[1], mesh.shape[expert_axis], implementation)
    body = functools.partial(
        _local_columns,
        expert_axis=expert_axis,
        activation=activation,
        implementation=implementation,
        interpret=interpret,
    )
    token_spec = PartitionSpec(token_axes)
    table_spec = PartitionSpec(None, expert_axis)
    # check_vma=False: Pallas kernels do not declare how their outputs vary over mesh axes. The spec holds by
    # construction: y is per token.
    y = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(token_spec, table_spec, table_spec, token_spec, token_spec),
        out_specs=token_spec,
        check_vma=False,
    )(x, up, down, weights, indices)
    return y, jnp.zeros((), jnp.int32)
