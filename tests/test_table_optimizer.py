"""The expert tables' own optimisation (TrainConfig's table_* fields, `train.steps.make_optimizer`): which
parameters are tables for every FFN kind, the tables' learning rate and weight decay against the other
parameters', the defaults keeping today's optimizer state, validation, and an exact resume."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec
from test_run_integrity import assert_bitwise_equal, checkpoint_leaves
from test_train_loop import SHRUNK, shrunk_config

from omnimoe_jax import TransformerLM
from omnimoe_jax.ffn_registry import FFN_REGISTRY, has_tables
from omnimoe_jax.parallel import EXPERT_AXIS
from omnimoe_jax.parallel._partition import partition_specs, path_name, table_rules
from train import cli
from train.checkpoint import Checkpoints
from train.config import TrainConfig, apply_overrides, parse_overrides
from train.loop import load_config, run
from train.metrics import read_metrics
from train.presets import get_preset
from train.run_directory import RunDirectoryError
from train.steps import (
    OTHER_GROUP,
    TABLE_GROUP,
    abstract_state,
    learning_rate_schedule,
    make_optimizer,
    table_labels,
    table_learning_rate_multiplier,
    table_learning_rate_schedule,
)


def kind_config(kind: str, *extra: str) -> TrainConfig:
    """The shrunken tiny preset with FFN `kind` (its small_preset at the shrunken width)."""
    common = [arg for arg in SHRUNK if not arg.startswith("--ffn.")]
    return apply_overrides(get_preset("tiny"), parse_overrides([*common, f"--ffn={kind}", *extra]))


def param_shapes(config: TrainConfig):
    tokens = jnp.zeros((1, config.model.context_length), jnp.int32)
    return jax.eval_shape(lambda key: TransformerLM(config.model).init(key, tokens), jax.random.key(0))["params"]


def random_tree(key: jax.Array, shapes) -> dict:
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves, strict=True)]
    )


def by_path(tree) -> dict[str, np.ndarray]:
    return {path_name(p): np.asarray(leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def labels_by_path(shapes) -> dict[str, str]:
    return {path_name(p): label for p, label in jax.tree_util.tree_leaves_with_path(table_labels(shapes))}


def test_the_table_group_exists_only_when_a_table_field_is_set():
    assert not shrunk_config().has_table_group
    for extra in ("--table_learning_rate_multiplier=3", "--table_lr_decay_to_one", "--table_weight_decay=0"):
        assert shrunk_config(extra).has_table_group, extra


def test_table_fields_are_parsed_from_the_command_line():
    config = shrunk_config("--table-learning-rate-multiplier=10", "--table_lr_decay_to_one=true")
    config = apply_overrides(config, parse_overrides(["--table_weight_decay", "0.5"]))
    assert config.table_learning_rate_multiplier == 10.0 and config.table_lr_decay_to_one is True
    assert config.table_weight_decay == 0.5
    assert apply_overrides(config, {"table_weight_decay": "none"}).table_weight_decay is None
    with pytest.raises(ValueError, match="--table_learning_rate_multiplier='fast': expected float"):
        shrunk_config("--table_learning_rate_multiplier=fast")


@pytest.mark.parametrize("kind", list(FFN_REGISTRY))
def test_labels_name_each_kinds_expert_tables(kind):
    """The table group is the kind's declared `table_parameters` in every sparse layer, nothing else
    (tests/test_ffn_registry.py checks those declarations against the modules' parameters)."""
    tables_of_kind = FFN_REGISTRY[kind].table_parameters
    config = kind_config(kind, "--num_layers=2", "--moe_every=2")  # layer_0 dense, layer_1 sparse
    shapes = param_shapes(config)
    if not tables_of_kind:
        with pytest.raises(ValueError, match="the table optimizer group is empty"):
            table_labels(shapes)
        return
    labels = labels_by_path(shapes)
    tables = {path for path, label in labels.items() if label == TABLE_GROUP}
    assert tables == {
        f"layer_1/ffn/{path}" for path in by_path(shapes["layer_1"]["ffn"]) if path.rsplit("/", 1)[-1] in tables_of_kind
    }
    assert len(tables) == len(tables_of_kind) > 0
    assert set(labels.values()) == {TABLE_GROUP, OTHER_GROUP}
    assert labels["embed/embedding"] == OTHER_GROUP  # the token embedding is a table, but not an expert one
    assert labels["layer_0/attention/value/kernel"] == OTHER_GROUP


KINDS_WITHOUT_TABLES = [kind for kind in FFN_REGISTRY if not has_tables(kind)]
TABLE_SETTINGS = {"table_learning_rate_multiplier": 3.0, "table_lr_decay_to_one": True, "table_weight_decay": 0.0}


@pytest.mark.parametrize("field", list(TABLE_SETTINGS))
@pytest.mark.parametrize("kind", KINDS_WITHOUT_TABLES)
def test_table_settings_are_refused_for_a_model_without_tables(kind, field):
    """The config refuses them, naming the field and the kind, before any model exists."""
    value = TABLE_SETTINGS[field]
    message = rf"^{field}={value!r}: ffn='{kind}' has no expert tables to optimise \(the kinds with tables: omnimoe,"
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(kind_config(kind), **{field: value})
    text = "true" if value is True else str(value)
    with pytest.raises(ValueError, match=message):  # the command line's overrides build the same config
        kind_config(kind, f"--{field}={text}")


def test_the_sparse_layers_kind_decides_whether_table_settings_apply(capsys):
    """With moe_every > 1 the other layers are dense SwiGLUs: the sparse layers' kind is what has tables."""
    assert kind_config("pkm", "--num_layers=2", "--moe_every=2", "--table_weight_decay=0").has_table_group
    dense_every_other = kind_config("gshard", "--num_layers=2", "--moe_every=2")
    with pytest.raises(
        ValueError, match=r"^table_learning_rate_multiplier=3\.0, table_weight_decay=0\.0: ffn='gshard'"
    ):
        dataclasses.replace(dense_every_other, table_learning_rate_multiplier=3.0, table_weight_decay=0.0)
    with pytest.raises(SystemExit):  # the command line refuses it before loading data or compiling
        cli.main(["--ffn=dense", "--table_weight_decay=0", "--print-config"])
    assert "table_weight_decay=0.0: ffn='dense' has no expert tables" in capsys.readouterr().err
    assert cli.main(["--ffn=pkm", "--table_weight_decay=0", "--print-config"]) == 0
    assert '"table_weight_decay": 0.0' in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["omnimoe", "pkm"])
def test_a_table_multiplier_scales_only_the_tables_first_update(kind, key):
    """Adam's first step at the peak learning rate (no warm-up): each update is -lr (g / (|g| + eps) + wd p),
    so the tables' is m times the m = 1 optimizer's and every other parameter's is the same, bit for bit."""
    base = kind_config(kind, "--warmup_steps=0")
    shapes = param_shapes(base)
    params = random_tree(jax.random.fold_in(key, 0), shapes)
    grads = random_tree(jax.random.fold_in(key, 1), shapes)  # global norm >> 1: clipped the same in both
    updates = {}
    for multiplier in (1.0, 3.0):
        optimizer = make_optimizer(dataclasses.replace(base, table_learning_rate_multiplier=multiplier))
        update, _ = optimizer.update(grads, optimizer.init(params), params)
        updates[multiplier] = by_path(update)
    tables = {path for path, label in labels_by_path(shapes).items() if label == TABLE_GROUP}
    assert tables
    for path, once in updates[1.0].items():
        thrice = updates[3.0][path]
        if path in tables:
            assert np.all(once != 0)
            np.testing.assert_allclose(thrice, 3 * once, rtol=1e-6, err_msg=path)
        else:
            np.testing.assert_array_equal(thrice, once, err_msg=path)


def test_the_decayed_multiplier_runs_from_m_at_step_0_to_1_at_the_last_step():
    config = shrunk_config("--table_learning_rate_multiplier=4", "--table_lr_decay_to_one", "--steps=11")
    multiplier = table_learning_rate_multiplier(config)
    assert float(multiplier(0)) == 4.0
    assert float(multiplier(5)) == pytest.approx(2.5)  # halfway through the 10 steps from 0 to 10
    assert float(multiplier(10)) == 1.0  # the last update, step steps - 1
    values = [float(multiplier(step)) for step in range(11)]
    assert values == sorted(values, reverse=True)
    base, table = learning_rate_schedule(config), table_learning_rate_schedule(config)
    for step in (0, 1, 3, 7, 10):
        assert float(table(step)) == pytest.approx(float(base(step)) * values[step], rel=1e-6)
    constant = table_learning_rate_multiplier(dataclasses.replace(config, table_lr_decay_to_one=False))
    assert [float(constant(step)) for step in (0, 5, 10)] == [4.0, 4.0, 4.0]
    one_step = dataclasses.replace(config, steps=1, warmup_steps=0)  # its only update keeps the multiplier
    assert float(table_learning_rate_multiplier(one_step)(0)) == 4.0


def test_table_weight_decay_applies_to_the_tables_only(key):
    """With zero gradients Adam's step is 0 and the update is the decay alone: -lr wd p, with the tables'
    table_weight_decay and every other matrix's weight_decay (norm scales: none)."""
    config = kind_config("omnimoe", "--warmup_steps=0", "--weight_decay=0.1", "--table_weight_decay=0.5")
    shapes = param_shapes(config)
    params = random_tree(key, shapes)
    zeros = jax.tree.map(jnp.zeros_like, params)
    optimizer = make_optimizer(config)
    updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    labels = labels_by_path(shapes)
    lr = config.learning_rate
    for path, update in by_path(updates).items():
        param = by_path(params)[path]
        decay = 0.5 if labels[path] == TABLE_GROUP else (0.1 if param.ndim >= 2 else 0.0)
        np.testing.assert_allclose(update, -lr * decay * param, rtol=1e-6, atol=0, err_msg=path)
    # table_weight_decay=None: the tables decay with weight_decay, as before.
    assert dataclasses.replace(config, table_weight_decay=None).has_table_group is False


def test_default_table_fields_keep_todays_optimizer_state(key):
    """The default config's optimizer is exactly the one checkpoints were saved with before the table fields
    existed: clipping then one AdamW over every parameter (no partition), the same state tree and updates."""
    config = shrunk_config("--warmup_steps=0")
    shapes = param_shapes(config)
    params, grads = random_tree(jax.random.fold_in(key, 0), shapes), random_tree(jax.random.fold_in(key, 1), shapes)
    todays = optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(
            learning_rate_schedule(config),
            b1=config.beta1,
            b2=config.beta2,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
            mask=lambda tree: jax.tree.map(lambda p: p.ndim >= 2, tree),
        ),
    )
    optimizer = make_optimizer(config)
    state, today_state = optimizer.init(params), todays.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(today_state)
    for _ in range(2):
        update, state = optimizer.update(grads, state, params)
        today_update, today_state = todays.update(grads, today_state, params)
        assert_bitwise_equal(by_path((update, state)), by_path((today_update, today_state)))

    # ...and the train state a checkpoint restores into is the same whatever the table fields' defaults.
    def partition_states(opt_state) -> list:
        nodes = jax.tree.leaves(opt_state, is_leaf=lambda node: isinstance(node, optax.PartitionState))
        return [node for node in nodes if isinstance(node, optax.PartitionState)]

    assert jax.tree.structure(abstract_state(config).opt_state) == jax.tree.structure(today_state)
    assert not partition_states(abstract_state(config).opt_state)
    partitioned = abstract_state(dataclasses.replace(config, table_learning_rate_multiplier=3.0))
    assert [set(node.inner_states) for node in partition_states(partitioned.opt_state)] == [{"table", "other"}]


def test_a_config_json_without_the_table_fields_loads_with_their_defaults():
    config = shrunk_config()
    stored = config.to_dict()
    for field in ("table_learning_rate_multiplier", "table_lr_decay_to_one", "table_weight_decay"):
        del stored[field]
    assert TrainConfig.from_dict(stored) == config


@pytest.mark.parametrize(
    ("layout", "table_spec"), [("rows", PartitionSpec(EXPERT_AXIS, None)), ("hidden", PartitionSpec(None, EXPERT_AXIS))]
)
def test_table_moments_are_sharded_like_the_tables(layout, table_spec):
    """On a mesh the partitioned AdamW's moments of the tables are sharded over the expert axis as the tables
    are, by rows or by columns (the partition rules match the path's last name)."""
    config = shrunk_config("--table_learning_rate_multiplier=3")
    specs = jax.tree_util.tree_leaves_with_path(
        partition_specs(abstract_state(config).opt_state, table_rules(layout)),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    sharded = [path_name(path) for path, spec in specs if spec == table_spec]
    # mu and nu of up_embed and down_embed in each of the 2 layers
    assert len(sharded) == 2 * 2 * 2 and all("/table/" in path for path in sharded), sharded


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("table_learning_rate_multiplier", 0),
        ("table_learning_rate_multiplier", 0.0),
        ("table_learning_rate_multiplier", -3.0),
        ("table_learning_rate_multiplier", math.nan),
        ("table_learning_rate_multiplier", math.inf),
        ("table_learning_rate_multiplier", True),
        ("table_learning_rate_multiplier", "3"),
        ("table_learning_rate_multiplier", None),
        ("table_lr_decay_to_one", 1),
        ("table_lr_decay_to_one", "yes"),
        ("table_lr_decay_to_one", None),
        ("table_weight_decay", -0.1),
        ("table_weight_decay", math.nan),
        ("table_weight_decay", math.inf),
        ("table_weight_decay", False),
        ("table_weight_decay", "0.1"),
    ],
)
def test_bad_table_fields_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}="):
        dataclasses.replace(shrunk_config(), **{field: value})


def test_a_table_multiplier_run_resumes_bit_exactly(tmp_path, small_corpus, seed, capsys):
    config = shrunk_config(f"--data={small_corpus}", f"--seed={seed % 2**16}", "--table_learning_rate_multiplier=3")
    straight, split = tmp_path / "straight", tmp_path / "split"
    lines = []
    assert run(config, straight, log=lines.append)["step"] == 10
    step_lines = [line for line in lines if line.startswith("step ")]
    assert step_lines and all(" | tables lr " in line for line in step_lines), step_lines
    assert run(config, split, stop_at_step=5, log=print)["reason"] == "stop_at_step"
    # Another table setting would make the rest of the run another run's: refused, by the command line ...
    for other in ("--table_learning_rate_multiplier=1", "--table_weight_decay=0"):
        with pytest.raises(SystemExit):
            cli.main(["--run-dir", str(split), "--resume", other])
        assert f"not ['{other[2:].split('=')[0]}'] (to change those, start a new run)" in capsys.readouterr().err
    # ... and by the loop.
    with pytest.raises(RunDirectoryError, match=r"another config \(table_learning_rate_multiplier differ\)"):
        run(dataclasses.replace(config, table_learning_rate_multiplier=1.0), split, resume=True, log=print)
    assert cli.main(["--run-dir", str(split), "--resume"]) == 0
    assert load_config(split) == config
    assert Checkpoints(split).all_steps() == [5, 10]
    leaves = [checkpoint_leaves(run_dir, 10, config) for run_dir in (straight, split)]
    assert_bitwise_equal(*leaves)  # params, both groups' AdamW moments and counts, batch_stats
    assert any("['table']" in path for path in leaves[0])  # keystr paths: the table group's state is there
    records = [[r for r in read_metrics(d) if r["kind"] == "train"] for d in (straight, split)]
    assert [r["loss"] for r in records[0]] == [r["loss"] for r in records[1]]
    for record in records[0]:
        assert record["table_learning_rate"] == pytest.approx(3 * record["learning_rate"], rel=1e-6)
