"""The training job on a device mesh (data + expert parallelism) and across processes (`jax.distributed`).

`python -m train --mesh data=2,expert=4` trains the same model with the same numbers as on one device:

- the FFN configs get `expert_axis="expert"`, so OmniMoE and FlashMoE layers dispatch each token's (token,
  expert) pairs to the devices owning those expert rows (`omnimoe_jax.parallel`);
- the whole TrainState (step, params, batch_stats, AdamW moments) is laid out by `parallel.shardings` with
  `partition_rules(config, mesh)`: the expert tables and their moments sharded over "expert" as the FFN's
  `expert_parallel_layout` says (by rows or by columns; "auto" resolved once for the run's micro-batch by
  `table_layout`), the rest replicated; the init, train and eval steps are jitted with those in/out
  shardings, the train step donating its state;
- every process draws the same global batch from the shared sampler state (so a run resumes exactly, and
  on any mesh), keeps the rows its own devices hold (`parallel.process_rows`) and assembles the global
  array from them (`parallel.shard_batch`); the micro-batch dimension is the one split over the devices.

The model has no dropout, so the TrainState holds no random key; the data sampler's RNG lives on the host
and is checkpointed with the state.

Several processes (`--coordinator`, `--num-processes`, `--process-id`) run the same loop on one mesh over
all their devices. They must take the same decisions at the same steps, so a stop requested in one
process (SIGINT/SIGTERM, the time limit) is agreed on at logged steps (`agree_on_stop`), and writing the
run's config waits for every process to have checked the run directory (`sync`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from omnimoe_jax import parallel
from omnimoe_jax._model import ROUTED_KINDS
from train.config import AUTO_GRAD_ACCUM, TrainConfig


def table_layout(config: TrainConfig, mesh: Mesh) -> str | None:
    """ "rows" or "hidden": how the run's expert tables split over the mesh's expert axis (the FFN's
    `expert_parallel_layout`, "auto" resolved for a micro-batch's tokens per device); None for an FFN
    kind without expert tables that shard (the baselines)."""
    if not config.model.ffn.routed:
        return None
    local_tokens = config.micro_batch_size * config.model.context_length // batch_shards(mesh)
    return parallel.config_table_layout(
        config.model.ffn, local_tokens=max(1, local_tokens), num_shards=mesh.shape[parallel.EXPERT_AXIS]
    )


def with_expert_axis(config: TrainConfig, mesh: Mesh) -> TrainConfig:
    """`config` whose OmniMoE layers dispatch over the mesh's "expert" axis (what a run on a mesh trains),
    with the table layout `table_layout(config, mesh)` ("auto" resolved, so the layers of the training and
    the evaluation steps, whatever their batch, lay the tables out as `partition_rules` does).

    Without a mesh in context the layers compute exactly as with `expert_axis=None`, so the same config
    also evaluates, samples and restores on one device.
    """
    layout = table_layout(config, mesh)
    if layout is None:  # the baselines' tables have no expert-parallel dispatch (check_mesh)
        return config
    ffn = config.model.ffn.replace(expert_axis=parallel.EXPERT_AXIS, expert_parallel_layout=layout)
    return dataclasses.replace(config, model=config.model.replace(ffn=ffn))


def partition_rules(config: TrainConfig, mesh: Mesh) -> tuple:
    """The partition rules of the run's TrainState on `mesh`: the expert tables (and their AdamW moments) by
    rows or by columns over "expert", as `table_layout` says; everything else replicated."""
    return parallel.table_rules(table_layout(config, mesh) or "rows")


def batch_shards(mesh: Mesh) -> int:
    """Devices the batch is split over (all of them: data x expert)."""
    return math.prod(mesh.shape[a] for a in parallel.batch_axes(mesh))


def check_mesh(config: TrainConfig, mesh: Mesh) -> None:
    """ValueError, naming the fields, when `config` cannot be laid out on `mesh`. With grad_accum "auto" the
    largest micro-batch (grad_accum=1) is checked: `train.memory.fit_train_step` checks each one it tries."""
    if config.grad_accum == AUTO_GRAD_ACCUM:
        config = dataclasses.replace(config, grad_accum=1)
    shards = batch_shards(mesh)
    if config.micro_batch_size % shards:
        raise ValueError(
            f"mesh {dict(mesh.shape)} splits each micro-batch over {shards} devices, but batch_size="
            f"{config.batch_size} / grad_accum={config.grad_accum} = {config.micro_batch_size} sequences is not "
            f"a multiple of {shards}"
        )
    experts = mesh.shape[parallel.EXPERT_AXIS]
    if experts > 1 and not config.model.ffn.routed:
        # The baselines have no expert-parallel dispatch: refuse rather than quietly train data-parallel.
        raise ValueError(
            f"an expert axis of {experts} devices needs ffn={' or '.join(map(repr, ROUTED_KINDS))} (expert "
            f"parallelism is implemented for their atomic experts only); ffn={config.model.ffn_kind!r} trains "
            f"data-parallel: use --mesh data={batch_shards(mesh)}"
        )
    layout = table_layout(config, mesh)
    if layout == "rows" and config.model.sparse_layers and config.model.ffn.num_experts % experts:
        raise ValueError(
            f"num_experts={config.model.ffn.num_experts} expert rows do not divide over the {experts} devices of the "
            f"mesh's expert axis {dict(mesh.shape)}"
        )
    if layout == "hidden" and config.model.sparse_layers:
        # The layer's own check, before anything compiles: d over the expert axis, in slices the kernels take.
        parallel.check_hidden_width(config.model.hidden_size, experts, config.model.ffn.implementation)


def jit_steps(
    mesh: Mesh, rules: tuple, init_state: Callable, train_step: Callable, eval_step: Callable
) -> tuple[Callable, Callable, Callable]:
    """(init_state, train_step, eval_step) jitted with the TrainState's shardings on `mesh` by `rules`
    (`partition_rules`).

    train_step(state, batch [accum, micro, L + 1]) splits the micro dimension over the devices and donates
    `state`; eval_step(state, batch [B, L + 1]) splits B. Metrics and sums come back replicated, so every
    process reads them.
    """
    state = parallel.shardings(jax.eval_shape(init_state, jax.random.key(0)), mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    train_batch = parallel.batch_sharding(mesh, axis=1)
    return (
        jax.jit(init_state, out_shardings=state),
        jax.jit(train_step, in_shardings=(state, train_batch), out_shardings=(state, replicated), donate_argnums=0),
        jax.jit(eval_step, in_shardings=(state, parallel.batch_sharding(mesh)), out_shardings=replicated),
    )


def restore_target(abstract: Any, mesh: Mesh | None, rules: tuple = parallel.DEFAULT_RULES) -> Any:
    """`abstract` (ShapeDtypeStructs) with the shardings a restored state must have: those of `mesh` by
    `rules` (`partition_rules`), or the first device without one, whatever mesh, table layout (or
    processes) the checkpoint was saved from: orbax reads each leaf into the target's layout."""
    if mesh is not None:
        return parallel.abstract_state(abstract, mesh, rules)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), abstract)


def put_batch(mesh: Mesh, batch: np.ndarray, *, axis: int) -> jax.Array:
    """The global batch (the same numpy array in every process) as a jax.Array split over `mesh` along
    `axis`, each process supplying only the rows its devices hold."""
    rows = parallel.process_rows(mesh, batch.shape[axis])
    return parallel.shard_batch(mesh, np.take(batch, rows, axis=axis), axis=axis)


def is_primary() -> bool:
    """Whether this process writes the run's config, metrics and progress lines (process 0)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Wait until every process gets here (nothing to wait for in a one-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def agree_on_stop(reason: str | None, *, at_agreement_point: bool) -> str | None:
    """This step's reason to stop, the same in every process.

    One process: `reason` itself, at once. Several: `None` except at agreement points (the loop uses its
    logged steps, where it waits for the devices anyway), where every process learns whether any process
    wants to stop; they then all stop, those without a reason of their own with "another process stopped".
    """
    if jax.process_count() == 1:
        return reason
    if not at_agreement_point:
        return None
    votes = multihost_utils.process_allgather(np.int32(reason is not None))  # [processes]
    if not np.any(votes):
        return None
    return reason or "another process stopped"
