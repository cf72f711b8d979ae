"""Presets, TrainConfig validation and the --key=value overrides of `python -m train`."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import pytest

from omnimoe_jax import FlashMoEConfig, OmniMoEConfig
from omnimoe_jax._model import LMConfig, parameter_counts
from omnimoe_jax.baselines import DenseFFNConfig, GShardMoEConfig
from train.config import TrainConfig, apply_overrides, override_keys, parse_overrides
from train.presets import PRESETS, get_preset
from train.steps import abstract_state


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_constructs_abstractly(name):
    config = get_preset(name)
    state = abstract_state(config)  # jax.eval_shape: nothing is allocated, even for `paper`
    params = jax.tree.leaves(state.params)
    assert all(leaf.dtype == jnp.float32 for leaf in params)
    # AdamW keeps two moments per parameter, in the parameters' dtype.
    moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.shape != ()]
    assert sum(leaf.size for leaf in moments) == 2 * sum(leaf.size for leaf in params)
    normalised = config.model.ffn_kind in (
        "omnimoe",
        "flashmoe",
        "peer",
        "pkm",
    )  # BatchNorm in the router, queries, inputs
    assert len(state.batch_stats) == (len(config.model.sparse_layers) if normalised else 0)


def test_preset_sizes_match_their_descriptions():
    assert get_preset("tiny").model.dtype == jnp.float32  # CPU preset
    for name in ("small", "base", "paper"):
        assert get_preset(name).model.dtype == jnp.bfloat16
    active = parameter_counts(get_preset("base").model)["active"]
    assert 115e6 < active < 135e6, active  # "~125M active"
    paper = get_preset("paper").model
    assert (paper.hidden_size, paper.ffn.num_experts, paper.ffn.num_experts_per_token, paper.ffn.intermediate_size) == (
        1024,
        320 * 320,
        512,
        1024,
    )
    with pytest.raises(ValueError, match="preset='huge'"):
        get_preset("huge")


def test_overrides_apply_by_field_type():
    base = get_preset("tiny")
    args = [
        "--steps=7",
        "--warmup_steps=2",
        "--learning-rate",
        "3e-4",
        "--tie_embeddings=false",
        "--hidden_size=64",
        "--dtype=bfloat16",
        "--data",
        "corpus/",
        "--ffn=dense",
    ]
    config = apply_overrides(base, parse_overrides(args))
    assert config.steps == 7 and isinstance(config.steps, int)
    assert config.learning_rate == 3e-4
    assert config.model.tie_embeddings is False
    assert config.model.hidden_size == 64
    assert config.model.dtype == jnp.bfloat16
    assert config.data == "corpus/"
    assert config.model.ffn_kind == "dense"
    # Everything not overridden is the preset's.
    assert config.batch_size == base.batch_size and config.model.num_layers == base.model.num_layers
    assert apply_overrides(config, {"data": "none"}).data is None


def test_unknown_keys_are_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="unknown config keys \\['depth'\\]") as err:
        apply_overrides(get_preset("tiny"), {"depth": "3"})
    for key in ("steps", "hidden_size", "num_experts", "data"):
        assert key in str(err.value)
    assert "model" not in override_keys()  # the nested config is reached through its own fields


def test_typos_get_a_suggestion():
    with pytest.raises(ValueError, match=re.escape("unknown config keys ['stpes']; --stpes: did you mean --steps")):
        apply_overrides(get_preset("tiny"), parse_overrides(["--stpes=10"]))
    with pytest.raises(ValueError, match="--run_dir is written --run-dir"):
        apply_overrides(get_preset("tiny"), parse_overrides(["--run_dir", "/tmp/x"]))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # The flat and <kind>.<field> keys of earlier versions point at their dotted path.
        (["--num_experts=64"], "unknown config keys ['num_experts']; --num_experts: did you mean --ffn.num_experts?"),
        (["--gshard.num_experts=4"], "--gshard.num_experts: did you mean --ffn=gshard --ffn.num_experts?"),
        (["--ffn.num_expert=64"], "--ffn.num_expert: did you mean --ffn.num_experts"),
        (["--ffn.hidden_size=64"], "every FFN of the model has the model's hidden_size: did you mean --hidden_size?"),
        (
            ["--ffn.num_heads=4"],
            "--ffn.num_heads is not a field of ffn='omnimoe' (did you mean --ffn.num_experts? it is one of peer, "
            "pkm: add --ffn=peer)",
        ),
        (
            ["--ffn=pkm", "--ffn.num_experts=64"],
            "--ffn.num_experts is not a field of ffn='pkm' (did you mean --ffn.num_heads? it is one of omnimoe,",
        ),
        (["--ffn=switch"], "--ffn='switch' must be one of omnimoe, dense, flashmoe, gshard, deepseekmoe, peer, pkm"),
        (
            ["--ffn=gshard", "--ffn.num_experts_per_token=20"],
            "ffn='gshard': num_experts_per_token=20 must be <= num_experts=16",
        ),
    ],
)
def test_ffn_paths_are_refused_with_the_nearest_valid_one(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        apply_overrides(get_preset("tiny"), parse_overrides(args))


def test_ffn_overrides_set_the_kinds_own_fields():
    tiny = get_preset("tiny")
    config = apply_overrides(tiny, parse_overrides(["--ffn.num_experts=64", "--ffn.num_experts_per_token=4"]))
    assert (config.model.ffn.num_experts, config.model.ffn.num_experts_per_token) == (64, 4)
    assert config.model.ffn.intermediate_size == tiny.model.ffn.intermediate_size  # the rest is the preset's
    # A new kind starts from its small preset at the model's width (here after --hidden_size, in any order),
    # and validates only its own fields: 6 experts is no square, which GShard does not need.
    args = ["--ffn=gshard", "--ffn.num_experts=6", "--hidden_size=32", "--ffn.capacity_factor=2"]
    gshard = apply_overrides(tiny, parse_overrides(args)).model.ffn
    assert gshard == GShardMoEConfig(32, 6, 64, capacity_factor=2.0)
    # --ffn naming the model's kind keeps its config.
    assert apply_overrides(tiny, {"ffn": "omnimoe"}).model == tiny.model


def test_a_bare_bool_flag_is_true_and_never_swallows_the_next_flag():
    config = apply_overrides(get_preset("tiny"), parse_overrides(["--ffn.norm_topk_prob", "--steps", "500"]))
    assert config.model.ffn.norm_topk_prob is True and config.steps == 500
    with pytest.raises(ValueError, match=re.escape("--data needs a value")):
        apply_overrides(get_preset("tiny"), parse_overrides(["--data", "--steps=10"]))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps=ten"], "--steps='ten': expected int"),
        (["--tie_embeddings=maybe"], "expected a bool"),
        (["--steps"], "needs a value"),
        (["steps=3"], "expected --key=value"),
        (["--batch_size=30", "--grad_accum=4"], "batch_size=30 must be a multiple of grad_accum=4"),
        (["--grad_accum=0"], "grad_accum=0 must be a positive int or 'auto'"),
        (["--grad_accum=-2"], "grad_accum=-2 must be a positive int or 'auto'"),
        (["--grad_accum=2.5"], "grad_accum='2.5' must be a positive int or 'auto'"),
        (["--grad_accum=Auto"], "grad_accum='Auto' must be a positive int or 'auto'"),
        (["--grad_accum"], "--grad_accum needs a value"),
        (["--warmup_steps=400", "--steps=400"], "warmup_steps"),
        (["--learning_rate=0"], "learning_rate"),
        (["--ffn.num_experts=1000"], "num_experts=1000 must be a perfect square"),
        (["--val_fraction=1"], "val_fraction"),
        (["--token_dtype=int64"], "token_dtype"),
        # Non-finite hyperparameters train nothing but NaNs: refused like every other bad field.
        (["--learning_rate=inf"], "learning_rate=inf must be a finite number > 0"),
        (["--learning_rate=nan"], "learning_rate=nan must be a finite number > 0"),
        (["--weight_decay=inf"], "weight_decay=inf must be a finite number >= 0"),
        (["--adam_eps=inf"], "adam_eps=inf must be a finite number > 0"),
        (["--grad_clip=inf"], "grad_clip=inf must be a finite number >= 0"),
        (["--time_limit_minutes=inf"], "time_limit_minutes=inf must be a finite number >= 0"),
        (["--norm_eps=inf"], "norm_eps=inf must be a positive finite number"),
        (["--ffn.router_norm_eps=inf"], "router_norm_eps=inf must be a positive finite number"),
        (["--seed=1e20"], "--seed='1e20': expected int"),
        # jax.random.key keeps 32 bits: 2**32 would be seed 0 again
        ([f"--seed={2**32}"], f"seed={2**32} must be an int in [0, {2**32 - 1}]"),
        ([f"--seed={10**20}"], f"seed={10**20} must be an int in [0, {2**32 - 1}]"),
    ],
)
def test_bad_overrides_raise_naming_the_key(args, message):
    with pytest.raises(ValueError, match=message.replace("[", "\\[").replace("(", "\\(")):
        apply_overrides(get_preset("tiny"), parse_overrides(args))


def test_config_round_trips_through_dict():
    config = apply_overrides(get_preset("small"), {"data": "x.txt", "grad_accum": "2"})
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({**config.to_dict(), "epochs": 2})


def test_grad_accum_is_a_positive_int_or_auto():
    tiny = get_preset("tiny")
    auto = apply_overrides(tiny, parse_overrides(["--grad_accum=auto", "--batch_size=30"]))
    assert auto.grad_accum == "auto"  # no multiple of batch_size to check until train.memory resolves it
    assert TrainConfig.from_dict(json.loads(json.dumps(auto.to_dict()))) == auto  # config files hold "auto"
    assert apply_overrides(tiny, parse_overrides(["--grad_accum=4"])).grad_accum == 4  # an int, not "4"
    with pytest.raises(ValueError, match="no micro-batch size until"):
        auto.micro_batch_size  # noqa: B018
    for bad in (True, 2.0, "4", None, 0):
        with pytest.raises(ValueError, match=re.escape(f"grad_accum={bad!r} must be a positive int or 'auto'")):
            dataclasses.replace(tiny, grad_accum=bad)
    assert get_preset("small-pkm").grad_accum == "auto"  # PKM's "xla" path gathers [T, 4, 1152, 512] per layer


def test_train_config_needs_an_lm_config():
    with pytest.raises(TypeError, match="model must be an LMConfig"):
        TrainConfig(model=dataclasses.asdict(LMConfig()))


def test_print_config_shows_the_resolved_config_and_exits(tmp_path, capsys):
    from train import cli

    run_dir = tmp_path / "run"
    assert cli.main(["--print-config", "--run-dir", str(run_dir), "--hidden_size=64", "--steps=500"]) == 0
    printed = json.loads(capsys.readouterr().out)
    config = apply_overrides(get_preset("tiny"), {"hidden_size": "64", "steps": "500"}, scale_warmup=True)
    counts = printed.pop("parameters")
    assert counts == parameter_counts(config.model)
    model = config.model
    attention = 12 * model.num_layers * model.context_length * model.hidden_size
    assert printed.pop("flops") == {
        "active_parameters": counts["active"],
        "attention_flops_per_token": attention,
        "model_flops_per_token": 6 * counts["active"] + attention,
    }
    assert TrainConfig.from_dict(printed) == config
    assert not run_dir.exists()  # nothing loaded, compiled or written
    assert cli.main(["--print-config", "--preset", "small-pkm", "--run-dir", str(run_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["grad_accum"] == "auto"  # as given: resolved when the run compiles


def test_steps_alone_scales_the_presets_warmup():
    tiny = get_preset("tiny")  # 40 warm-up steps of 400
    assert (tiny.steps, tiny.warmup_steps) == (400, 40)
    for steps, warmup in [(20, 2), (5, 0), (2000, 200), (1, 0)]:
        config = apply_overrides(tiny, {"steps": str(steps)}, scale_warmup=True)
        assert (config.steps, config.warmup_steps) == (steps, warmup)
    # A warm-up given explicitly is kept; without scale_warmup (a resumed run) nothing is scaled.
    assert apply_overrides(tiny, {"steps": "20", "warmup_steps": "5"}, scale_warmup=True).warmup_steps == 5
    assert apply_overrides(tiny, {"steps": "2000"}).warmup_steps == 40
    with pytest.raises(ValueError, match="warmup_steps=40 must be < steps=20"):
        apply_overrides(tiny, {"steps": "20"})


def test_steps_alone_is_accepted_on_the_command_line(tmp_path, capsys):
    from train import cli

    assert cli.main(["--print-config", "--run-dir", str(tmp_path / "run"), "--steps=20"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["steps"], printed["warmup_steps"]) == (20, 2)


def test_stored_help_is_what_the_parser_renders():
    from train import help as help_text

    assert help_text.HELP_FILE.read_text() == help_text.render(), (
        "train/help.txt is stale: python -m train.help --write"
    )


def test_help_lists_every_field_in_its_group_with_type_default_and_doc():
    from train import help as help_text

    text = help_text.HELP_FILE.read_text()
    groups = re.findall(r"^(\w+):\n", text, flags=re.M)
    assert groups[-6:] == ["model", "FFN", "optimizer", "data", "loop", "checkpoints"], groups
    entries = dict(re.findall(r"^  --([\w.]+) [A-Z|a-z]+  \(default [^)]*\)\n      (\S.*)$", text, flags=re.M))
    assert sorted(entries) == sorted(override_keys()), set(override_keys()) ^ set(entries)
    assert "--learning_rate FLOAT  (default 0.002)\n      peak learning rate" in text  # the tiny preset's value
    assert "--data STR|none  (default none)" in text
    assert "--ffn=peer fields (defaults: small_preset(hidden_size=128)):" in text
    assert "--ffn.num_heads INT  (default 8)" in text
    optimizer = text[text.index("\noptimizer:\n") : text.index("\ndata:\n")]
    assert "--warmup_steps INT" in optimizer and "--steps INT" not in optimizer


def test_help_prints_in_under_two_seconds_without_importing_jax():
    import os
    import subprocess
    import sys
    import time

    from train import help as help_text

    # What `python -m train --help` runs, then a look at what it imported.
    probe = (
        "import runpy, sys; sys.argv = ['train', '--help']\ntry:\n    runpy.run_module('train', run_name='__main__')\n"
    )
    probe += (
        "except SystemExit as e:\n    assert e.code == 0, e.code\nprint('JAX' if 'jax' in sys.modules else 'NOJAX')"
    )
    root = help_text.HELP_FILE.parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    elapsed = time.perf_counter() - start
    assert result.stdout.startswith("usage: python -m train"), result.stdout[:200]
    assert result.stdout.rstrip().endswith("NOJAX"), "python -m train --help imported jax"
    assert elapsed < 2.0, f"--help took {elapsed:.2f} s"


# config.json's "model" as runs before the nested `ffn` field stored it (the flat form, written by that
# version's LMConfig.to_dict): the OmniMoE fields at the top level, a baseline's as ffn_options.
FLAT_MODEL = {
    "vocab_size": 259,
    "context_length": 16,
    "num_layers": 2,
    "num_heads": 2,
    "hidden_size": 16,
    "intermediate_size": 256,
    "num_experts": 1024,
    "num_experts_per_token": 8,
    "hidden_act": "silu",
    "router_norm": "batchnorm",
    "router_norm_eps": 1e-05,
    "router_norm_momentum": 0.1,
    "norm_topk_prob": False,
    "implementation": "auto",
    "expert_axis": None,
    "expert_capacity_factor": None,
    "ffn": "gshard",
    "ffn_options": {"capacity_factor": 2.0, "num_experts": 6},
    "moe_every": 2,
    "tie_embeddings": True,
    "rope_theta": 10000.0,
    "norm_eps": 1e-06,
    "attention": "auto",
    "remat": False,
    "dtype": "float32",
    "param_dtype": "float32",
}
FLAT_CONFIG = {
    "model": FLAT_MODEL,
    "data": None,
    "tokenizer": None,
    "val_fraction": 0.05,
    "token_dtype": "uint16",
    "seed": 0,
    "batch_size": 32,
    "grad_accum": 1,
    "steps": 400,
    "learning_rate": 0.002,
    "warmup_steps": 40,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.1,
    "beta1": 0.9,
    "beta2": 0.95,
    "adam_eps": 1e-08,
    "grad_clip": 1.0,
    "aux_loss_coefficient": 1.0,
    "eval_every": 100,
    "eval_batches": 4,
    "log_every": 20,
    "checkpoint_every": 200,
    "keep_checkpoints": 3,
    "time_limit_minutes": 0.0,
}


def test_a_run_directory_of_the_flat_form_still_resumes(tmp_path, capsys):
    from train import cli
    from train.loop import load_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(FLAT_CONFIG))
    config = load_config(run_dir)
    # The baseline: its small preset at d = 16 with the stored options; the dense layer: intermediate_size.
    assert config.model.ffn == GShardMoEConfig(16, 6, 32, 2, capacity_factor=2.0)
    assert config.model.dense_ffn_config().intermediate_size == 256
    assert config.model == get_preset("tiny").model.replace(
        context_length=16,
        num_layers=2,
        num_heads=2,
        hidden_size=16,
        ffn=GShardMoEConfig(16, 6, 32, capacity_factor=2.0),
        moe_every=2,
    )
    # The variables are the flat form's: what its checkpoints restore into.
    params = abstract_state(config).params
    assert params["layer_0"]["ffn"]["gate_proj"]["kernel"].shape == (16, 256)
    assert params["layer_1"]["ffn"]["experts"]["gate_proj"].shape == (6, 16, 32)
    # --resume reads it (and, past the config, the checkpoints; here none), and stores nothing new.
    assert cli.main(["--run-dir", str(run_dir), "--resume", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    printed.pop("parameters"), printed.pop("flops")  # the counts --print-config adds to the config
    assert TrainConfig.from_dict(printed) == config
    assert printed["model"]["ffn"] == {
        "kind": "gshard",
        "num_experts": 6,
        "expert_intermediate_size": 32,
        "num_experts_per_token": 2,
        "capacity_factor": 2.0,
        "norm_topk_prob": True,
        "aux_loss_weight": 0.01,
    }
    assert json.loads((run_dir / "config.json").read_text()) == FLAT_CONFIG


@pytest.mark.parametrize(
    ("changes", "ffn"),
    [
        # OmniMoE's fields at the top level, and the dense layers of moe_every=2 as wide as its shared MLP.
        (
            {"ffn": "omnimoe", "intermediate_size": 24, "num_experts": 16, "num_experts_per_token": 4},
            OmniMoEConfig(16, 24, 16, 4, norm_topk_prob=True),
        ),
        # FlashMoE from the same fields (K was num_experts_per_token), in the model's bf16.
        (
            {"ffn": "flashmoe", "intermediate_size": 32, "num_experts": 64, "dtype": "bfloat16", "moe_every": 1},
            FlashMoEConfig(16, 32, "silu", 64, 8, norm_topk_prob=True, dtype="bfloat16"),
        ),
        ({"ffn": "dense", "intermediate_size": 40}, DenseFFNConfig(16, 40)),
    ],
    ids=["omnimoe", "flashmoe", "dense"],
)
def test_the_flat_form_of_every_kind_reads_as_its_config(changes, ffn):
    flat = {**FLAT_MODEL, "ffn_options": {}, "norm_topk_prob": True, **changes}
    model = LMConfig.from_dict(flat)
    assert model.ffn == ffn
    assert model.dense_intermediate_size == flat["intermediate_size"]
    assert model.dtype == jnp.dtype(flat["dtype"])
    assert LMConfig.from_dict(model.to_dict()) == model
