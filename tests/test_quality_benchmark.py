"""benchmarks/quality.py's and benchmarks/quality_sweep.py's planning and bookkeeping (nothing trained or timed
in the default suite), and their --quick modes end to end (slow: a training process per run)."""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
import types

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # benchmarks/ is a folder of scripts, not a package
import quality_sweep
import report

from omnimoe_jax import ffn_registry
from omnimoe_jax.baselines import presets as ffn_presets
from train.config import apply_overrides, parse_overrides
from train.presets import get_preset

KINDS = ["dense", "gshard", "deepseekmoe", "omnimoe", "peer", "pkm"]


def test_plan_gives_every_kind_the_same_run_but_its_matched_ffn():
    entries = quality.plan(KINDS, hidden_size=64, steps=600, seed=3, quick=False, extra=["--attention=xla"])
    assert [e["kind"] for e in entries] == KINDS and not any("error" in e for e in entries)
    configs = {e["kind"]: apply_overrides(get_preset("small"), parse_overrides(e["overrides"])) for e in entries}
    for kind, config in configs.items():
        model = config.model
        assert model.ffn_kind == kind and model.hidden_size == 64 and model.attention == "xla"
        assert (config.steps, config.seed, config.eval_every, config.checkpoint_every) == (600, 3, 100, 600)
        assert ffn_presets.active_parameters(model.ffn) == ffn_presets.active_parameters(
            ffn_presets.small_presets(64)[kind]
        )
        # Everything but the FFN is shared: the same shape, batches, schedule and seed.
        reference = configs["dense"]
        assert model.replace(ffn=reference.model.ffn) == reference.model
        assert dataclasses.replace(config, model=reference.model) == reference
    assert entries[0]["tokens_per_step"] == 32 * 256


def test_plan_refuses_what_would_unmatch_the_runs_and_records_refused_configs():
    for extra in (["--hidden_size=64"], ["--steps=10"], ["--ffn.num_heads=2"], ["--time_limit_minutes=1"]):
        with pytest.raises(ValueError, match="would unmatch the runs"):
            quality.plan(KINDS, hidden_size=64, steps=600, seed=0, quick=False, extra=extra)
    with pytest.raises(ValueError, match=r"unknown FFN kinds \['moe'\]"):
        quality.plan(["moe"], hidden_size=64, steps=600, seed=0, quick=False, extra=[])
    # d = 20 is no multiple of 4: small_presets refuses every kind's sizes; each is recorded, nothing runs.
    entries = quality.plan(["dense", "peer"], hidden_size=20, steps=600, seed=0, quick=False, extra=[])
    assert all(e["error"].startswith("config refused: hidden_size=20") for e in entries)


def test_time_shares_split_what_is_left():
    assert quality.time_share(480.0, 6) == 80.0
    assert quality.time_share(-5.0, 2) == 0.0  # overrun: the run still gets its minimum time limit
    assert quality.time_limit_minutes(80.0) == pytest.approx((80.0 - quality.STARTUP_S) / 60)
    assert quality.time_limit_minutes(0.0) == 0.5
    with pytest.raises(ValueError, match="runs_left=0"):
        quality.time_share(10.0, 0)


def _records(steps_done, *, reason="done", evals=(2, 4), routing=None):
    config = {"batch_size": 4, "model": {"context_length": 16}}
    records = [{"kind": "start", "parameters": {"total": 900, "active": 300}, "compile_s": 1.5, "config": config}]
    for step in range(1, steps_done + 1):
        records.append({"kind": "train", "step": step, "loss": 5.0 - step, "tokens_per_s": 100.0 * step})
        if step in evals:
            bpb = 8.0 - step
            records.append(
                {"kind": "eval", "step": step, "val_loss": bpb * math.log(2), "bits_per_byte": bpb, **(routing or {})}
            )
    records.append({"kind": "end", "step": steps_done, "reason": reason})
    return records


def test_summaries_of_finished_stopped_and_failed_runs():
    done = quality.summarise(
        "gshard", _records(4, routing={"routing": {"experts_used": 0.9}}), {"returncode": 0, "log_tail": []}, 4
    )
    assert done["status"] == "done" and done["bits_per_byte"] == 4.0 and done["eval_step"] == 4
    assert done["tokens"] == 4 * 4 * 16 and done["active_params"] == 300 and done["experts_used"] == 0.9
    assert done["tokens_per_s"] == 300.0  # median of the windows after the first (200, 300, 400)
    stopped = quality.summarise("pkm", _records(3, reason="time limit"), {"returncode": 0}, 4)
    assert stopped["status"] == "stopped at step 3 (time limit)" and stopped["eval_step"] == 2
    crashed = quality.summarise("peer", _records(2)[:-1], {"returncode": 1, "log_tail": ["Traceback", "OOM"]}, 4)
    assert crashed["status"] == "error" and crashed["error"] == "exit 1: Traceback | OOM"
    assert crashed["bits_per_byte"] == 6.0  # what it did before failing is kept
    killed = quality.summarise("omnimoe", [], {"returncode": None, "killed": True, "log_tail": []}, 4)
    assert killed["status"] == "error" and killed["error"].startswith("killed after its share")
    refused = quality.summarise("dense", [], {"error": "config refused: bad"}, 4)
    assert refused == {"ffn": "dense", "planned_steps": 4, "status": "error", "error": "config refused: bad"}


def test_common_step_is_the_last_evaluation_every_run_reached():
    curves = {
        "dense": quality.eval_curve(_records(4), 64),
        "pkm": quality.eval_curve(_records(3, reason="time limit"), 64),
        "peer": [],  # failed before its first evaluation: does not hold the others back
    }
    assert [p["tokens"] for p in curves["dense"]] == [128, 256]
    assert quality.common_step(curves) == 2
    assert quality.bits_at(curves["dense"], 2) == 6.0 and quality.bits_at(curves["dense"], None) is None
    assert quality.common_step({"a": [{"step": 2}], "b": [{"step": 3}]}) is None
    assert quality.common_step({}) is None


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(repo)}
    written = [repo / "benchmarks/results" / f"quality_quick_test.{ext}" for ext in ("json", "png")]
    try:  # the script writes its results into the repository too: removed whatever the asserts say
        done = subprocess.run(
            [sys.executable, str(repo / "benchmarks/quality.py"), "--quick", "--name", "quality_quick_test"],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    finally:
        for path in written:
            path.unlink(missing_ok=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "quality_quick_test.json").read_text())
    assert (tmp_path / "quality_quick_test.png").stat().st_size > 0
    assert [row["ffn"] for row in result["rows"]] == KINDS
    for row in result["rows"]:
        assert row["status"] == "done", row
        # Four steps of a d = 16 model: the bound catches a blow-up (2 x the uniform 8 bits), not learning.
        assert 0 < row["bits_per_byte"] < 16 and row["bits_at_common_step"] == row["bits_per_byte"]
    assert result["common_step"] == 4


# ----------------------------------------------------------------------------------------------------------
# benchmarks/quality_sweep.py

SWEEP = list(quality_sweep.SWEEP_KINDS)


def _grid(kinds=SWEEP, **changes):
    settings = {
        "seeds": [0, 1],
        "learning_rates": [2e-3, 1e-3],
        "multipliers": [1.0, 3.0, 10.0],
        "splits": quality_sweep.default_splits(64),
    }
    return quality_sweep.grid(kinds, **{**settings, **changes})


def _quick_shape(**changes):
    fields = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "context_length": 16, "batch_size": 4}
    return quality_sweep.Shape(**{**fields, "tokens": 4 * 64, "quick": True, **changes})


def test_sweep_grid_counts_every_kind_and_axis():
    runs = _grid()
    per_kind = {kind: [r for r in runs if r.kind == kind] for kind in SWEEP}
    # dense, deepseekmoe: seeds x rates; peer: x 3 multipliers; omnimoe: x (3 multipliers + 2 other splits).
    assert {k: len(v) for k, v in per_kind.items()} == {"omnimoe": 20, "dense": 4, "deepseekmoe": 4, "peer": 12}
    assert len({r.name for r in runs}) == len(runs)
    assert {r.table_multiplier for r in per_kind["dense"]} == {None} and {r.split for r in per_kind["peer"]} == {None}
    # The axes vary around the centre, not crossed: the other splits run at the centre multiplier only.
    assert {r.table_multiplier for r in per_kind["omnimoe"] if r.split != (128, 160)} == {1.0}
    assert {r.split for r in per_kind["omnimoe"]} == {(128, 160), (192, 64), (224, 16)}
    assert len(_grid(multipliers=[1.0], splits=[(128, 160)])) == 16  # every kind: 2 seeds x 2 rates
    for bad, match in (({"seeds": [0, 0]}, "repeated"), ({"learning_rates": []}, "at least one")):
        with pytest.raises(ValueError, match=match):
            _grid(**bad)


def test_sweep_orders_the_centre_first_seed_by_seed():
    runs = quality_sweep.order(_grid(), "informative")
    head = [(r.kind, r.seed, r.learning_rate, r.table_multiplier) for r in runs[:8]]
    assert head == [(k, s, 2e-3, 1.0 if k in ("omnimoe", "peer") else None) for s in (0, 1) for k in SWEEP]
    tiers = [r.tier for r in runs]
    assert tiers == sorted(tiers) and (tiers.count(0), tiers.count(1)) == (8, 8)
    assert [quality_sweep.TIERS[t] for t in dict.fromkeys(tiers)] == list(quality_sweep.TIERS)
    other_rate = runs[8:16]
    assert {r.learning_rate for r in other_rate} == {1e-3} and [r.seed for r in other_rate] == [0] * 4 + [1] * 4
    assert {(r.kind, r.split) for r in runs[-8:]} <= {("omnimoe", (192, 64)), ("omnimoe", (224, 16))}
    by_kind = quality_sweep.order(_grid(), "grid")
    assert [r.kind for r in by_kind] == sorted((r.kind for r in by_kind), key=SWEEP.index)
    with pytest.raises(ValueError, match="order='random'"):
        quality_sweep.order(runs, "random")


def test_sweep_splits_must_keep_dense_active_parameters():
    for d in (16, 64, 256, 512):
        quality_sweep.check_splits(quality_sweep.default_splits(d), d)
    assert quality_sweep.default_splits(512) == [(1024, 1280), (1536, 512), (1792, 128)]
    with pytest.raises(ValueError, match=r"512:320 at d=256: .* 622,592 .* -20\.83% from dense's 786,432.* 725\.333"):
        quality_sweep.check_splits([(512, 640), (512, 320)], 256)
    with pytest.raises(ValueError, match=r"64:65 at d=16: .*num_experts_per_token"):
        quality_sweep.check_splits([(64, 65)], 16)  # K > N = 64: the config's own refusal, with the split


def test_sweep_runs_share_everything_but_the_ffn_and_the_swept_settings():
    shape = _quick_shape(hidden_size=64, tokens=64 * 10)
    configs = {}
    for run in _grid(multipliers=[1.0]):
        entry = quality_sweep.run_entry(run, shape)
        configs[run.name] = config = apply_overrides(get_preset("small"), parse_overrides(entry["overrides"]))
        assert (config.learning_rate, config.seed, config.steps) == (run.learning_rate, run.seed, 10)
        assert config.model.ffn_kind == run.kind and config.model.hidden_size == 64
        if run.split is not None:
            assert (config.model.ffn.intermediate_size, config.model.ffn.num_experts_per_token) == run.split
    reference = configs["dense-lr0.002-seed0"]
    for config in configs.values():
        assert config.model.replace(ffn=reference.model.ffn) == reference.model
        assert dataclasses.replace(config, model=reference.model, learning_rate=2e-3, seed=0) == reference
    for run in _grid():  # every multiplier reaches its run's optimizer settings, as a TrainConfig field
        config = apply_overrides(get_preset("small"), parse_overrides(quality_sweep.run_entry(run, shape)["overrides"]))
        assert config.table_learning_rate_multiplier == (run.table_multiplier or 1.0)
        assert config.has_table_group == (run.table_multiplier not in (None, 1.0))


def test_sweep_table_settings_go_to_the_kinds_with_tables_alone():
    shape = _quick_shape(hidden_size=64, tokens=64 * 10, extra=("--table_lr_decay_to_one", "--attention=xla"))
    for run in _grid(multipliers=[3.0]):
        config = apply_overrides(get_preset("small"), parse_overrides(quality_sweep.run_entry(run, shape)["overrides"]))
        assert config.table_lr_decay_to_one == (run.kind in ("omnimoe", "peer")) and config.model.attention == "xla"
    # The kinds with tables are the registry's, and only they get multipliers.
    assert ffn_registry.table_kinds() == quality_sweep.TABLE_KINDS
    assert {run.kind for run in _grid(multipliers=[3.0]) if run.table_multiplier is not None} == {"omnimoe", "peer"}


def test_sweep_shape_names_its_runs_and_refuses_too_few_tokens(capsys):
    shape = quality_sweep.Shape(256, 4, 4, 256, 64, 40_000_000)
    assert shape.steps == 2441 and shape.key == "d256-L4-H4-ctx256-b64-40M"
    other = dataclasses.replace(shape, extra=("--attention=xla",))
    assert (
        other.key.startswith(shape.key + "-x")
        and other.key != dataclasses.replace(shape, extra=("--dtype=float32",)).key
    )
    run = _grid()[0]
    assert run.filename(shape) == "d256-L4-H4-ctx256-b64-40M__omnimoe-lr0.002-tm1-i128k160-seed0.json"
    assert quality_sweep.main(["--list", "--attention", "xla", "--results-dir", "/nonexistent"]) == 0
    assert f"{shape.key}-x" + quality_sweep.hashlib.sha1(b"--attention=xla").hexdigest()[:8] in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"tokens=81,920 is 5 steps of 16,384 tokens"):
        quality_sweep.Shape(256, 4, 4, 256, 64, 5 * 16384)


def test_sweep_command_line_refusals(capsys, tmp_path):
    for argv, match in (
        (["--learning-rates", "1e-3"], "expected >= 2"),
        (["--omnimoe-splits", "512:320"], "from dense's 786,432"),
        (["--omnimoe-splits", "512-640"], "expected intermediate_size:K"),
        (["--learning_rate=1e-3"], "would unmatch the runs"),
        (["--ffn", "moe"], "unknown FFN kinds"),
        (["--tokens", "50k"], "expected at least 6"),
    ):
        with pytest.raises(SystemExit):
            quality_sweep.main(["--list", "--results-dir", str(tmp_path), *argv])
        assert match in capsys.readouterr().err
    assert quality_sweep.main(["--list", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "d256-L4-H4-ctx256-b64-40M: 40 runs, 0 recorded" in out


ENVIRONMENT = {
    "device": "cpu",
    "platform": "cpu",
    "cpu_count": 2,
    "versions": {"jax": "0"},
    "date": "2026-12-04T00:00:00+00:00",
    "command": "python benchmarks/quality_sweep.py --quick",
}


def _fake_metrics(steps, *, bits=2.0, reason="done"):
    """metrics.jsonl records of a run that ended after `steps` steps, evaluated at the last."""
    config = {"batch_size": 4, "model": {"context_length": 16}}
    start = {"parameters": {"total": 900, "active": 300}, "compile_s": 1.0, "config": config, "device": "cpu"}
    records = [{"kind": "start", **start}]
    for step in range(1, steps + 1):
        records.append({"kind": "train", "step": step, "loss": 3.0, "tokens_per_s": 100.0})
    if steps:
        routing = {"experts_used": 0.5, "load_entropy": 0.9, "max_load": 2.0}
        records.append({"kind": "eval", "step": steps, "val_loss": 1.0, "bits_per_byte": bits, "routing": routing})
    return [*records, {"kind": "end", "step": steps, "reason": reason, "elapsed_s": 3.0}]


def test_sweep_records_each_ending():
    shape = _quick_shape()
    run = _grid(["omnimoe"], multipliers=[1.0], splits=[(32, 40)])[0]
    ok = {"command": ["python", "-m", "train"], "returncode": 0, "killed": False, "wall_s": 9.0, "log_tail": []}
    done = quality_sweep.make_record(run, shape, _fake_metrics(4), ok, ENVIRONMENT)
    assert done["status"] == "done" and done["bits_per_byte"] == 2.0 and done["tokens"] == 4 * 64
    assert done["routing"] == {"experts_used": 0.5, "load_entropy": 0.9, "max_load": 2.0}
    assert done["split"] == {"intermediate_size": 32, "K": 40} and done["table_multiplier"] == 1.0
    assert (done["command"], done["sweep_command"], done["wall_s"]) == ("python -m train", ENVIRONMENT["command"], 9.0)
    stopped = quality_sweep.make_record(run, shape, _fake_metrics(2, reason="time limit"), ok, ENVIRONMENT)
    assert stopped["status"] == "stopped" and stopped["detail"] == "stopped at step 2 (time limit)"
    assert stopped["bits_per_byte"] is None and stopped["curve"][-1]["bits_per_byte"] == 2.0  # partial: no result
    diverged = quality_sweep.make_record(
        run, shape, _fake_metrics(2, reason="non-finite loss"), {**ok, "returncode": 3}, ENVIRONMENT
    )
    assert diverged["status"] == "diverged"
    crashed = {**ok, "returncode": 1, "log_tail": ["Traceback", "RESOURCE_EXHAUSTED"]}
    failed = quality_sweep.make_record(run, shape, _fake_metrics(0)[:1], crashed, ENVIRONMENT)
    assert failed["status"] == "error" and "RESOURCE_EXHAUSTED" in failed["detail"] and failed["log_tail"]
    killed = quality_sweep.make_record(run, shape, [], {**ok, "returncode": None, "killed": True}, ENVIRONMENT)
    assert killed["status"] == "stopped" and killed["steps"] is None  # killed: it starts again next time


def test_sweep_skips_recorded_runs_resumes_stopped_ones_and_keeps_to_its_budget(monkeypatch, tmp_path):
    shape = _quick_shape()
    runs = quality_sweep.order(
        _grid(["dense", "omnimoe"], learning_rates=[2e-3], multipliers=[1.0], splits=[(32, 40)]), "informative"
    )
    names = [r.name for r in runs]
    assert names == [
        f"{kind}-seed{seed}" for seed in (0, 1) for kind in ("dense-lr0.002", "omnimoe-lr0.002-tm1-i32k40")
    ]
    results, run_dirs = tmp_path / "quality_sweep", tmp_path / "runs"
    now = [0.0]  # the sweep's clock: each fake run takes 50 s of it
    monkeypatch.setattr(quality_sweep, "time", types.SimpleNamespace(time=lambda: now[0]))
    started = []

    def fake_run_one(entry, run_dir, env, *, limit_minutes, timeout_s, resume):
        started.append((entry["kind"], resume, round(timeout_s)))
        run_dir.mkdir(parents=True, exist_ok=resume)  # a fresh run finds no directory: the sweep cleared it
        metrics = "".join(json.dumps(r) + "\n" for r in _fake_metrics(4))
        (run_dir / "metrics.jsonl").write_text(metrics)
        (run_dir.parent / f"{run_dir.name}.log").write_text("log\n")
        now[0] += 50.0
        return {"command": ["python"], "returncode": 0, "killed": False, "wall_s": 50.0, "log_tail": []}

    monkeypatch.setattr(quality_sweep.quality, "run_one", fake_run_one)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))

    def prior(run, metrics, outcome):
        record = quality_sweep.make_record(run, shape, metrics, outcome, ENVIRONMENT)
        quality_sweep.common.write_json_atomic(results / run.filename(shape), record)

    ok = {"command": ["python"], "returncode": 0, "killed": False, "wall_s": 40.0, "log_tail": []}
    prior(runs[0], _fake_metrics(4), ok)  # done: skipped
    prior(runs[1], _fake_metrics(2, reason="time limit"), ok)  # stopped, its directory here: resumed
    prior(runs[2], [], {**ok, "returncode": 1})  # failed: skipped unless retried
    (run_dirs / f"{shape.key}__{names[1]}").mkdir(parents=True)
    (run_dirs / f"{shape.key}__{names[1]}" / "config.json").write_text("{}")
    prior(runs[3], [], {**ok, "returncode": None, "killed": True})  # killed before its first step: starts again
    (run_dirs / f"{shape.key}__{names[3]}").mkdir()  # and its leftovers are cleared first
    (run_dirs / f"{shape.key}__{names[3]}" / "config.json").write_text("{}")

    def sweep(budget_s, retry_errors=False):
        started.clear()
        return quality_sweep.sweep(
            runs,
            shape,
            results,
            run_dirs,
            budget_s=budget_s,
            retry_errors=retry_errors,
            child_env={},
            environment=ENVIRONMENT,
        )

    assert sweep(0.0) == {"skipped (recorded)": 1, "ran": 0, "not started (would not fit)": 0, "left (budget spent)": 2}
    assert started == []
    assert sweep(59.0)["left (budget spent)"] == 2 and started == []  # less than a minute: nothing starts
    # The stopped run resumes (40 s for 2 of 4 steps: 40 s to go) and takes 50 s; the other omnimoe run is now
    # expected to take what the first did in all (90 s): it would fit a slice of 120 s, but not the 70 s left.
    counts = sweep(120.0)
    assert counts == {"skipped (recorded)": 2, "ran": 1, "not started (would not fit)": 1, "left (budget spent)": 0}
    assert started == [("omnimoe", True, 120 + quality.GRACE_S)]  # the budget bounds the run
    resumed = json.loads((results / runs[1].filename(shape)).read_text())
    assert (resumed["status"], resumed["wall_s"], resumed["segments"]) == ("done", 90.0, 2)
    assert not (run_dirs / f"{shape.key}__{names[1]}").exists()  # a finished run's directory goes
    assert not (run_dirs / f"{shape.key}__{names[1]}.log").exists()
    # A slice shorter than the run's 90 s: the run could never fit one, so it starts (to resume later).
    assert sweep(60.0)["ran"] == 1 and started == [("omnimoe", False, 60 + quality.GRACE_S)]
    assert sweep(600.0)["ran"] == 0  # everything recorded: a new slice starts nothing
    assert sweep(600.0, retry_errors=True)["ran"] == 1 and started[0][0] == "dense"
    records = {r["name"]: r for r in quality_sweep.load_records(results)}
    assert {r["status"] for r in records.values()} == {"done"} and sorted(records) == sorted(names)
    out = sorted(p.name for p in (tmp_path / "out" / "quality_sweep").iterdir())
    assert out == sorted(r.filename(shape) for r in runs[1:])  # each record as it was written
    assert not [p for p in results.iterdir() if p.suffix != ".json"]  # no temporary file left behind
    assert list(run_dirs.iterdir()) == []


def test_sweep_expects_a_run_to_take_what_the_newest_of_its_kind_took():
    shape = _quick_shape()
    (run,) = _grid(["dense"], seeds=[0], learning_rates=[2e-3])[:1]

    def record(date, wall_s, status="done", steps=None):
        return {
            "shape": {"key": shape.key},
            "kind": "dense",
            "split": None,
            "date": date,
            "wall_s": wall_s,
            "status": status,
            "steps": steps,
            "planned_steps": 4,
        }

    assert quality_sweep.expected_seconds([], shape, run) is None
    old, new = record("2026-12-04T01:00:00+00:00", 299.0), record("2026-12-04T19:00:00+00:00", 60.0)
    assert quality_sweep.expected_seconds([old, new], shape, run) == 60.0  # not the old 299 s
    stopped = record("2026-12-05T00:00:00+00:00", 30.0, status="stopped", steps=1)  # 30 s for 1 of 4 steps
    assert quality_sweep.expected_seconds([new, stopped, old], shape, run) == 60.0  # a finished one first
    assert quality_sweep.expected_seconds([stopped], shape, run) == 120.0  # scaled, without one
    other = {**record("2026-12-06T00:00:00+00:00", 5.0), "kind": "omnimoe"}  # another kind's says nothing
    assert quality_sweep.expected_seconds([old, other], shape, run) == 299.0


def _record(kind, seed, lr, bits, *, multiplier=None, split=None, status="done", shape="S"):
    routing = None if kind == "dense" else {"experts_used": 0.5 + seed / 10, "load_entropy": 0.9, "max_load": 3.0}
    return {
        "shape": {"key": shape},
        "kind": kind,
        "seed": seed,
        "learning_rate": lr,
        "table_multiplier": multiplier,
        "split": None if split is None else {"intermediate_size": split[0], "K": split[1]},
        "status": status,
        "bits_per_byte": bits if status == "done" else None,
        "routing": routing,
    }


def _sweep_records(dense=(1.50, 1.52), peer=(1.49, 1.50)):
    records = []
    for seed in (0, 1):
        records += [
            _record("dense", seed, 1e-3, dense[seed]),  # mean 1.51: dense's best
            _record("dense", seed, 2e-3, (1.55, 1.53)[seed]),
            _record("dense", seed, 5e-4, (1.58, 1.56)[seed]),
            _record("omnimoe", seed, 2e-3, (1.446, 1.454)[seed], multiplier=3.0, split=(32, 40)),  # mean 1.45
            _record("omnimoe", seed, 1e-3, (1.47, 1.48)[seed], multiplier=3.0, split=(32, 40)),
            _record("deepseekmoe", seed, 2e-3, (1.47, 1.47)[seed]),
            _record("deepseekmoe", seed, 1e-3, (1.48, 1.49)[seed]),
            _record("peer", seed, 2e-3, peer[seed], multiplier=1.0),
            _record("peer", seed, 1e-3, (1.60, 1.61)[seed], multiplier=1.0),
        ]
    records.append(_record("dense", 0, 4e-3, 1.40))  # a lucky single seed: fewer seeds, never the best
    records.append(_record("omnimoe", 0, 4e-3, None, multiplier=3.0, split=(32, 40), status="diverged"))
    records.append(_record("omnimoe", 1, 4e-3, 1.30, multiplier=3.0, split=(32, 40)))
    return records


def test_sweep_combine_picks_each_kind_at_its_best_with_seed_statistics():
    configs = quality_sweep.configurations(_sweep_records())
    diverged = next(c for c in configs if c["kind"] == "omnimoe" and c["learning_rate"] == 4e-3)
    assert diverged["diverged_seeds"] == [0] and "mean" not in diverged and diverged["values"] == [None, 1.30]
    dense_1e3 = next(c for c in configs if c["kind"] == "dense" and c["learning_rate"] == 1e-3)
    assert dense_1e3["mean"] == pytest.approx(1.51) and dense_1e3["std"] == pytest.approx(0.02 / math.sqrt(2))
    assert (dense_1e3["min"], dense_1e3["max"], dense_1e3["seeds"]) == (1.50, 1.52, [0, 1])
    assert dense_1e3["experts_used"] is None
    best = {r["kind"]: r for r in quality_sweep.best_per_kind(configs)}
    assert best["dense"]["learning_rate"] == 1e-3 and best["dense"]["configurations"] == 3  # not the 1-seed 4e-3
    assert best["dense"]["learning_rates"] == [5e-4, 1e-3, 2e-3] and best["dense"]["lr_bracketed"]
    assert best["omnimoe"]["learning_rate"] == 2e-3 and not best["omnimoe"]["lr_bracketed"]
    assert best["omnimoe"]["experts_used"] == pytest.approx(0.55)  # mean over seeds 0.5, 0.6
    assert best["omnimoe"]["mean"] == pytest.approx(1.45) and best["omnimoe"]["split"] == {
        "intermediate_size": 32,
        "K": 40,
    }
    assert best["peer"]["learning_rate"] == 2e-3 and best["deepseekmoe"]["std"] == 0.0


def test_sweep_target_both_ways():
    def judged(records):
        return quality_sweep.combine(records)["targets"][0]

    met = judged(_sweep_records())
    # dense 1.51 - omnimoe 1.45 = 0.06 > 2 x the larger std (dense's 0.0141); below deepseekmoe 1.47, peer 1.495
    assert met["met"] is True and met["margin_over_dense"] == pytest.approx(0.06)
    assert met["spread"] == pytest.approx(0.02 / math.sqrt(2)) and met["beats_peer"] and met["beats_deepseekmoe"]
    close = judged(_sweep_records(dense=(1.46, 1.48)))  # margin 0.02 < 2 x 0.0141
    assert close["met"] is False and not close["beats_dense_by_two_spreads"] and close["beats_peer"]
    beaten = judged(_sweep_records(peer=(1.40, 1.41)))
    assert beaten["met"] is False and beaten["beats_dense_by_two_spreads"] and not beaten["beats_peer"]
    one_seed = [r for r in _sweep_records() if not (r["kind"] == "peer" and r["seed"] == 1)]
    assert judged(one_seed)["met"] is None and judged(one_seed)["missing"] == ["peer: 1 seed(s) at 2 learning rate(s)"]
    no_peer = judged([r for r in _sweep_records() if r["kind"] != "peer"])
    assert no_peer["met"] is None and no_peer["missing"] == ["peer: no finished configuration"]


def test_report_renders_a_combined_sweep():
    result = {
        **quality_sweep.combine([{**r, "name": f"{r['kind']}-{r['seed']}"} for r in _sweep_records()]),
        **ENVIRONMENT,
        "command": "python benchmarks/quality_sweep.py --combine",
        "sweep_commands": ["python benchmarks/quality_sweep.py --budget-minutes 8"],
    }
    result["shapes"] = {"S": {**_quick_shape().to_dict(), "key": "S"}}
    text = "\n".join(report.quality_sweep_section(result))
    assert "Measured on a 2-core CPU" in text and "`python benchmarks/quality_sweep.py --budget-minutes 8`" in text
    assert "| dense | 0.001 | - | - | 2 | 1.510 ± 0.014 | 1.500 - 1.520 | 3 | yes | - | - | - |" in text
    assert "| omnimoe | 0.002 | 3 | 32:40 | 2 | 1.450 ± 0.006 |" in text
    assert "): met: dense - omnimoe = +0.0600 bits/byte" in text and "below peer: yes" in text
    assert "| omnimoe | 0.004 | 3 | 32:40 | 0, 1 | diverged | - |" in text


@pytest.mark.slow
def test_quick_sweep_end_to_end(tmp_path):
    """Two tiny runs on the CPU into tmp_path, a second call that finds both recorded, and --combine."""
    repo = pathlib.Path(__file__).resolve().parents[1]
    results = tmp_path / "quality_sweep"
    env = {**os.environ, "PYTHONPATH": str(repo)}
    env.pop("OUT", None)
    argv = [sys.executable, str(repo / "benchmarks/quality_sweep.py"), "--quick", "--results-dir", str(results)]
    argv += ["--ffn", "dense,omnimoe", "--seeds", "0", "--learning-rates", "2e-3", "--omnimoe-splits", "32:40"]
    argv += ["--table-multipliers", "1"]

    def call(*more):
        done = subprocess.run([*argv, *more], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    first = call()
    assert "2 ran" in first
    records = {r["name"]: r for r in quality_sweep.load_records(results)}
    assert sorted(records) == ["dense-lr0.002-seed0", "omnimoe-lr0.002-tm1-i32k40-seed0"]
    for record in records.values():
        assert record["status"] == "done" and record["tokens"] == 256 and record["device"] == "cpu"
        assert 0 < record["bits_per_byte"] < 16  # four steps of a d = 16 model: a blow-up, not learning
        assert record["config"]["seed"] == 0 and record["config"]["learning_rate"] == 2e-3
    omni = records["omnimoe-lr0.002-tm1-i32k40-seed0"]
    assert 0 < omni["routing"]["experts_used"] <= 1 and omni["routing"]["max_load"] >= 1
    assert "2 skipped (recorded), 0 ran" in call()
    call("--combine")
    combined = json.loads((tmp_path / "quality_sweep.json").read_text())
    assert {r["kind"] for r in combined["rows"]} == {"dense", "omnimoe"} and combined["targets"][0]["met"] is None
    assert (tmp_path / "quality_sweep.png").stat().st_size > 0
