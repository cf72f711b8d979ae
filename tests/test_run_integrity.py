"""Runs that never lie: checkpoint integrity, the divergence guard, one writer per run directory,
recoverable directories and torn metrics lines, each built the way a user meets it: real `train` runs on
the shrunken tiny config, real byte flips and truncations in real orbax checkpoints, real second
processes and real SIGKILLs."""

from __future__ import annotations

import json
import math
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_loop import SHRUNK, BagOfBytes, shrunk_config

from train import cli, sample
from train.checkpoint import MANIFEST, Checkpoints
from train.loop import run
from train.metrics import MetricsLog, TornRecordWarning, read_metrics
from train.run_directory import RunDirectoryError, RunLock
from train.steps import abstract_state, make_init_state, make_optimizer, make_train_step

ROOT = pathlib.Path(__file__).resolve().parent.parent


def checkpoint_leaves(run_dir, step, config) -> dict[str, np.ndarray]:
    with Checkpoints(run_dir) as checkpoints:
        state, _ = checkpoints.restore(step, abstract_state(config))
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


def assert_bitwise_equal(leaves_a, leaves_b) -> None:
    assert list(leaves_a) == list(leaves_b) and len(leaves_a) > 10
    for path, a in leaves_a.items():
        np.testing.assert_array_equal(a, leaves_b[path], err_msg=path)


def largest_file(directory: pathlib.Path) -> pathlib.Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_bytes(step_dir: pathlib.Path) -> None:
    """64 bytes in the middle of the checkpoint's largest file, inverted (the issue's reproduction)."""
    path = largest_file(step_dir)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(data)


def truncate_data_file(step_dir: pathlib.Path) -> None:
    path = largest_file(step_dir)
    os.truncate(path, path.stat().st_size // 2)


def empty_metadata(step_dir: pathlib.Path) -> None:
    (step_dir / "state" / "_METADATA").write_bytes(b"")


def remove_data(step_dir: pathlib.Path) -> None:
    shutil.rmtree(step_dir / "data")


def remove_manifest(step_dir: pathlib.Path) -> None:
    (step_dir / MANIFEST).unlink()  # as if the process died between orbax's commit and the manifest


def empty_metadata_with_matching_digests(step_dir: pathlib.Path) -> None:
    # The digests match the damaged file (a save that wrote garbage): orbax itself must fail, reported.
    empty_metadata(step_dir)
    checkpoints = Checkpoints(step_dir.parent.parent)
    checkpoints._write_manifest(int(step_dir.name))
    checkpoints.close()


DAMAGES = {
    "flipped bytes": (flip_bytes, "1 file(s) changed since the save (SHA-256 differs): state/"),
    "truncated data file": (truncate_data_file, "1 file(s) changed since the save (SHA-256 differs): state/"),
    "empty _METADATA": (empty_metadata, "1 file(s) changed since the save (SHA-256 differs): state/_METADATA"),
    "missing data/": (remove_data, "2 file(s) missing: data/commit_success.txt, data/metadata"),
    "unfinished save": (remove_manifest, f"no {MANIFEST}: its save did not finish (or it predates checksummed"),
    "unrestorable": (empty_metadata_with_matching_digests, "cannot be restored ("),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_is_moved_aside_and_the_run_resumes_from_an_intact_one(
    tmp_path, small_corpus, capsys, damage
):
    config = shrunk_config(f"--data={small_corpus}")
    run_dir = tmp_path / "run"
    run(config, run_dir, log=print)
    assert Checkpoints(run_dir).all_steps() == [5, 10]
    intact = checkpoint_leaves(run_dir, 10, config)
    corrupt, reason = DAMAGES[damage]
    corrupt(run_dir / "checkpoints" / "10")
    capsys.readouterr()
    if damage == "flipped bytes":  # sampling refuses it too, rather than generate from changed weights
        assert sample.main(["--run", str(run_dir), "--max-new-tokens", "1"]) == 2
        assert f"checkpoint 10: {reason}" in capsys.readouterr().err
    assert cli.main(["--run-dir", str(run_dir), "--resume"]) == 0
    out = capsys.readouterr().out
    moved_to = str((run_dir / "bad_checkpoints" / "10").absolute())
    assert f"checkpoint 10 skipped: {reason}" in out and f"(moved to {moved_to})" in out
    assert f"resumed {run_dir} at step 5 (the newest checkpoint that verifies)" in out
    start = [r for r in read_metrics(run_dir) if r["kind"] == "start"][-1]
    assert start["resumed"] is True and start["resumed_from"] == 5 and start["step"] == 5
    [skipped] = start["skipped_checkpoints"]
    assert skipped["step"] == 10 and reason in skipped["reason"] and skipped["moved_to"] == moved_to
    assert (run_dir / "bad_checkpoints" / "10" / "state").is_dir()  # moved, never deleted
    # Steps 6..10 again from checkpoint 5: the same state the damaged checkpoint held.
    assert Checkpoints(run_dir).all_steps() == [5, 10]
    assert_bitwise_equal(checkpoint_leaves(run_dir, 10, config), intact)


def test_no_checkpoint_that_verifies_is_a_clear_error(tmp_path, small_corpus, capsys):
    config = shrunk_config(f"--data={small_corpus}")
    run_dir = tmp_path / "run"
    run(config, run_dir, log=print)
    for step in (5, 10):
        flip_bytes(run_dir / "checkpoints" / str(step))
    records = len(read_metrics(run_dir))
    assert cli.main(["--run-dir", str(run_dir), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"resume: no checkpoint of {str(run_dir)!r} verifies (moved aside: " in err
    assert sorted(p.name for p in (run_dir / "bad_checkpoints").iterdir()) == ["10", "5"]
    # Nothing was written, and the run is not taken for one that never saved (which would restart it).
    assert len(read_metrics(run_dir)) == records
    assert cli.main(["--run-dir", str(run_dir), "--resume"]) == 2
    assert "no checkpoint of" in capsys.readouterr().err
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        run(config, run_dir, log=print)


def test_the_guard_skips_a_non_finite_step_and_every_later_one(key):
    config = shrunk_config("--learning_rate=1e-2")
    model, optimizer = BagOfBytes(), make_optimizer(config)
    train_step = jax.jit(make_train_step(model, optimizer, config))
    state = make_init_state(model, optimizer, config)(jax.random.key(0))
    batch = jax.random.randint(key, (1, 8, 33), 0, 256)  # [accum, micro, L + 1]
    state, _ = train_step(state, batch)
    state, _ = train_step(state, batch)
    assert int(state.nonfinite_step) == -1 and int(state.step) == 2
    # An infinite weight: the loss and gradients are NaN, so the update must not happen.
    path, _ = jax.tree_util.tree_flatten_with_path(state.params)[0][0]
    poisoned_params = jax.tree_util.tree_map_with_path(
        lambda p, x: x.at[(0,) * x.ndim].set(jnp.inf) if p == path else x, state.params
    )
    poisoned = state.replace(params=poisoned_params)
    after, metrics = train_step(poisoned, batch)
    assert not math.isfinite(float(metrics["loss"]))
    assert int(after.nonfinite_step) == 3  # the step that would have been the third
    for a, b in zip(
        jax.tree.leaves(after.replace(nonfinite_step=0)),
        jax.tree.leaves(poisoned.replace(nonfinite_step=0)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)  # step, params, opt_state: all the state before it
    # Frozen from then on, even when a later step's numbers would be finite again.
    repaired = after.replace(params=state.params)
    later, metrics = train_step(repaired, batch)
    assert math.isfinite(float(metrics["loss"])) and int(later.nonfinite_step) == 3
    for a, b in zip(jax.tree.leaves(later), jax.tree.leaves(repaired), strict=True):
        np.testing.assert_array_equal(a, b)


def test_divergence_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, small_corpus, capsys):
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), *SHRUNK, f"--data={small_corpus}", "--learning_rate=1e6", "--grad_clip=1e9"]
    # A checkpoint every step and only one kept: rotation would have replaced the last finite one.
    assert cli.main([*args, "--checkpoint_every=1", "--keep_checkpoints=1"]) == 3
    out = capsys.readouterr().out
    end = read_metrics(run_dir)[-1]
    assert end["kind"] == "end" and end["reason"] == "non-finite loss"
    bad = end["nonfinite_step"]
    assert 2 <= bad <= 10  # step 1 has learning rate 0 (warmup starts at 0)
    assert f"stopped: step {bad} had a non-finite loss, gradient norm or update" in out
    assert f"the last checkpoint, step {bad - 1}, is kept" in out
    config = shrunk_config(f"--data={small_corpus}", "--learning_rate=1e6", "--grad_clip=1e9")
    with Checkpoints(run_dir) as checkpoints:
        assert checkpoints.all_steps() == [bad - 1]
        state, _ = checkpoints.restore(bad - 1, abstract_state(config))
    assert int(state.nonfinite_step) == -1 and int(state.step) == bad - 1
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(state))
    assert all(r["step"] < bad for r in read_metrics(run_dir) if r["kind"] == "checkpoint")


def test_a_run_that_failed_before_its_first_checkpoint_starts_again(tmp_path, small_corpus, capsys):
    config = shrunk_config(f"--data={small_corpus}")
    run_dir = tmp_path / "run"

    def fail_after_compiling(line: str) -> None:
        if line.startswith("model:"):  # the start record is written, no checkpoint yet
            raise RuntimeError("failed before the first checkpoint")

    with pytest.raises(RuntimeError, match="failed before the first checkpoint"):
        run(config, run_dir, log=fail_after_compiling)
    assert (run_dir / "config.json").is_file() and Checkpoints(run_dir).all_steps() == []
    # The same run again: not "already holds a run".
    assert run(config, run_dir, log=print)["reason"] == "done"
    assert "never saved a checkpoint: starting it again from step 0" in capsys.readouterr().out
    assert Checkpoints(run_dir).all_steps() == [5, 10]
    # Another config in such a directory is another run: refused, naming the fields.
    other = tmp_path / "other"
    with pytest.raises(RuntimeError):
        run(config, other, log=fail_after_compiling)
    with pytest.raises(RunDirectoryError, match=r"holds a run with another config \(learning_rate differ\)"):
        run(shrunk_config(f"--data={small_corpus}", "--learning_rate=3e-3"), other, log=print)
    # --resume of it starts from step 0 too.
    assert cli.main(["--run-dir", str(other), "--resume"]) == 0
    assert Checkpoints(other).all_steps() == [5, 10]


def test_resume_refuses_a_preset(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--run-dir", str(tmp_path), "--resume", "--preset", "small"])
    assert "--resume continues the run stored in --run-dir; --preset small would be ignored" in capsys.readouterr().err


def test_a_torn_metrics_line_is_skipped_by_readers_and_cut_by_a_resume(tmp_path, small_corpus, capsys):
    config = shrunk_config(f"--data={small_corpus}")
    run_dir = tmp_path / "run"
    run(config, run_dir, stop_at_step=5, log=print)
    records = read_metrics(run_dir)
    fragment = '{"kind": "train", "step": 6, "lo'  # a crash in the middle of a write
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(fragment)
    with pytest.warns(TornRecordWarning, match="skipped a torn last line"):
        assert read_metrics(run_dir) == records
    with pytest.warns(TornRecordWarning):
        assert sample.main(["--run", str(run_dir), "--max-new-tokens", "1"]) == 0
    capsys.readouterr()
    assert run(config, run_dir, resume=True, log=print)["step"] == 10
    assert f"metrics.jsonl: removed a torn last line ({len(fragment)} bytes)" in capsys.readouterr().out
    after = read_metrics(run_dir)  # no warning: filterwarnings = error would fail the test
    assert after[: len(records)] == records and after[len(records)]["kind"] == "start"
    assert all(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    # A broken line before the last is damage, not a torn write: an error naming the line.
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text("".join([lines[0], fragment + "\n", *lines[1:]]))
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON record"):
        read_metrics(run_dir)


def test_metrics_log_repair_keeps_whole_lines(tmp_path):
    log = MetricsLog(tmp_path)
    assert log.repair() == 0  # no file yet
    log.write({"kind": "a"})
    assert log.repair() == 0
    (tmp_path / "metrics.jsonl").write_bytes(b'{"kind": "a"}\n{"kin')
    assert log.repair() == 5 and (tmp_path / "metrics.jsonl").read_bytes() == b'{"kind": "a"}\n'
    (tmp_path / "metrics.jsonl").write_bytes(b'{"ki')  # the only line torn
    assert log.repair() == 4 and (tmp_path / "metrics.jsonl").read_bytes() == b""


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_manifests_are_written_once_saves_finish_and_rotation_keeps_a_verified_one(tmp_path, asynchronous):
    state = {"w": jnp.arange(4096.0), "b": jnp.ones((3, 3))}
    with Checkpoints(tmp_path, keep=2, asynchronous=asynchronous) as checkpoints:
        for step in (1, 2, 3):
            checkpoints.save(step, state, {"sampler": {"step": step}})
        checkpoints.wait_until_finished()
        assert checkpoints.all_steps() == [2, 3]
        assert all(checkpoints.verify(step) is None for step in (2, 3))
        restored, data = checkpoints.restore(3, jax.eval_shape(lambda: state))
    assert data == {"sampler": {"step": 3}}
    np.testing.assert_array_equal(restored["w"], state["w"])


def test_an_asynchronous_save_keeps_the_values_the_step_then_donates_and_overwrites(tmp_path):
    # What the loop does: save asynchronously, then at once run a step that donates the saved buffers (and
    # writes other values into them where the backend reuses them). The checkpoint holds the saved values.
    state = {"w": jnp.arange(1 << 20, dtype=jnp.float32), "b": jnp.ones((3, 3))}
    saved = jax.tree.map(lambda x: np.array(x, copy=True), state)
    overwrite = jax.jit(lambda tree: jax.tree.map(lambda x: x * 0 - 7, tree), donate_argnums=0)
    with Checkpoints(tmp_path, asynchronous=True) as checkpoints:
        checkpoints.save(1, state, {"sampler": {"step": 1}})
        state = overwrite(state)
        for _ in range(3):
            state = overwrite(state)
        jax.block_until_ready(state)
        checkpoints.wait_until_finished()
        restored, _ = checkpoints.restore(1, jax.eval_shape(lambda: saved))
    for name, want in saved.items():
        np.testing.assert_array_equal(restored[name], want, err_msg=name)


def test_poll_records_a_save_once_it_has_finished_in_the_background(tmp_path):
    state = {"w": jnp.arange(4096.0)}
    with Checkpoints(tmp_path, asynchronous=True) as checkpoints:
        checkpoints.save(1, state, {"sampler": {"step": 1}})
        assert checkpoints.verify(1) is not None  # no manifest until the save is known to have finished
        deadline = time.monotonic() + 60
        while checkpoints._manager.is_saving_in_progress():  # orbax's own view of its background save
            assert time.monotonic() < deadline, "the background save did not finish in 60 s"
            time.sleep(0.01)
        assert checkpoints.verify(1) is not None  # finished, but not yet recorded
        checkpoints.poll()
        assert checkpoints.verify(1) is None


def test_the_lock_names_its_holder(tmp_path):
    with RunLock(tmp_path), pytest.raises(RunDirectoryError, match=f"is in use: process {os.getpid()} holds"):
        RunLock(tmp_path).__enter__()
    with RunLock(tmp_path):  # released on exit
        pass


# ---- real processes ------------------------------------------------------------------------------------


def start_train(args: list[str], log_path: pathlib.Path) -> subprocess.Popen:
    # The child runs under this process's jax settings (conftest sets them), so that its steps and those
    # resumed here are bitwise comparable: a product at the default matmul precision need not equal the
    # "highest"-precision one bit for bit (without this setting the exact-resume check fails on main).
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "JAX_PLATFORMS": "cpu",
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",
        "JAX_NUM_CPU_DEVICES": "8",
    }
    with log_path.open("w") as log:  # the child holds its own descriptor
        return subprocess.Popen([sys.executable, "-m", "train", *args], stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the training process exited ({process.returncode}) before {what}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def verified_steps(run_dir: pathlib.Path) -> list[int]:
    return sorted(int(p.parent.name) for p in (run_dir / "checkpoints").glob(f"*/{MANIFEST}"))


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def test_one_writer_sigkill_recovery_and_exact_resume(tmp_path, small_corpus, capsys):
    config = shrunk_config(f"--data={small_corpus}", "--checkpoint_every=1")
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), *SHRUNK, f"--data={small_corpus}", "--checkpoint_every=1"]
    # 1. SIGKILL while compiling: config.json is written, no checkpoint. The same command starts again.
    first = start_train(args, tmp_path / "first.log")
    wait_for(lambda: (run_dir / "config.json").is_file(), first, "config.json")
    kill(first)
    assert not verified_steps(run_dir)
    second = start_train(args, tmp_path / "second.log")
    try:
        # 2. While it holds the run directory, a second writer is refused, naming it.
        wait_for(lambda: (run_dir / "lock").read_text().strip() == str(second.pid), second, "the lock")
        assert cli.main(["--run-dir", str(run_dir), "--resume"]) == 2
        assert f"is in use: process {second.pid} holds" in capsys.readouterr().err
        # 3. SIGKILL amid its checkpoints (one every step): it leaves no stale lock, and the resume is exact.
        wait_for(lambda: len(verified_steps(run_dir)) >= 3, second, "three checkpoints")
        kill(second)
    finally:
        second.kill()
    log = (tmp_path / "second.log").read_text()
    assert "never saved a checkpoint: starting it again from step 0" in log, log
    killed_at = verified_steps(run_dir)[-1]
    assert killed_at < 10, "the process finished before it was killed: nothing was tested"
    assert cli.main(["--run-dir", str(run_dir), "--resume"]) == 0
    start = [r for r in read_metrics(run_dir) if r["kind"] == "start"][-1]
    assert start["resumed_from"] >= killed_at - 1  # the newest verified one (a newer save may have finished)
    straight = tmp_path / "straight"
    run(config, straight, log=print)
    assert_bitwise_equal(checkpoint_leaves(run_dir, 10, config), checkpoint_leaves(straight, 10, config))


@pytest.mark.slow
def test_thirty_sigkills_during_checkpointing_then_an_exact_state(tmp_path, small_corpus, seed):
    """The soak: a checkpoint every step, SIGKILL at random moments of 30 resumed runs (each once it has
    saved, so the kills land amid checkpointing), then the state is bitwise the uninterrupted run's."""
    rng = random.Random(seed)
    steps = 300  # enough that 30 kills, each a few steps after a save, never reach the end
    extra = [f"--data={small_corpus}", "--checkpoint_every=1", f"--steps={steps}", "--log_every=1"]
    run_dir = tmp_path / "run"
    for kill_number in range(30):
        # The first run starts it (again, if killed before its first checkpoint); the others resume it.
        started = verified_steps(run_dir) or list((run_dir / "bad_checkpoints").glob("*"))
        command = ["--resume"] if started else [*SHRUNK, *extra]
        log_path = tmp_path / f"{kill_number}.log"
        before = verified_steps(run_dir)
        process = start_train(["--run-dir", str(run_dir), *command], log_path)
        try:
            wait_for(lambda b=before: verified_steps(run_dir) != b, process, "a save")
            time.sleep(rng.uniform(0.0, 0.3))
            assert process.poll() is None, (
                f"finished before kill {kill_number + 1}: raise steps\n{log_path.read_text()}"
            )
            kill(process)
        finally:
            process.kill()
    assert cli.main(["--run-dir", str(run_dir), "--resume"]) == 0
    config = shrunk_config(*extra)
    straight = tmp_path / "straight"
    run(config, straight, log=print)
    assert_bitwise_equal(checkpoint_leaves(run_dir, steps, config), checkpoint_leaves(straight, steps, config))
