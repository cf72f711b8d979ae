"""benchmarks/quality.py's planning and bookkeeping (nothing trained or timed in the default suite), and its
--quick mode end to end (slow: a training process per kind)."""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # benchmarks/ is a folder of scripts, not a package

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
