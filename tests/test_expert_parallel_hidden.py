"""Expert tables sharded on the hidden dimension (`expert_parallel_layout="hidden"`, 8 CPU devices): the
sharded layer equals the one-device layer, forward and every gradient, on several mesh shapes; the Pallas
kernels run on each shard's column slice; "auto" follows its rule; the tables and their optimizer moments
shard by columns; the traffic of the compiled step does not grow with N and grows with T; `python -m train`
trains with either layout and resumes a run onto the other."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_close, assert_trees_close, count_triton_calls, cpu_mesh, lower_for_cuda
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from test_expert_parallel import decisive_variables, forward_and_gradients, layer_config, reference_step
from test_train_parallel import ALL_STEPS, MESH, arguments, assert_same_training, records

from omnimoe_jax import FlashMoEConfig, OmniMoE, OmniMoEConfig, parallel
from pallas_kernels import omni_expert_reference
from train import cli
from train import mesh as train_mesh
from train.loop import load_config, run
from train.steps import build_steps

MESHES = ["expert=8", "data=2,expert=4", "data=4,expert=2"]
__all__ = ["arguments"]  # test_train_parallel's fixture: the tiny model, corpus and seed of every run here
HIDDEN = P(None, "expert")


def hidden_config(**changes):
    return layer_config(expert_parallel_layout="hidden", **changes)


@pytest.mark.parametrize("spec", MESHES)
def test_hidden_layer_matches_the_single_device_layer(spec, seed):
    config = hidden_config()
    variables, x = decisive_variables(seed, config, 64, train=True)
    cotangent = np.random.default_rng(seed + 1).standard_normal(x.shape).astype(np.float32)
    y_ref, d_params_ref, d_x_ref, updates_ref = reference_step(config, variables, x, cotangent)

    mesh = cpu_mesh(spec)
    with jax.set_mesh(mesh):
        batch = parallel.batch_sharding(mesh)
        variables = jax.device_put(variables, parallel.shardings(variables, mesh, parallel.table_rules("hidden")))
        x, cotangent = jax.device_put((x, cotangent), batch)
        step = jax.jit(forward_and_gradients, static_argnums=0).lower(config, variables, x, cotangent).compile()
        y, d_params, d_x, updates = step(variables, x, cotangent)

    # The columns of the tokens went out and came back (no row dispatch), and the tables' gradients stayed
    # column-sharded.
    exchanged = parallel.collective_bytes(step.as_text())
    shards = mesh.shape["expert"]
    payload = parallel.hidden_payload_bytes(shards, x.shape[0] // mesh.size, 6, config.hidden_size, jnp.float32)
    assert exchanged["all-to-all"] == payload["all_to_all"]
    assert exchanged["all-gather"] == payload["all_gather"]
    assert y.sharding.is_equivalent_to(batch, y.ndim)
    for table in ("up_embed", "down_embed"):
        assert d_params["experts"][table].sharding.is_equivalent_to(NamedSharding(mesh, HIDDEN), 2)
    assert_close(y, y_ref, jnp.float32)
    assert_close(d_x, d_x_ref, jnp.float32, what="d x")
    assert_trees_close(d_params, d_params_ref, jnp.float32, what="d ")
    assert_trees_close(updates["batch_stats"], updates_ref["batch_stats"], jnp.float32)
    assert int(sum(jax.tree.leaves(updates["intermediates"]))) == 0


def random_op_inputs(seed, tokens, experts, d, top_k):
    """x, up, down, cotangent, weights and indices with repeated experts within tokens and unused experts."""
    rng = np.random.default_rng(seed)
    shapes = [(tokens, d), (experts, d), (experts, d), (tokens, d)]
    x, up, down, cotangent = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes)
    weights = jnp.asarray(rng.uniform(0.1, 1.0, (tokens, top_k)), jnp.float32)
    indices = rng.integers(0, experts, (tokens, top_k), dtype=np.int32)
    indices[::2] = np.arange(top_k) % 3  # repeats within a token; most experts unused by half the tokens
    return x, up, down, cotangent, weights, jnp.asarray(indices)


def op_outputs(op, x, up, down, weights, indices, cotangent):
    y, pullback = jax.vjp(lambda *a: op(*a, indices), x, up, down, weights)
    return y, pullback(cotangent)


def hidden_op(mesh, **options):
    def op(x, up, down, weights, indices):
        y, _ = parallel.hidden_parallel_omni_expert(
            x, up, down, weights, indices, mesh=mesh, expert_axis="expert", **options
        )
        return y

    return op


@pytest.mark.parametrize(
    ("spec", "implementation", "d"),
    [("data=4,expert=2", "xla", 24), ("data=2,expert=4", "pallas", 64)],  # pallas: 16-column slices
)
def test_hidden_op_matches_the_reference_with_gradients(spec, implementation, d, seed):
    mesh = cpu_mesh(spec)
    x, up, down, cotangent, weights, indices = random_op_inputs(seed, 32, 16, d, 5)
    want = jax.jit(op_outputs, static_argnums=0)(omni_expert_reference, x, up, down, weights, indices, cotangent)
    with jax.set_mesh(mesh):
        got = jax.jit(op_outputs, static_argnums=0)(
            hidden_op(mesh, implementation=implementation), x, up, down, weights, indices, cotangent
        )
    assert_close(got[0], want[0], jnp.float32)
    for name, grad, ref in zip(("x", "up", "down", "weights"), got[1], want[1], strict=True):
        assert_close(grad, ref, jnp.float32, what=f"d {name}")


def test_hidden_op_with_pallas_kernels_lowers_for_cuda():
    mesh = AbstractMesh((2, 4), ("data", "expert"), axis_types=(AxisType.Auto, AxisType.Auto))
    op = hidden_op(mesh, implementation="pallas", interpret=False)
    tokens, d, experts, top_k = 256, 128, 1024, 8
    shapes = [((tokens, d), jnp.bfloat16), ((experts, d), jnp.bfloat16), ((experts, d), jnp.bfloat16)]
    shapes += [((tokens, top_k), jnp.float32), ((tokens, top_k), jnp.int32)]
    args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]

    def loss(*args):
        return jnp.sum(jnp.square(op(*args).astype(jnp.float32)))

    with jax.sharding.use_abstract_mesh(mesh):
        text = lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2, 3)), *args).as_text()
    # Forward: row_dots' pair_dots, embedding_bag's token_combine. Backward: embedding_bag's segment sum
    # (blocks, fix-up, untouched rows) with the dots, row_dots' token_combine and segment sum (3).
    assert count_triton_calls(text) == 9
    # x's and y's columns, and their cotangents; the routing gathered, s and ds summed.
    assert text.count("all_to_all") == 4 and "all_gather" in text and "all_reduce" in text


def test_hidden_width_must_split_into_kernel_slices():
    mesh = cpu_mesh("data=2,expert=4")

    def arrays(d, tokens=16, experts=16, top_k=2):
        shapes = [((tokens, d), "f4"), ((experts, d), "f4"), ((experts, d), "f4"), ((tokens, top_k), "f4")]
        return [jax.ShapeDtypeStruct(s, t) for s, t in shapes] + [jax.ShapeDtypeStruct((tokens, top_k), "i4")]

    with pytest.raises(ValueError, match=r'layout="hidden" .* d=32 over an expert axis of 4 devices gives 8-column'):
        jax.eval_shape(hidden_op(mesh, implementation="pallas"), *arrays(32))
    with pytest.raises(ValueError, match=r"hidden_size d=30 into columns over the 4 devices .* a multiple of 4"):
        jax.eval_shape(hidden_op(mesh, implementation="xla"), *arrays(30))
    jax.eval_shape(hidden_op(mesh, implementation="xla"), *arrays(32))  # XLA takes any slice width
    with pytest.raises(ValueError, match=r"splits its 12 tokens over the 8 devices"):
        jax.eval_shape(hidden_op(mesh, implementation="xla"), *arrays(32, tokens=12))
    # The whole layer says the same, naming the layout.
    config = hidden_config(hidden_size=32, implementation="pallas")
    tokens = jax.ShapeDtypeStruct((16, 32), "f4")
    variables = jax.eval_shape(OmniMoE(config).init, jax.random.key(0), tokens)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r'expert_parallel_layout="hidden" .* 8-column'):
        jax.eval_shape(OmniMoE(config).apply, variables, tokens)


def test_layout_field_is_validated_and_old_configs_load_as_rows():
    assert layer_config().expert_parallel_layout == "rows"
    for cls, fields in [
        (OmniMoEConfig, dict(hidden_size=16, intermediate_size=16, num_experts=16, num_experts_per_token=2)),
        (
            FlashMoEConfig,
            dict(hidden_size=16, intermediate_size=16, hidden_act="silu", num_experts=16, num_experts_per_tok=2),
        ),
    ]:
        config = cls(**fields, expert_parallel_layout="hidden")
        assert cls.from_dict(config.to_dict()) == config
        stored = config.to_dict()
        del stored["expert_parallel_layout"]  # a config serialised before the field existed
        assert cls.from_dict(stored).expert_parallel_layout == "rows"
        for bad in ("columns", None, 1):
            with pytest.raises(ValueError, match=rf"expert_parallel_layout={bad!r} must be one of \('rows', 'hidden'"):
                cls(**fields, expert_parallel_layout=bad)


def traffic(layout, **sizes):
    return parallel.layout_traffic_bytes(layout, **sizes)


@pytest.mark.parametrize(
    ("hidden", "top_k", "shards", "dtype", "want"),
    [
        (512, 32, 4, jnp.bfloat16, "hidden"),  # the small preset: d b (E - 1) = 3072 > K (E + 1) = 160
        (512, 1280, 4, jnp.bfloat16, "rows"),  # small-omnimoe's K = 5d/2: 3072 < 6400
        (64, 48, 2, jnp.float32, "hidden"),  # 256 > 144
        (64, 96, 2, jnp.float32, "rows"),  # 256 < 288
        (64, 32, 1, jnp.float32, "rows"),  # one expert shard: nothing moves, today's layout
    ],
)
def test_auto_picks_the_layout_that_moves_fewer_bytes(hidden, top_k, shards, dtype, want):
    sizes = dict(local_tokens=256, top_k=top_k, num_shards=shards, hidden=hidden, token_dtype=dtype)
    got = parallel.choose_table_layout("auto", num_experts=4096, **sizes)
    assert got == want
    if shards > 1:  # the rule of the docstring is the bytes comparison
        itemsize = jnp.dtype(dtype).itemsize
        assert (traffic("hidden", **sizes) < traffic("rows", **sizes)) == (want == "hidden")
        assert (hidden * itemsize * (shards - 1) > top_k * (shards + 1)) == (want == "hidden")
    for fixed in ("rows", "hidden"):
        assert parallel.choose_table_layout(fixed, num_experts=4096, **sizes) == fixed


def test_auto_never_picks_a_layout_that_cannot_split_the_tables():
    sizes = dict(local_tokens=64, top_k=4, num_shards=4, token_dtype=jnp.float32)
    assert parallel.choose_table_layout("auto", num_experts=4096, hidden=256, **sizes) == "hidden"
    assert parallel.choose_table_layout("auto", num_experts=4096, hidden=40, **sizes) == "rows"  # 10 columns
    assert parallel.choose_table_layout("auto", num_experts=36, hidden=256, **sizes) == "hidden"  # 36 rows / 4
    with pytest.raises(ValueError, match=r"expert_parallel_layout='cols' must be one of \('rows', 'hidden', 'auto'\)"):
        parallel.choose_table_layout("cols", num_experts=4096, hidden=256, **sizes)


def test_a_capacity_factor_keeps_the_row_layout():
    # The factor caps the row dispatch; the hidden layout computes every pair and would silently ignore it.
    sizes = dict(top_k=8, local_tokens=64, num_shards=4, token_dtype=jnp.bfloat16)
    assert parallel.choose_table_layout("auto", num_experts=4096, hidden=256, **sizes) == "hidden"
    assert parallel.choose_table_layout("auto", num_experts=4096, hidden=256, capacity_factor=1.0, **sizes) == "rows"
    with pytest.raises(ValueError, match="rows do not divide over the 4 expert shards"):
        parallel.choose_table_layout("auto", num_experts=25, hidden=256, capacity_factor=1.0, **sizes)
    with pytest.raises(ValueError, match=r"expert_capacity_factor=1.0 caps the row layout's dispatch"):
        OmniMoEConfig(64, 128, 64, 8, expert_parallel_layout="hidden", expert_capacity_factor=1.0)
    OmniMoEConfig(64, 128, 64, 8, expert_parallel_layout="auto", expert_capacity_factor=1.0)  # auto takes rows


def test_auto_layer_runs_the_layout_the_rule_picks():
    mesh = cpu_mesh("data=2,expert=4")
    # d = 64 in f32 over E = 4: d b (E - 1) = 768 against K (E + 1) = 10 and 800.
    for top_k, want in [(2, "hidden"), (160, "rows")]:
        config = layer_config(hidden_size=64, num_experts=256, num_experts_per_token=top_k)
        config = config.replace(expert_parallel_layout="auto")
        assert parallel.config_table_layout(config, local_tokens=8, num_shards=4) == want
        x = jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=parallel.batch_sharding(mesh))
        variables = jax.eval_shape(OmniMoE(config).init, jax.random.key(0), jax.ShapeDtypeStruct((64, 64), "f4"))
        with jax.set_mesh(mesh):
            text = jax.jit(OmniMoE(config).apply).lower(variables, x).compile().as_text()
        exchanged = parallel.collective_bytes(text)
        # The hidden layout gathers the group's routing; the row layout gathers nothing.
        if want == "hidden":
            payload = parallel.hidden_payload_bytes(4, 8, top_k, 64, jnp.float32)
            assert exchanged["all-gather"] == payload["all_gather"] > 0
        else:
            assert exchanged["all-gather"] == 0 and exchanged["all-to-all"] > 0


def model_state(config, tokens=16):
    """Abstract variables of one layer and the AdamW state of its params."""
    variables = jax.eval_shape(OmniMoE(config).init, jax.random.key(0), jnp.zeros((tokens, config.hidden_size)))
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, variables["params"])
    return {**variables, "opt_state": opt_state, "step": 0}


def test_hidden_rules_shard_tables_and_their_optimizer_moments_by_columns(seed):
    config = hidden_config(hidden_size=32)
    state = model_state(config)
    specs = parallel.partition_specs(state, parallel.table_rules("hidden"))
    flat = {parallel.path_name(path): spec for path, spec in jax.tree_util.tree_leaves_with_path(specs)}
    tables = sorted(name for name, spec in flat.items() if spec == HIDDEN)
    assert tables == [
        f"{prefix}experts/{table}"
        for prefix in ("opt_state/0/mu/", "opt_state/0/nu/", "params/")
        for table in ("down_embed", "up_embed")
    ]
    assert all(spec == P() for name, spec in flat.items() if name not in tables)
    assert parallel.table_rules("rows") == parallel.DEFAULT_RULES
    with pytest.raises(ValueError, match=r"layout='auto' must be one of \('rows', 'hidden'\) \(resolve 'auto'"):
        parallel.table_rules("auto")
    # Placed on a mesh: each device holds N rows of d/E columns, and the moments alike.
    mesh = cpu_mesh("data=2,expert=4")
    rng = np.random.default_rng(seed)
    concrete = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), state["opt_state"][0].mu)
    placed = jax.device_put(concrete, parallel.shardings(concrete, mesh, parallel.table_rules("hidden")))
    table = placed["experts"]["up_embed"]
    assert {shard.data.shape for shard in table.addressable_shards} == {(config.num_experts, 8)}
    np.testing.assert_array_equal(table, concrete["experts"]["up_embed"])


@pytest.mark.parametrize("spec", ["expert=8", "data=2,expert=4"])
def test_hidden_traffic_is_what_the_shapes_say_flat_in_n_and_growing_with_t(spec):
    mesh = cpu_mesh(spec)
    shards, data = mesh.shape["expert"], mesh.shape["data"]
    d, top_k = 32, 6
    measured = {}
    for tokens in (64, 128):
        for experts in (4096, 65536):
            shapes = [((tokens, d), jnp.float32), ((experts, d), jnp.float32), ((experts, d), jnp.float32)]
            shapes += [((tokens, top_k), jnp.float32), ((tokens, top_k), jnp.int32)]
            args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]

            def loss(x, up, down, weights, indices):
                y, _ = parallel.hidden_parallel_omni_expert(
                    x, up, down, weights, indices, mesh=mesh, expert_axis="expert", implementation="xla"
                )
                return jnp.sum(y * y)

            with jax.set_mesh(mesh):
                step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
                got = parallel.collective_bytes(step.lower(*args).compile().as_text())
            # With a data axis the tables' gradients are also summed over it (2 tables of [N, d/E] f32):
            # the data-parallel all-reduce that grows with N in any layout, counted apart.
            got["all-reduce"] -= (2 * experts * d // shards * 4) if data > 1 else 0
            measured[tokens, experts] = got
    for tokens in (64, 128):
        want = parallel.hidden_payload_bytes(shards, tokens // mesh.size, top_k, d, jnp.float32)
        for experts in (4096, 65536):
            got = measured[tokens, experts]
            assert got["all-to-all"] == want["all_to_all"]
            assert got["all-gather"] == want["all_gather"]
            assert got["all-reduce"] == want["all_reduce"]
            assert sum(got.values()) == want["forward_backward"], got
        assert measured[tokens, 4096] == measured[tokens, 65536], "the hidden layout's traffic grew with N"
    assert sum(measured[128, 4096].values()) == 2 * sum(measured[64, 4096].values()), "traffic should grow with T"


# --- training: `python -m train --ffn.expert_parallel_layout=...`, and resumes across layouts ---------------


@pytest.fixture(scope="module")
def rows_run(arguments, tmp_path_factory):
    """The straight run on the mesh with the default row layout (test_train_parallel's tiny model, K = N)."""
    run_dir = tmp_path_factory.mktemp("rows") / "run"
    assert cli.main(["--run-dir", str(run_dir), "--mesh", MESH, *arguments]) == 0
    return run_dir


def with_layout(config, layout):
    ffn = config.model.ffn.replace(expert_parallel_layout=layout)
    return dataclasses.replace(config, model=config.model.replace(ffn=ffn))


@pytest.mark.parametrize(("saved_as", "resumed_as"), [("rows", "hidden"), ("hidden", "rows")])
def test_a_run_resumes_onto_the_other_table_layout(saved_as, resumed_as, rows_run, tmp_path):
    config = with_layout(load_config(rows_run), saved_as)
    mesh = cpu_mesh(MESH)
    steps = build_steps(config, mesh)
    # The train step's state has the layout's table shardings.
    spec = HIDDEN if saved_as == "hidden" else P("expert", None)
    state = jax.eval_shape(steps.init_state, jax.random.key(0))
    shardings = parallel.shardings(state, mesh, train_mesh.partition_rules(config, mesh))
    tables = [
        s for path, s in jax.tree_util.tree_leaves_with_path(shardings) if "up_embed" in jax.tree_util.keystr(path)
    ]
    assert len(tables) == 3 * config.model.num_layers  # the parameter and its two AdamW moments, per layer
    assert all(s.spec == spec for s in tables), [s.spec for s in tables]
    saved = tmp_path / "run"
    assert run(config, saved, stop_at_step=1, mesh=mesh, log=print)["reason"] == "stop_at_step"
    argv = ["--run-dir", str(saved), "--resume", "--mesh", MESH, f"--ffn.expert_parallel_layout={resumed_as}"]
    assert cli.main(argv) == 0  # the real --resume path, onto the other layout
    start = records(saved, "start")[-1]
    assert start["resumed"] is True and start["step"] == 1
    assert start["config"]["model"]["ffn"]["expert_parallel_layout"] == resumed_as
    assert load_config(saved).model.ffn.expert_parallel_layout == resumed_as
    # Steps 2.. continue the straight run (rows throughout) exactly: same losses, same final parameters.
    assert_same_training(saved, rows_run, ALL_STEPS, f"saved as {saved_as}, resumed as {resumed_as}")


def test_train_refuses_what_the_hidden_layout_cannot_take(arguments, tmp_path, capsys):
    for extra, message in [
        (["--ffn.expert_parallel_layout=hidden", "--hidden_size=34", "--num_heads=1"], r"d=34 into columns over the 4"),
        (["--ffn.expert_parallel_layout=hidden", "--ffn.expert_capacity_factor=0.5"], r"caps the row layout's"),
        (["--ffn.expert_parallel_layout=cols"], r"expert_parallel_layout='cols' must be one of"),
    ]:
        run_dir = tmp_path / "run"
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["--run-dir", str(run_dir), "--mesh", MESH, *arguments, *extra])
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err), message
        assert not run_dir.exists()
