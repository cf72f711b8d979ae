"""Every FFN kind through the training job: `python -m train --ffn KIND` (the real main) on a shrunken config,
the baselines' options on the command line, the matched-active-parameter presets, and an exact resume.

OmniMoE's own run through main is tests/test_train_loop.py's. Here the four baselines and FlashMoE run once each
(one layer, d = 16, 4 steps) and the tests read those runs: GShard and PKM in bf16 compute, so the baselines' bf16
paths run too, and GShard with moe_every=2, so a dense SwiGLU layer trains beside it. The "dense" kind's own
run is marked slow (CPU compiles dominate; its SwiGLU is that same layer).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import secrets

import jax
import numpy as np
import pytest

from omnimoe_jax import FlashMoEConfig, OmniMoEConfig
from omnimoe_jax._model import AUX_LOSS_KINDS, FFN_KINDS, LMConfig, parameter_counts
from omnimoe_jax.baselines import presets as ffn_presets
from omnimoe_jax.ffn_registry import own_field_types
from train import cli
from train.checkpoint import Checkpoints
from train.config import apply_overrides, override_keys, parse_overrides
from train.loop import load_config, run
from train.metrics import read_metrics, routing_health, routing_report, sown_statistics
from train.presets import PRESETS, get_preset, matched_ffn_overrides
from train.steps import abstract_state

BASELINE_KINDS = ["gshard", "deepseekmoe", "peer", "pkm"]
SHRUNK = [
    "--context_length=16",
    "--num_layers=1",
    "--num_heads=2",
    "--hidden_size=16",
    "--batch_size=4",
    "--steps=4",
    "--warmup_steps=1",
    "--log_every=2",
    "--eval_every=2",
    "--eval_batches=1",
    "--checkpoint_every=4",
]
HEALTH = {"experts_used", "max_load", "load_entropy"}
ROUTING_FIELDS = {
    "dense": None,
    "gshard": HEALTH | {"dropped_pairs", "dropped_fraction", "balance_loss"},
    "deepseekmoe": HEALTH | {"balance_loss"},  # dropless "sorted" dispatch by default
    "peer": HEALTH,
    "pkm": HEALTH,
    "flashmoe": HEALTH | {"router_entropy"},  # the statistics OmniMoE reports
}
# Where a kind's BatchNorm (on the queries, on FlashMoE's input tokens) keeps its statistics: batch_stats.
NORM_PATHS = {"peer": ("retrieval", "query_norm"), "pkm": ("retrieval", "query_norm"), "flashmoe": ("router_norm",)}
EXTRA = {
    "gshard": ["--dtype=bfloat16", "--num_layers=2", "--moe_every=2"],
    "pkm": ["--dtype=bfloat16"],
    "flashmoe": ["--ffn.intermediate_size=32", "--ffn.num_experts=64", "--ffn.num_experts_per_tok=8"],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """About 60 kB of real Python in one file (faster to load than the whole standard library)."""
    root = pathlib.Path(json.__file__).parent.parent
    path = tmp_path_factory.mktemp("corpus") / "corpus.py"
    path.write_bytes(b"\n".join((root / name).read_bytes() for name in ("json/decoder.py", "textwrap.py", "shlex.py")))
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus) -> dict[str, pathlib.Path]:
    """{kind: run directory} of one `python -m train --ffn KIND` per baseline kind, and "peer-split": the PEER
    run again, stopped at step 2 and resumed from the command line (right after PEER's run, while its
    compiled steps are cached: a CPU compile costs more than the whole run)."""
    seed = int(os.environ.get("OMNIMOE_TEST_SEED", secrets.randbits(31))) % 2**16
    print(f"runs seed={seed} (rerun with OMNIMOE_TEST_SEED={seed})")
    done = {}
    for kind in BASELINE_KINDS:
        run_dir = done[kind] = tmp_path_factory.mktemp(kind) / "run"
        train_kind(kind, run_dir, corpus, seed)
        if kind == "peer":  # PEER: batch_stats, the omni_router/omni_expert path, no aux loss
            split = done["peer-split"] = tmp_path_factory.mktemp("peer") / "split"
            assert run(load_config(run_dir), split, stop_at_step=2, log=print)["reason"] == "stop_at_step"
            assert cli.main(["--run-dir", str(split), "--resume"]) == 0
    return done


def train_kind(kind: str, run_dir: pathlib.Path, corpus: str, seed: int) -> None:
    args = [*SHRUNK, f"--ffn={kind}", f"--data={corpus}", f"--seed={seed}", *EXTRA.get(kind, [])]
    assert cli.main(["--run-dir", str(run_dir), *args]) == 0, kind


@pytest.mark.parametrize("kind", BASELINE_KINDS)
def test_main_trains_every_ffn_kind(runs, kind):
    check_run(kind, runs[kind])


def test_main_trains_flashmoe(corpus, tmp_path, seed):
    train_kind("flashmoe", tmp_path / "run", corpus, seed % 2**16)
    check_run("flashmoe", tmp_path / "run")
    config = load_config(tmp_path / "run")
    ffn = config.model.ffn
    assert (ffn.num_experts, ffn.num_experts_per_tok, ffn.intermediate_size) == (64, 8, 32)


@pytest.mark.slow
def test_main_trains_the_dense_kind(corpus, tmp_path, seed):
    train_kind("dense", tmp_path / "run", corpus, seed % 2**16)
    check_run("dense", tmp_path / "run")


def check_run(kind: str, run_dir: pathlib.Path) -> None:
    """The run's metrics, routing report and final checkpoint are what a `kind` run must produce."""
    records = read_metrics(run_dir)
    start, train, evals = (
        records[0],
        [r for r in records if r["kind"] == "train"],
        [r for r in records if r["kind"] == "eval"],
    )
    config = load_config(run_dir)
    assert config.model.ffn_kind == kind and start["parameters"] == parameter_counts(config.model)
    assert config.model.dtype == ("bfloat16" if "--dtype=bfloat16" in EXTRA.get(kind, []) else "float32")
    assert [r["step"] for r in train] == [2, 4] and [r["step"] for r in evals] == [2, 4]
    for record in train:
        assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
        if kind in AUX_LOSS_KINDS:  # the balance loss (1 when balanced, at most E), weighted by aux_loss_weight
            ffn = config.model.ffn
            assert 0 < record["aux_loss"] <= ffn.aux_loss_weight * ffn.num_experts, record
        else:
            assert "aux_loss" not in record
    for record in evals:
        # Four steps teach little and a random 16-wide model starts above the uniform ln(vocab) (CI saw 9.07
        # bits at step 2), so the bound only catches blow-ups.
        assert math.isfinite(record["val_loss"]) and record["val_loss"] < 2 * math.log(config.model.vocab_size)
        # Every target but the rare document separators is a byte, so bits per byte is about the loss in bits.
        assert record["bits_per_byte"] == pytest.approx(record["val_loss"] / math.log(2), rel=0.02)
        if ROUTING_FIELDS[kind] is None:
            assert "routing" not in record and "routing_per_layer" not in record
            continue
        routing = record["routing"]
        assert set(routing) == ROUTING_FIELDS[kind]
        assert [layer["layer"] for layer in record["routing_per_layer"]] == list(config.model.sparse_layers)
        assert 0 < routing["experts_used"] <= 1 and routing["max_load"] >= 1 and 0 < routing["load_entropy"] <= 1
        if "dropped_fraction" in routing:
            pairs = record["tokens"] * config.model.ffn.num_experts_per_token
            assert routing["dropped_fraction"] == pytest.approx(routing["dropped_pairs"] / pairs)
            assert 0 <= routing["dropped_fraction"] < 1
        if "balance_loss" in routing:
            assert routing["balance_loss"] > 0
    # The checkpoint restores for every kind; the BatchNorms (PEER/PKM queries, FlashMoE's input) counted all 4
    # training batches.
    with Checkpoints(run_dir) as checkpoints:
        assert checkpoints.all_steps() == [4]
        state, _ = checkpoints.restore(4, abstract_state(config))
    assert int(state.step) == 4
    if kind in NORM_PATHS:
        (layer,) = config.model.sparse_layers
        stats = state.batch_stats[f"layer_{layer}"]["ffn"]
        for name in NORM_PATHS[kind]:
            stats = stats[name]
        assert int(stats["num_batches_tracked"]) == 4
        assert not np.allclose(stats["running_mean"], 0)
    else:
        assert state.batch_stats == {}


def test_resume_of_a_baseline_is_exact(runs):
    straight, split = runs["peer"], runs["peer-split"]
    config = load_config(straight)
    assert load_config(split) == config
    with Checkpoints(split) as checkpoints:
        assert checkpoints.all_steps() == [2, 4]
    states = []
    for run_dir in (straight, split):
        with Checkpoints(run_dir) as checkpoints:
            states.append(checkpoints.restore(4, abstract_state(config)))
    (state_a, data_a), (state_b, data_b) = states
    assert data_a == data_b
    leaves_a, leaves_b = jax.tree.leaves(state_a), jax.tree.leaves(state_b)
    assert len(leaves_a) == len(leaves_b) > 10
    for a, b in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    losses = [{r["step"]: r["loss"] for r in read_metrics(d) if r["kind"] == "train"} for d in (straight, split)]
    assert losses[0] == losses[1]


def test_baseline_options_on_the_command_line():
    base = get_preset("tiny")
    config = apply_overrides(base, parse_overrides(["--ffn=peer", "--ffn.num_heads=2", "--ffn.query_norm", "none"]))
    peer = config.model.ffn
    assert (peer.num_heads, peer.query_norm) == (2, "none")
    # Everything not given is small_presets(d)'s; width, dtype, activation and kernels are the model's.
    default = ffn_presets.small_presets(128)["peer"]
    assert (peer.num_experts, peer.experts_per_head, peer.key_dim) == (
        default.num_experts,
        default.experts_per_head,
        default.key_dim,
    )
    assert (peer.hidden_size, peer.hidden_act, peer.implementation) == (128, "silu", "auto")
    assert LMConfig.from_dict(json.loads(json.dumps(config.model.to_dict()))) == config.model
    again = apply_overrides(config, {"ffn.key_dim": "16"})  # the same kind keeps its fields
    assert again.model.ffn == peer.replace(key_dim=16)
    assert apply_overrides(config, {"ffn": "gshard"}).model.ffn == ffn_presets.small_presets(128)["gshard"]
    assert {"ffn.capacity_factor", "ffn.dispatch", "ffn.values_per_head"} <= set(override_keys())
    assert "ffn_options" not in override_keys() and "ffn.hidden_size" not in override_keys()
    assert "ffn.expert_axis" not in override_keys()  # --mesh sets it
    assert own_field_types("gshard")["capacity_factor"] is float and own_field_types("dense") == {
        "intermediate_size": int
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ffn.num_heads=2"], "--ffn.num_heads is not a field of ffn='omnimoe'"),
        (["--ffn=peer", "--ffn.heads=2"], "unknown config keys ['ffn.heads']"),
        (["--ffn=gshard", "--ffn.capacity_factor=lots"], "--ffn.capacity_factor='lots': expected float"),
        (["--ffn=deepseekmoe", "--ffn.dispatch=dense"], "dispatch='dense' must be one of"),
        (["--ffn=peer", "--ffn.num_heads=0"], "ffn='peer': num_heads=0 must be"),
        (["--ffn=pkm", "--ffn.values_per_head=5000"], "values_per_head=5000 must be <= num_values=4096"),
        (["--ffn=gshard", "--hidden_size=8", "--num_heads=2"], "hidden_size=8 must be a multiple of 4 and >= 12"),
        (["--aux_loss_coefficient=-1"], "aux_loss_coefficient=-1.0 must be a finite number >= 0"),
        (["--ffn=kan"], "ffn='kan' must be one of"),
    ],
)
def test_bad_baseline_overrides_are_refused(args, message):
    with pytest.raises(ValueError, match=message.replace("[", "\\[").replace("(", "\\(").replace(")", "\\)")):
        apply_overrides(get_preset("tiny"), parse_overrides(args))


def test_ffn_configs_are_refused_where_they_cannot_apply():
    with pytest.raises(TypeError, match="is not the config of a registered FFN kind"):
        LMConfig(ffn={"kind": "gshard"})
    with pytest.raises(ValueError, match="ffn='switch' must be one of"):
        LMConfig(ffn="switch")
    fields = {**LMConfig().to_dict(), "ffn": {"kind": "gshard", "num_heads": 2}}
    with pytest.raises(ValueError, match=r"ffn fields \['num_heads'\] are not own fields of kind 'gshard'"):
        LMConfig.from_dict(fields)
    # FlashMoE always normalises its input tokens: it has no router_norm to set.
    with pytest.raises(ValueError, match=r"--ffn\.router_norm is not a field of ffn='flashmoe'"):
        apply_overrides(get_preset("tiny"), parse_overrides(["--ffn=flashmoe", "--ffn.router_norm=none"]))


def test_flashmoe_takes_the_models_shared_fields():
    model = LMConfig(ffn=FlashMoEConfig(32, 96, "gelu", 256, 12), hidden_size=64)
    ffn = model.ffn
    assert (ffn.hidden_size, ffn.intermediate_size, ffn.num_experts, ffn.num_experts_per_tok) == (64, 96, 256, 12)
    assert (ffn.hidden_act, ffn.dtype, ffn.implementation) == (model.hidden_act, model.dtype, model.implementation)
    # One joint gate [d, 2n] has the two gates' parameters: the same counts as OmniMoE at the same sizes.
    assert parameter_counts(model) == parameter_counts(model.replace(ffn=OmniMoEConfig(64, 96, 256, 12)))


def test_matched_presets_have_the_documented_active_parameters():
    # The table in train/presets.py; the FFN counts are small_presets(512)'s, checked against the modules'
    # real parameters in tests/test_baselines.py.
    documented = {
        "dense": (3_145_728, 33_695_744),
        "omnimoe": (3_145_728, 33_695_744),
        "flashmoe": (3_145_728, 33_695_744),
        "deepseekmoe": (3_178_496, 33_957_888),
        "gshard": (3_153_920, 33_761_280),
        "peer": (3_211_264, 34_220_032),
        "pkm": (3_145_728, 33_695_744),
    }
    small = get_preset("small")
    dense_counts = parameter_counts(get_preset("small-dense").model)
    for kind, (ffn_active, model_active) in documented.items():
        config = get_preset(f"small-{kind}")
        model = config.model
        assert model.ffn_kind == kind and model.hidden_size == 512
        assert ffn_presets.active_parameters(model.ffn) == ffn_active
        counts = parameter_counts(model)
        assert counts["active"] == model_active
        # Attention, norms and embeddings are shared: the models differ by their FFNs' active counts only.
        assert counts["active"] - dense_counts["active"] == model.num_layers * (ffn_active - 3 * 512 * 2048)
        assert abs(model_active / documented["dense"][1] - 1) < 0.02, kind
        # Everything but the FFN (and PKM's micro-batching) is the small preset's.
        assert config.tokens_per_step == small.tokens_per_step and config.steps == small.steps
        assert model.replace(ffn=small.model.ffn) == small.model
    assert set(PRESETS) >= {f"small-{kind}" for kind in FFN_KINDS}
    assert matched_ffn_overrides("peer", 64) == {
        "hidden_size": "64",
        "ffn": "peer",
        "ffn.num_experts": "1024",  # (d/2)^2
        "ffn.num_heads": "8",
        "ffn.experts_per_head": "32",  # d/2
        "ffn.key_dim": "32",  # d/2
    }
    assert matched_ffn_overrides("omnimoe", 64) == {
        "hidden_size": "64",
        "ffn": "omnimoe",
        "ffn.intermediate_size": "128",  # 2d
        "ffn.num_experts": "1024",  # (d/2)^2
        "ffn.num_experts_per_token": "160",  # 5d/2
    }


def test_sown_statistics_and_routing_report():
    # Two MoE layers (1 and 3) over two evaluation batches of 8 tokens, top 2 of 4 experts.
    def batch(counts_1, counts_3, dropped, balance):
        sown = {
            f"layer_{i}": {
                "ffn": {
                    "expert_counts": (np.array(counts),),
                    "dropped_pairs": (np.int32(d),),
                    "balance_loss": (np.float32(b),),
                }
            }
            for i, counts, d, b in ((1, counts_1, dropped[0], balance[0]), (3, counts_3, dropped[1], balance[1]))
        }
        return {k: np.asarray(v) for k, v in sown_statistics(sown, (1, 3)).items()}

    first = batch([8, 8, 0, 0], [4, 4, 4, 4], (2, 0), (1.5, 1.0))
    second = batch([8, 8, 0, 0], [16, 0, 0, 0], (4, 8), (1.5, 2.0))
    assert first["expert_counts"].shape == (2, 4) and first["dropped_pairs"].tolist() == [2, 0]
    totals = {k: first[k] + second[k] for k in first} | {"tokens": np.float64(16)}
    report = routing_report(totals, (1, 3), num_batches=2)
    layer_1, layer_3 = report["routing_per_layer"]
    assert layer_1 == {
        "layer": 1,
        "experts_used": 0.5,
        "max_load": 2.0,
        "load_entropy": pytest.approx(math.log(2) / math.log(4)),
        "dropped_pairs": 6,
        "dropped_fraction": 6 / 32,
        "balance_loss": 1.5,
    }
    assert layer_3["experts_used"] == 1.0 and layer_3["max_load"] == 20 / 8 and layer_3["balance_loss"] == 1.5
    assert report["routing"]["dropped_pairs"] == 7 and report["routing"]["experts_used"] == 0.75
    assert "router_entropy" not in report["routing"]


def test_routing_health_of_one_layer_is_what_the_eval_record_reports():
    # One OmniMoE layer over 8 tokens, K = 2 of N = 4 experts, its summed routing entropy 8 * 0.5 * log 4.
    counts, entropy_sum = np.array([8, 8, 0, 0]), 8 * 0.5 * math.log(4)
    health = routing_health(counts, entropy_sum, 8)
    totals = {"expert_counts": counts[None], "router_entropy": np.array([entropy_sum]), "tokens": np.float64(8)}
    (layer,) = routing_report(totals, (0,), num_batches=1)["routing_per_layer"]
    assert health == {k: v for k, v in layer.items() if k != "layer"}
    assert health["experts_used"] == 0.5 and health["max_load"] == 2.0
    assert health["router_entropy"] == pytest.approx(0.5)
    assert "router_entropy" not in routing_health(counts, None, 8)
