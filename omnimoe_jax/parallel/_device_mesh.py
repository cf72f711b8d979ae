"""The device mesh: named axes ("data", "expert"), built from a spec such as "data=2,expert=4"; the mesh a
layer finds in context; the batch's layout on it.

Imports nothing of the layers or of the expert dispatch, so every layer (the router too) can look the mesh
up here."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from omnimoe_jax._config_fields import is_int

DATA_AXIS = "data"
EXPERT_AXIS = "expert"
# Mesh axes in device order: "expert" innermost, so the shards of one expert table are neighbouring devices
# (on one host, NVLink) and the all_to_all of the expert dispatch stays on the fastest links.
MESH_AXES = (DATA_AXIS, EXPERT_AXIS)
# The batch (token) dimension is split over every axis: each device routes its own tokens.
BATCH_AXES = (DATA_AXIS, EXPERT_AXIS)
# Axes people may reasonably ask for that are not implemented yet, with the reason.
_NOT_YET = {"model": "tensor parallelism of the attention/shared MLP ('model' axis) is not implemented yet"}


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    """{"data": D, "expert": E} from "data=2,expert=4" (or a mapping). A missing axis has size 1.

    Axis order in the spec does not matter; the mesh always lays axes out as `MESH_AXES`.
    """
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, str):
        items = []
        for part in (p.strip() for p in spec.split(",")):
            name, sep, size = part.partition("=")
            if not sep:
                raise ValueError(f"mesh spec {spec!r}: {part!r} is not of the form axis=size (e.g. 'data=2,expert=4')")
            try:
                items.append((name.strip(), int(size)))
            except ValueError:
                raise ValueError(
                    f"mesh spec {spec!r}: size {size.strip()!r} of axis {name.strip()!r} is not an int"
                ) from None
    else:
        raise TypeError(f"mesh spec must be a str like 'data=2,expert=4' or a mapping, got {spec!r}")
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for name, size in items:
        if name in _NOT_YET:
            raise ValueError(f"mesh spec {spec!r}: {_NOT_YET[name]}; axes available: {MESH_AXES}")
        if name not in sizes:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; expected axes from {MESH_AXES}")
        if name in seen:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} is given twice")
        if not is_int(size) or size < 1:
            raise ValueError(f"mesh spec {spec!r}: size of axis {name!r} must be a positive int, got {size!r}")
        seen.add(name)
        sizes[name] = size
    return sizes


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A `jax.sharding.Mesh` with axes `MESH_AXES` over exactly `devices` (default: all of `jax.devices()`).

    The axes are `AxisType.Auto`: jit propagates shardings (pjit semantics); use the mesh with
    `jax.set_mesh(mesh)` so `OmniMoE` layers with `expert_axis="expert"` find it.

    Raises ValueError when the product of the axis sizes is not the number of devices.
    """
    sizes = parse_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(sizes[a] for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        hint = ""
        if devices and devices[0].platform == "cpu":
            hint = (
                f" (on a CPU, set JAX_NUM_CPU_DEVICES={math.prod(shape)} before Python starts, for that many devices)"
            )
        raise ValueError(
            f"mesh spec {spec!r} has {math.prod(shape)} devices ({' x '.join(map(str, shape))}) but "
            f"{len(devices)} {'device is' if len(devices) == 1 else 'devices are'} available; the axis sizes must "
            f"multiply to the device count{hint}"
        )
    # jax.make_mesh orders devices for the physical topology (it would also silently take a prefix of the
    # devices, hence the check above).
    return jax.make_mesh(shape, MESH_AXES, (AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_axes(mesh: Mesh | AbstractMesh) -> tuple[str, ...]:
    """The mesh axes that split the batch dimension (the `BATCH_AXES` present in `mesh`)."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def token_split(mesh: Mesh | AbstractMesh, expert_axis: str, tokens: int) -> tuple[tuple[str, ...], int]:
    """(the `batch_axes` of `mesh`, how many devices they span) for an expert-parallel layer over T =
    `tokens`; ValueError unless `expert_axis` is an axis of `mesh` and T divides over those devices."""
    if expert_axis not in mesh.axis_names:
        raise ValueError(f"expert_axis={expert_axis!r} is not an axis of the mesh {dict(mesh.shape)}")
    token_axes = batch_axes(mesh)
    token_shards = math.prod(mesh.shape[a] for a in token_axes)
    if tokens % token_shards:
        raise ValueError(
            f"the expert-parallel layer splits its {tokens} tokens over the {token_shards} devices of mesh "
            f"{dict(mesh.shape)}; the token count (batch x sequence) must be a multiple of {token_shards}"
        )
    return token_axes, token_shards


def expert_parallel_mesh(expert_axis: str | None) -> AbstractMesh | None:
    """The mesh set by `jax.set_mesh` if expert parallelism is on (it has `expert_axis`), else None.

    What the router (per-device top-K) and the atomic experts (dispatch to expert shards) both ask."""
    mesh = jax.sharding.get_abstract_mesh()  # empty when no mesh is set
    return mesh if expert_axis is not None and expert_axis in mesh.axis_names else None


def batch_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Dimension `axis` (the batch; default the leading one) split over `batch_axes(mesh)`, others replicated."""
    if not is_int(axis) or axis < 0:
        raise ValueError(f"axis={axis!r} must be a non-negative int (the batch dimension)")
    return NamedSharding(mesh, PartitionSpec(*([None] * axis), batch_axes(mesh)))


def shard_tokens(fn: Callable[..., Any], mesh: Mesh | AbstractMesh) -> Callable[..., Any]:
    """`fn` run by each device on its own tokens: every argument and output is split on its leading (token)
    dimension over `batch_axes(mesh)`. For per-token ops that XLA's partitioner would otherwise gather onto
    every device (it replicates `lax.top_k` and cannot split a Pallas kernel)."""
    axes = batch_axes(mesh)
    shards = math.prod(mesh.shape[a] for a in axes)
    spec = PartitionSpec(axes)

    def run(*args):
        for arg in args:
            if arg.ndim == 0 or arg.shape[0] % shards:
                raise ValueError(
                    f"tokens are split over the {shards} devices of mesh {dict(mesh.shape)}, so the token count "
                    f"(batch x sequence) must be a multiple of {shards}; got an input of shape {arg.shape}"
                )
        # check_vma=False: a Pallas kernel in `fn` does not declare how its outputs vary over mesh axes; every
        # output here is per token, as the spec says.
        return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(*args)

    return run


def process_rows(mesh: Mesh, global_rows: int) -> np.ndarray:
    """Indices [R] (increasing) of the rows of a global batch of `global_rows` rows that this process's
    devices hold under `batch_sharding(mesh)`: the rows this process hands to `shard_batch`.

    One process: every row. Several: R = global_rows / jax.process_count() rows, wherever the mesh put this
    process's devices (`make_mesh` may order devices for the topology, so do not assume a block per process).
    """
    shards = math.prod(mesh.shape[a] for a in batch_axes(mesh))
    if not is_int(global_rows) or global_rows < 1 or global_rows % shards:
        raise ValueError(
            f"global_rows={global_rows!r}: a batch must have a positive multiple of the {shards} batch shards of "
            f"mesh {dict(mesh.shape)} rows"
        )
    rows: set[int] = set()
    for (index,) in batch_sharding(mesh).addressable_devices_indices_map((global_rows,)).values():
        rows.update(range(*index.indices(global_rows)))  # one slice of rows per local device
    return np.array(sorted(rows), dtype=np.int64)


def shard_batch(mesh: Mesh, local_batch: Any, *, axis: int = 0) -> Any:
    """Global jax.Arrays, batch-sharded over `mesh`, from this process's rows (a pytree of numpy arrays).

    Dimension `axis` of every leaf is the batch; each process passes the rows `process_rows(mesh, global
    rows)` of the global batch, in that order (one process: the whole batch). The global batch has
    `jax.process_count()` times the local rows, which must divide over the batch shards.
    """
    sharding = batch_sharding(mesh, axis)
    shards = math.prod(mesh.shape[a] for a in batch_axes(mesh))

    def put(path, leaf):
        leaf = np.asarray(leaf)
        rows = leaf.shape[axis] * jax.process_count() if leaf.ndim > axis else 0
        if rows == 0 or rows % shards:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} of local shape {leaf.shape} gives {rows} global rows "
                f"along axis {axis} over {jax.process_count()} processes; expected a positive multiple of the "
                f"{shards} batch shards of mesh {dict(mesh.shape)}"
            )
        global_shape = (*leaf.shape[:axis], rows, *leaf.shape[axis + 1 :])
        return jax.make_array_from_process_local_data(sharding, leaf, global_shape)

    return jax.tree_util.tree_map_with_path(put, local_batch)
