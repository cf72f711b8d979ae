"""Data + expert parallelism over a device mesh, on one host or many (`jax.distributed`).

The recipe (what a training script does; `python -m train --mesh data=2,expert=4` is the real one, see
train/mesh.py):

    from omnimoe_jax import parallel

    parallel.initialize_distributed("host0:1234", num_processes, process_id)  # multi-host only, first
    mesh = parallel.make_mesh("data=2,expert=4")          # axes ("data", "expert"), sizes multiply to #devices
    config = config.replace(expert_axis="expert")         # OmniMoE layers dispatch tokens to expert shards
    with jax.set_mesh(mesh):                              # layers find the mesh here
        abstract = jax.eval_shape(init_state)             # params, optax state, batch_stats: any pytree
        state_shardings = parallel.shardings(abstract, mesh)
        state = jax.jit(init_state, out_shardings=state_shardings)()
        step = jax.jit(train_step, in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
                       out_shardings=(state_shardings, None), donate_argnums=0)
        rows = parallel.process_rows(mesh, len(global_batch))  # this process's rows (all, on one host)
        state, metrics = step(state, parallel.shard_batch(mesh, global_batch[rows]))

Layout: expert tables `up_embed`/`down_embed` [N, d] are sharded over "expert" as the layers'
`expert_parallel_layout` says: "rows" (the default; each shard owns N/E whole experts, `DEFAULT_RULES`) or
"hidden" (each shard holds d/E columns of every expert; `shardings(abstract, mesh, table_rules("hidden"))`),
or "auto", which `choose_table_layout` resolves by the bytes each layout moves. Everything else is
replicated, and the batch is split over ("data", "expert"). The router runs under plain jit on the sharded
batch, so its BatchNorm statistics are those of the global batch.
Apply the model with `mutable=[..., "intermediates"]` to read each layer's "dispatch_dropped_pairs" count.

Checkpoints: save the sharded state with orbax as usual; restore onto another mesh (or mesh shape) with
`ocp.args.StandardRestore(parallel.abstract_state(state_or_abstract, new_mesh))`.

Traffic: `collective_bytes(jax.jit(step).lower(...).compile().as_text())` sums the collectives of a compiled
step by kind; `dispatch_payload_bytes` and `hidden_payload_bytes` give the expert layer's share from its
buffer shapes.

Modules (all private; this file is the public surface): `_device_mesh` (axes, `make_mesh`, the mesh a layer
finds in context, the batch's layout), `_partition` (the parameter layout rules), `_expert_dispatch` (the
all_to_all of tokens to expert shards: "rows"), `_hidden_dispatch` (column-sharded tables: "hidden"),
`_table_layout` (which of the two: the "auto" rule), `_collectives` (traffic read from compiled HLO),
`_multihost` (`jax.distributed`). They import JAX, `pallas_kernels` and the field checks (`_config_fields`),
never the layers: the layers (router, atomic experts) import `_device_mesh`, the two dispatches and
`_table_layout`, and the configs import `_table_layout`'s names of the layouts.
"""

from omnimoe_jax.parallel._collectives import COLLECTIVES, collective_bytes
from omnimoe_jax.parallel._device_mesh import (
    BATCH_AXES,
    DATA_AXIS,
    EXPERT_AXIS,
    MESH_AXES,
    batch_axes,
    batch_sharding,
    expert_parallel_mesh,
    make_mesh,
    parse_mesh_spec,
    process_rows,
    shard_batch,
    shard_tokens,
)
from omnimoe_jax.parallel._expert_dispatch import (
    dispatch_capacity,
    dispatch_payload_bytes,
    expert_parallel_omni_expert,
)
from omnimoe_jax.parallel._hidden_dispatch import check_hidden_width, hidden_parallel_omni_expert, hidden_payload_bytes
from omnimoe_jax.parallel._multihost import initialize_distributed
from omnimoe_jax.parallel._partition import (
    DEFAULT_RULES,
    abstract_state,
    partition_specs,
    path_name,
    shardings,
    table_rules,
)
from omnimoe_jax.parallel._table_layout import (
    TABLE_LAYOUTS,
    choose_table_layout,
    config_table_layout,
    layout_traffic_bytes,
)

__all__ = [
    "BATCH_AXES",
    "COLLECTIVES",
    "DATA_AXIS",
    "DEFAULT_RULES",
    "EXPERT_AXIS",
    "MESH_AXES",
    "TABLE_LAYOUTS",
    "abstract_state",
    "batch_axes",
    "batch_sharding",
    "check_hidden_width",
    "choose_table_layout",
    "collective_bytes",
    "config_table_layout",
    "dispatch_capacity",
    "dispatch_payload_bytes",
    "expert_parallel_mesh",
    "expert_parallel_omni_expert",
    "hidden_parallel_omni_expert",
    "hidden_payload_bytes",
    "initialize_distributed",
    "layout_traffic_bytes",
    "make_mesh",
    "parse_mesh_spec",
    "partition_specs",
    "path_name",
    "process_rows",
    "shard_batch",
    "shard_tokens",
    "shardings",
    "table_rules",
]
