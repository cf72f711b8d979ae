"""Mesh specs, partition rules, batch sharding, the new config fields and argument checks of
omnimoe_jax.parallel (8 CPU devices, set up in conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import cpu_mesh
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from omnimoe_jax import OmniMoE, OmniMoEConfig, parallel

CONFIG = OmniMoEConfig(hidden_size=16, intermediate_size=24, num_experts=64, num_experts_per_token=4)


@pytest.mark.parametrize(
    ("spec", "sizes"),
    [
        ("data=2,expert=4", {"data": 2, "expert": 4}),
        (" expert = 8 ", {"data": 1, "expert": 8}),
        ("expert=4,data=2", {"data": 2, "expert": 4}),
        ({"data": 8}, {"data": 8, "expert": 1}),
    ],
)
def test_mesh_spec_parses_and_missing_axes_have_size_one(spec, sizes):
    assert parallel.parse_mesh_spec(spec) == sizes
    mesh = cpu_mesh(spec)
    assert mesh.axis_names == ("data", "expert")
    assert dict(mesh.shape) == sizes
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices("cpu"))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("data=2,model=4", r"'data=2,model=4': tensor parallelism .* not implemented yet"),
        ("data=2,pipe=4", r"unknown axis 'pipe'; expected axes from \('data', 'expert'\)"),
        ("data=2,data=4", "axis 'data' is given twice"),
        ("data=0,expert=8", "size of axis 'data' must be a positive int, got 0"),
        ("data:8", r"'data:8' is not of the form axis=size"),
        ("data=two", "size 'two' of axis 'data' is not an int"),
        ({"expert": 2.0}, "size of axis 'expert' must be a positive int, got 2.0"),
    ],
)
def test_bad_mesh_specs_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        parallel.parse_mesh_spec(spec)


def test_mesh_must_use_exactly_the_devices():
    with pytest.raises(ValueError, match=r"mesh spec 'data=2,expert=2' has 4 devices \(2 x 2\) but 8 devices"):
        cpu_mesh("data=2,expert=2")
    mesh = parallel.make_mesh("data=2,expert=2", devices=jax.devices("cpu")[:4])
    assert mesh.size == 4
    with pytest.raises(TypeError, match="mesh spec must be a str"):
        parallel.make_mesh(8)


def model_state(config=CONFIG, tokens=16):
    """Abstract (shape-only) variables of one layer and the AdamW state of its params."""
    variables = jax.eval_shape(OmniMoE(config).init, jax.random.key(0), jnp.zeros((tokens, config.hidden_size)))
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, variables["params"])
    return {**variables, "opt_state": opt_state, "step": 0}


def test_rules_shard_expert_tables_and_their_optimizer_moments_and_replicate_the_rest():
    specs = parallel.partition_specs(model_state())
    flat = {parallel.path_name(path): spec for path, spec in jax.tree_util.tree_leaves_with_path(specs)}
    tables = sorted(name for name, spec in flat.items() if spec == P("expert", None))
    assert tables == [
        "opt_state/0/mu/experts/down_embed",
        "opt_state/0/mu/experts/up_embed",
        "opt_state/0/nu/experts/down_embed",
        "opt_state/0/nu/experts/up_embed",
        "params/experts/down_embed",
        "params/experts/up_embed",
    ]
    others = {name: spec for name, spec in flat.items() if name not in tables}
    assert "params/router/router_gate_x/kernel" in others and "batch_stats/router/router_norm_x/running_mean" in others
    assert "opt_state/0/count" in others and "step" in others
    assert all(spec == P() for spec in others.values()), others


def test_rules_apply_to_stacked_layers_inside_any_model():
    stacked = {"decoder": {"layers": {"ffn": {"experts": {"up_embed": jax.ShapeDtypeStruct((3, 64, 16), "f4")}}}}}
    specs = parallel.partition_specs(stacked)
    assert specs["decoder"]["layers"]["ffn"]["experts"]["up_embed"] == P(None, "expert", None)
    with pytest.raises(ValueError, match=r"leaf 'up_embed' of shape \(64,\) matches partition rule .* at least 2"):
        parallel.partition_specs({"up_embed": jax.ShapeDtypeStruct((64,), "f4")})


def test_shardings_place_n_over_e_rows_on_each_device(seed):
    mesh = cpu_mesh("data=2,expert=4")
    rng = np.random.default_rng(seed)
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), model_state()["params"])
    placed = jax.device_put(variables, parallel.shardings(variables, mesh))
    table = placed["experts"]["up_embed"]
    assert table.sharding == NamedSharding(mesh, P("expert", None))
    assert {shard.data.shape for shard in table.addressable_shards} == {(16, CONFIG.hidden_size)}
    np.testing.assert_array_equal(table, variables["experts"]["up_embed"])
    gate = placed["router"]["router_gate_x"]["kernel"]
    assert gate.sharding.is_fully_replicated


def test_tables_that_do_not_divide_over_the_expert_axis_are_refused():
    params = model_state(CONFIG.replace(num_experts=36))["params"]
    with pytest.raises(ValueError, match=r"leaf 'experts/down_embed' of shape \(36, 16\): dimension 0 \(36\) .* 8"):
        parallel.shardings(params, cpu_mesh("expert=8"))


def test_abstract_state_carries_the_target_shardings():
    state = model_state()
    mesh = cpu_mesh("data=8")
    target = parallel.abstract_state(state, mesh)
    up = target["params"]["experts"]["up_embed"]
    assert up.shape == (64, 16) and up.dtype == jnp.float32
    assert up.sharding == NamedSharding(mesh, P("expert", None))
    assert target["step"].shape == () and target["step"].dtype == jnp.int32


def test_shard_batch_splits_rows_over_data_and_expert():
    mesh = cpu_mesh("data=2,expert=4")
    batch = {"inputs": np.arange(8 * 3).reshape(8, 3), "mask": np.ones(8, bool)}
    placed = parallel.shard_batch(mesh, batch)
    assert placed["inputs"].sharding == NamedSharding(mesh, P(("data", "expert")))
    assert {s.data.shape for s in placed["inputs"].addressable_shards} == {(1, 3)}
    np.testing.assert_array_equal(placed["inputs"], batch["inputs"])
    with pytest.raises(ValueError, match=r"batch leaf \['inputs'\] of local shape \(6, 3\) gives 6 global rows"):
        parallel.shard_batch(mesh, {"inputs": np.zeros((6, 3))})


def test_shard_batch_along_another_axis_and_process_rows(seed):
    mesh = cpu_mesh("data=2,expert=4")
    batch = np.random.default_rng(seed).integers(0, 100, (3, 16, 5))  # [accum, rows, L]: rows are split
    np.testing.assert_array_equal(parallel.process_rows(mesh, 16), np.arange(16))  # one process holds all
    placed = parallel.shard_batch(mesh, batch[:, parallel.process_rows(mesh, 16)], axis=1)
    assert placed.sharding == NamedSharding(mesh, P(None, ("data", "expert")))
    assert {s.data.shape for s in placed.addressable_shards} == {(3, 2, 5)}
    np.testing.assert_array_equal(placed, batch)
    for shard in placed.addressable_shards:  # each device holds the rows its place in the mesh says
        np.testing.assert_array_equal(shard.data, batch[shard.index])
    with pytest.raises(ValueError, match=r"global_rows=12: a batch must have a positive multiple of the 8"):
        parallel.process_rows(mesh, 12)
    with pytest.raises(ValueError, match=r"of local shape \(3, 16, 5\) gives 0 global rows along axis 3"):
        parallel.shard_batch(mesh, batch, axis=3)
    with pytest.raises(ValueError, match="axis=-1 must be a non-negative int"):
        parallel.batch_sharding(mesh, axis=-1)


def test_config_fields_for_expert_parallelism():
    assert CONFIG.expert_axis is None and CONFIG.expert_capacity_factor is None
    config = CONFIG.replace(expert_axis="expert", expert_capacity_factor=1.25)
    assert OmniMoEConfig.from_dict(config.to_dict()) == config
    for changes, match in [
        ({"expert_axis": ""}, "expert_axis='' must be a mesh axis name"),
        ({"expert_axis": 3}, "expert_axis=3 must be a mesh axis name"),
        ({"expert_capacity_factor": 0.0}, "expert_capacity_factor=0.0 must be None or a positive finite number"),
        ({"expert_capacity_factor": float("inf")}, "expert_capacity_factor=inf must be None or a positive"),
        ({"expert_capacity_factor": True}, "expert_capacity_factor=True must be None or a positive"),
    ]:
        with pytest.raises(ValueError, match=match):
            CONFIG.replace(**changes)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("localhost", 2, 0), {}, ValueError, "coordinator_address='localhost' must be 'host:port'"),
        (("localhost:x", 2, 0), {}, ValueError, "must be 'host:port'"),
        (("localhost:1234", 0, 0), {}, ValueError, "num_processes=0 must be >= 1"),
        (("localhost:1234", 2, 2), {}, ValueError, r"process_id=2 must be in \[0, num_processes=2\)"),
        (("localhost:1234", 2, "0"), {}, TypeError, "process_id='0' must be an int"),
        (("localhost:1234", 2, 1), {"local_device_count": 0}, ValueError, "local_device_count=0 must be None or"),
    ],
)
def test_distributed_arguments_are_checked_before_anything_starts(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        parallel.initialize_distributed(*args, **kwargs)
