"""grad_accum "auto" and the memory check of the train step (`train.memory`), on a shrunken tiny preset.

The device's limit is injected (`limit_bytes`, or `train.memory.device_memory_limit` patched for whole runs)
at values placed between the XLA estimates of the steps themselves, so the tests hold on any host.
"""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
from helpers import SHRUNK, cpu_mesh, shrunk_config

from train import cli
from train import memory as memory_lib
from train.checkpoint import Checkpoints
from train.loop import load_config, run
from train.memory import FIT_FRACTION, GB, StepDoesNotFitError, fit_train_step, grad_accum_candidates
from train.metrics import read_metrics
from train.steps import abstract_state, build_steps, compiled_train_step


@pytest.fixture(scope="module")
def estimates() -> dict[int, int]:
    """{grad_accum: XLA's estimate of the shrunken step} for 1, 2, 4, 8 (compiled once: the fits reuse them)."""
    ample = 2**60
    found = {
        g: fit_train_step(shrunk_config(f"--grad_accum={g}"), limit_bytes=ample)[3].estimate_bytes for g in (1, 2, 4, 8)
    }
    # What the tests below rely on: more micro-batches, smaller micro-batches, less memory.
    assert found[1] > found[2] > found[4] > found[8] > 0, found
    return found


def test_candidates_divide_the_batch_into_micro_batches_the_mesh_splits():
    assert grad_accum_candidates(8) == [1, 2, 4, 8]
    # Powers of two, then the smallest micro-batch where none gives it: "auto" never refuses before trying it.
    assert grad_accum_candidates(12) == [1, 2, 4, 12]
    assert grad_accum_candidates(1) == [1]
    assert grad_accum_candidates(16, batch_shards=4) == [1, 2, 4]
    assert grad_accum_candidates(24, batch_shards=4) == [1, 2, 6]
    assert grad_accum_candidates(8, batch_shards=3) == []


def test_auto_takes_one_micro_batch_when_memory_is_ample(estimates):
    config, steps, compiled, fit = fit_train_step(shrunk_config("--grad_accum=auto"), limit_bytes=2**60)
    assert config == shrunk_config("--grad_accum=1")
    assert (fit.requested, fit.grad_accum, fit.estimate_bytes) == ("auto", 1, estimates[1])
    assert fit.tried == ((1, estimates[1]),)  # the first that fits: nothing more is compiled
    assert steps is build_steps(config)
    assert compiled is compiled_train_step(steps, (1, 8, 33))  # the executable the loop trains with


def test_auto_takes_more_micro_batches_when_the_limit_is_small(estimates):
    limit = (estimates[2] + estimates[4]) / 2 / FIT_FRACTION  # 4 fits within the margin, 2 does not
    config, steps, compiled, fit = fit_train_step(shrunk_config("--grad_accum=auto"), limit_bytes=limit)
    assert config.grad_accum == 4 and config.micro_batch_size == 2
    assert fit.tried == tuple((g, estimates[g]) for g in (1, 2, 4))
    assert compiled is compiled_train_step(steps, (4, 2, 33))
    record = fit.to_dict()
    assert record["requested_grad_accum"] == "auto" and record["grad_accum"] == 4
    assert record["estimate_gb"] == float(f"{estimates[4] / GB:.3g}")
    assert [g for g, _ in record["tried"]] == [1, 2, 4]
    assert "grad_accum 4 (auto)" in fit.summary()


def test_auto_keeps_a_margin_below_the_limit(estimates):
    # Exactly at the limit: an int runs (it fits), "auto" wants FIT_FRACTION of it and takes the next.
    fit = fit_train_step(shrunk_config("--grad_accum=auto"), limit_bytes=estimates[1])[3]
    assert fit.grad_accum > 1
    assert fit_train_step(shrunk_config("--grad_accum=1"), limit_bytes=estimates[1])[3].grad_accum == 1


def test_auto_refuses_when_nothing_fits_with_the_largest_estimate(estimates):
    limit = estimates[8] / 2
    with pytest.raises(StepDoesNotFitError) as raised:
        fit_train_step(shrunk_config("--grad_accum=auto"), limit_bytes=limit)
    message = str(raised.value)
    assert "grad_accum=8 (micro-batches of 1 sequences)" in message
    assert f"{estimates[8] / GB:.3g} GB" in message and f"{limit / GB:.3g} GB" in message
    assert (raised.value.estimate_bytes, raised.value.limit_bytes) == (estimates[8], limit)


def test_an_int_grad_accum_that_cannot_fit_is_refused(estimates):
    limit = estimates[2] - 1
    with pytest.raises(StepDoesNotFitError) as raised:
        fit_train_step(shrunk_config("--grad_accum=2"), limit_bytes=limit)
    message = str(raised.value)
    assert re.search(
        rf"grad_accum=2 .*needs an estimated {estimates[2] / GB:.3g} GB, more than the device's {limit / GB:.3g} GB",
        message,
    )
    assert "try --grad_accum=auto or a larger grad_accum" in message
    fit = fit_train_step(shrunk_config("--grad_accum=4"), limit_bytes=limit)[3]  # a larger one fits
    assert fit.tried == ((4, estimates[4]),)  # one compilation, no search


def test_auto_on_a_mesh_tries_only_micro_batches_it_splits():
    mesh = cpu_mesh("data=8")
    config = shrunk_config("--grad_accum=auto", "--batch_size=16")
    with (
        jax.set_mesh(mesh),
        pytest.raises(StepDoesNotFitError, match=r"estimates by grad_accum: 1: [\d.e-]+ GB, 2: [\d.e-]+ GB\)"),
    ):
        fit_train_step(config, mesh, limit_bytes=1)
    with jax.set_mesh(mesh):
        config, _, _, fit = fit_train_step(config, mesh, limit_bytes=2**60)
    assert config.grad_accum == fit.grad_accum == 1


def test_the_device_limit_is_the_allocator_s_or_the_host_s():
    limit = memory_lib.device_memory_limit()
    stats = jax.local_devices()[0].memory_stats()
    if stats and stats.get("bytes_limit"):
        assert limit == stats["bytes_limit"]
    else:  # a CPU: the host's physical memory, shared by its CPU devices (tests/conftest.py asks for eight)
        assert 0 < limit * len(jax.local_devices(backend="cpu")) <= 2**50


def test_a_run_that_cannot_fit_writes_no_config_and_auto_then_trains(
    tmp_path, small_corpus, estimates, monkeypatch, capsys
):
    monkeypatch.setattr(memory_lib, "device_memory_limit", lambda: estimates[2] - 1)
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), *SHRUNK, f"--data={small_corpus}", "--steps=2", "--warmup_steps=1"]
    assert cli.main([*args, "--grad_accum=1"]) == 2
    assert "try --grad_accum=auto or a larger grad_accum" in capsys.readouterr().err
    assert not (run_dir / "config.json").exists()  # refused before the run directory held a run
    assert cli.main([*args, "--grad_accum=auto"]) == 0  # the same directory
    assert load_config(run_dir).grad_accum == 4  # stored as the int chosen
    (start,) = [r for r in read_metrics(run_dir) if r["kind"] == "start"]
    assert start["config"]["grad_accum"] == 4
    assert start["memory"]["requested_grad_accum"] == "auto" and start["memory"]["grad_accum"] == 4
    assert start["memory"]["estimate_gb"] == float(f"{estimates[4] / GB:.3g}")
    assert "grad_accum 4 (auto), step estimated at" in capsys.readouterr().out
    # Resumed on a device where the stored 4 no longer fits: a resume keeps grad_accum, so the refusal says
    # what can be done instead of suggesting a flag the resume would refuse.
    monkeypatch.setattr(memory_lib, "device_memory_limit", lambda: estimates[4] - 1)
    assert cli.main(["--run-dir", str(run_dir), "--resume", "--steps=3"]) == 2
    err = capsys.readouterr().err
    assert "grad_accum=4" in err and "a resumed run keeps its grad_accum (config.json)" in err
    assert "try --grad_accum=auto" not in err
    assert load_config(run_dir).steps == 2  # the refused resume changed nothing


def test_resume_of_an_auto_run_keeps_its_grad_accum_exactly(tmp_path, small_corpus, seed, estimates, monkeypatch):
    common = (f"--data={small_corpus}", f"--seed={seed % 2**16}")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(shrunk_config(*common, "--grad_accum=2"), straight, log=print)["step"] == 10
    auto = shrunk_config(*common, "--grad_accum=auto")
    with monkeypatch.context() as patch:  # "auto" chooses 2 on this device
        patch.setattr(memory_lib, "device_memory_limit", lambda: (estimates[1] + estimates[2]) / 2 / FIT_FRACTION)
        assert run(auto, split, stop_at_step=4, log=print)["reason"] == "stop_at_step"
    assert load_config(split).grad_accum == 2
    # Memory is ample now, where "auto" would choose 1: the resumed run keeps the run's 2, given "auto" (run)...
    assert run(auto, split, resume=True, stop_at_step=6, log=print)["reason"] == "stop_at_step"
    assert cli.main(["--run-dir", str(split), "--resume"]) == 0  # ... or its stored config (the command line)
    assert load_config(split) == load_config(straight)
    states = []
    for run_dir in (straight, split):
        with Checkpoints(run_dir) as checkpoints:
            states.append(checkpoints.restore(10, abstract_state(load_config(run_dir))))
    (state_a, data_a), (state_b, data_b) = states
    assert data_a == data_b
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise
    starts = [r for r in read_metrics(split) if r["kind"] == "start"]
    assert [(s["memory"]["requested_grad_accum"], s["memory"]["grad_accum"]) for s in starts] == [
        ("auto", 2),
        (2, 2),
        (2, 2),
    ]
    assert json.loads((split / "config.json").read_text())["grad_accum"] == 2


def test_every_process_fits_the_smallest_limit_of_the_job(monkeypatch):
    # Each process reads its own device's limit; a job whose processes chose different grad_accums would
    # train different steps, so they agree on the smallest (in MiB, as int32 travels between processes).
    gathered = []

    def allgather(value):
        gathered.append(value)
        return np.asarray([value, 3 * 1024, 5 * 1024], np.int32)  # this process and two others, MiB

    monkeypatch.setattr(jax, "process_count", lambda: 3)
    monkeypatch.setattr(memory_lib.multihost_utils, "process_allgather", allgather)
    assert memory_lib.agreed_memory_limit(80 * 2**30) == 3 * 2**30
    assert gathered[0].dtype == np.int32 and int(gathered[0]) == 80 * 1024
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    assert memory_lib.agreed_memory_limit(12345) == 12345
