"""Partition rules: how every parameter, optimizer-state and batch-stats leaf is laid out on the mesh.

Rules match a leaf's path ("params/layers_0/ffn/experts/up_embed", "opt_state/0/mu/.../up_embed") so they
apply to any model that contains OmniMoE layers and to optax states, which mirror the parameter tree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from omnimoe_jax.parallel._device_mesh import EXPERT_AXIS

# (regular expression searched in the leaf path, PartitionSpec of the leaf's TRAILING dimensions).
# Expert tables [N, d] are sharded over "expert" as the table layout says (`expert_parallel_layout`): "rows",
# each expert shard owns N/E whole rows (what the row dispatch expects), or "hidden", each holds d/E columns
# of every row. Their optimizer moments mirror the parameter tree, so they match the same rule and shard
# alike: table memory per device, AdamW state included, falls as 1/E either way. Everything else (router
# gates [d, n], shared MLP [d, I], embeddings, BatchNorm statistics, step counters) is small next to the
# tables and replicated. Specs name trailing dimensions so stacked layers ([L, N, d] from nn.scan) get
# PartitionSpec(None, ...).
_TABLES = r"(^|/)(up_embed|down_embed)$"
TABLE_SPECS = {"rows": PartitionSpec(EXPERT_AXIS, None), "hidden": PartitionSpec(None, EXPERT_AXIS)}


def table_rules(layout: str) -> tuple[tuple[str, PartitionSpec], ...]:
    """The partition rules of expert tables laid out as `layout` ("rows": `DEFAULT_RULES`, or "hidden";
    resolve "auto" first with `choose_table_layout`)."""
    if layout not in TABLE_SPECS:
        raise ValueError(f"layout={layout!r} must be one of {tuple(TABLE_SPECS)} (resolve 'auto' first)")
    return ((_TABLES, TABLE_SPECS[layout]),)


DEFAULT_RULES = table_rules("rows")  # the default layout's


def path_name(path: Sequence[Any]) -> str:
    """'params/layers_0/experts/up_embed' for a pytree key path (dict keys, attributes, indices)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _leaf_shape(leaf: Any) -> tuple[int, ...]:
    return tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)


def _leaf_dtype(leaf: Any) -> np.dtype:
    return leaf.dtype if hasattr(leaf, "dtype") else jnp.asarray(leaf).dtype  # Python scalars: JAX's default


def partition_spec(path: str, shape: tuple[int, ...], rules=DEFAULT_RULES) -> PartitionSpec:
    """The PartitionSpec of one leaf: the first rule whose pattern occurs in `path`, else replicated."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            if len(spec) > len(shape):
                raise ValueError(
                    f"leaf {path!r} of shape {shape} matches partition rule {pattern!r} -> {spec}, which needs "
                    f"at least {len(spec)} dimensions"
                )
            return PartitionSpec(*([None] * (len(shape) - len(spec))), *spec)
    return PartitionSpec()


def partition_specs(tree: Any, rules=DEFAULT_RULES) -> Any:
    """A pytree of PartitionSpecs mirroring `tree` (arrays, ShapeDtypeStructs or scalars as leaves)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, leaf: partition_spec(path_name(p), _leaf_shape(leaf), rules), tree
    )


def _check_divisible(path: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> None:
    for dim, axes in enumerate(spec):
        if axes is None:
            continue
        for axis in (axes,) if isinstance(axes, str) else axes:
            if axis not in mesh.axis_names:
                raise ValueError(f"leaf {path!r}: mesh axis {axis!r} of {spec} is not in the mesh {dict(mesh.shape)}")
        ways = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))
        if shape[dim] % ways:
            raise ValueError(
                f"leaf {path!r} of shape {shape}: dimension {dim} ({shape[dim]}) is not divisible by the "
                f"{ways} shards of {spec} on mesh {dict(mesh.shape)}"
            )


def shardings(tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """A pytree of NamedShardings on `mesh` mirroring `tree` (params, optax state, batch_stats, or all).

    Raises ValueError naming the leaf when a sharded dimension does not divide over its mesh axes (e.g.
    num_experts=36 rows over expert=8).
    """

    def one(path, leaf):
        name, shape = path_name(path), _leaf_shape(leaf)
        spec = partition_spec(name, shape, rules)
        _check_divisible(name, shape, spec, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, tree)


def abstract_state(tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """ShapeDtypeStructs carrying the target shardings on `mesh`: the restore target for orbax.

    `tree` may hold arrays of any layout (from any mesh, or `jax.eval_shape`); restoring a checkpoint with
    `ocp.args.StandardRestore(abstract_state(state, new_mesh))` lays every leaf out for `new_mesh`.
    """
    targets = shardings(tree, mesh, rules)

    def one(leaf, sharding):
        return jax.ShapeDtypeStruct(_leaf_shape(leaf), _leaf_dtype(leaf), sharding=sharding)

    return jax.tree.map(one, tree, targets)
