"""`python -m train` on a device mesh (the 8 CPU devices of tests/conftest.py) and across two processes,
through the real `train.cli.main`: the same numbers as one device, checkpoints that resume on another mesh
or on none, dropped pairs counted, two jax.distributed processes training as one.

Every run trains the same tiny model on the same small corpus with the same seed, so the one-device run
is the reference for all of them. Each token uses all N = 64 experts (K = N): then no near-tie in the top-K
can flip between two layouts whose sums differ in the last bits (one flip changes the gradients of two
expert rows, and AdamW turns even a tiny gradient into a full-size update), so the runs agree to f32
rounding. Sparse routing across shards is tested at the layer, on decisive inputs, in test_expert_parallel.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import secrets
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import assert_close, cpu_mesh

from train import cli
from train.checkpoint import Checkpoints
from train.loop import load_config, run
from train.metrics import dispatch_dropped_pairs, read_metrics
from train.steps import abstract_state

ROOT = pathlib.Path(__file__).resolve().parent.parent
MESH = "data=2,expert=4"
STEPS = 4
ALL_STEPS = list(range(1, STEPS + 1))
# 2 layers, 8 sequences of 32 tokens (one per device on the 8-device mesh), N = K = 64 experts (16 rows per
# expert shard). Every step is logged; one evaluation and one checkpoint, at the end.
OVERRIDES = [
    "--context_length=32",
    "--num_layers=2",
    "--num_heads=2",
    "--hidden_size=32",
    "--ffn.intermediate_size=64",
    "--ffn.num_experts=64",
    "--ffn.num_experts_per_token=64",
    "--batch_size=8",
    f"--steps={STEPS}",
    "--warmup_steps=1",
    "--log_every=1",
    f"--eval_every={STEPS}",
    "--eval_batches=1",
    f"--checkpoint_every={STEPS}",
]


@pytest.fixture(scope="module")
def arguments() -> list[str]:
    """The overrides of every run here: a ~12 kB stdlib file as the corpus and one random seed."""
    seed = int(os.environ.get("OMNIMOE_TEST_SEED", secrets.randbits(31))) % 2**16
    print(f"test_train_parallel seed={seed} (rerun with OMNIMOE_TEST_SEED={seed})")
    corpus = pathlib.Path(json.__file__).parent / "decoder.py"
    return [*OVERRIDES, f"--data={corpus}", f"--seed={seed}"]


@pytest.fixture(scope="module")
def one_device_run(arguments, tmp_path_factory) -> pathlib.Path:
    run_dir = tmp_path_factory.mktemp("one_device") / "run"
    assert cli.main(["--run-dir", str(run_dir), *arguments]) == 0
    return run_dir


@pytest.fixture(scope="module")
def mesh_run(arguments, tmp_path_factory) -> pathlib.Path:
    run_dir = tmp_path_factory.mktemp("mesh") / "run"
    assert cli.main(["--run-dir", str(run_dir), "--mesh", MESH, *arguments]) == 0
    return run_dir


def records(run_dir: pathlib.Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == kind]


def losses(run_dir: pathlib.Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir, "train")}


def final_params(run_dir: pathlib.Path) -> np.ndarray:
    """Every parameter of the run's step-STEPS checkpoint, restored onto one device, as one f32 vector."""
    config = load_config(run_dir)
    with Checkpoints(run_dir) as checkpoints:
        state, _ = checkpoints.restore(STEPS, abstract_state(config))
    return np.concatenate([np.asarray(leaf, np.float32).ravel() for leaf in jax.tree.leaves(state.params)])


def assert_same_training(run_dir: pathlib.Path, reference: pathlib.Path, steps: list[int], what: str) -> None:
    """Losses at `steps` and the final parameters of `run_dir` equal the reference run's (f32 tolerance)."""
    got, want = losses(run_dir), losses(reference)
    assert sorted(got) == steps, what
    assert_close(
        np.array([got[s] for s in steps]), np.array([want[s] for s in steps]), np.float32, what=f"{what}: losses"
    )
    assert_close(final_params(run_dir), final_params(reference), np.float32, what=f"{what}: final params")


def test_mesh_run_trains_like_one_device(mesh_run, one_device_run):
    assert_same_training(mesh_run, one_device_run, ALL_STEPS, "mesh data=2,expert=4")
    assert len(set(losses(mesh_run).values())) == STEPS, "every step should change the loss"
    for run_dir, mesh in ((mesh_run, {"data": 2, "expert": 4}), (one_device_run, None)):
        (start,) = records(run_dir, "start")
        assert start["mesh"] == mesh and start["processes"] == 1
        # The stored config is the layout-free one: it resumes on any mesh, or none.
        assert start["config"]["model"]["ffn"]["expert_axis"] is None
        assert [r["dropped_pairs"] for r in records(run_dir, "train")] == [0] * STEPS  # default capacity
    (got,), (want,) = records(mesh_run, "eval"), records(one_device_run, "eval")
    assert got["dropped_pairs"] == 0 and got["tokens"] == want["tokens"]
    assert_close(np.float32(got["val_loss"]), np.float32(want["val_loss"]), np.float32, what="validation loss")
    # Routing health over the sharded evaluation: the same statistics, computed from the global batch.
    for layer_got, layer_want in zip(got["routing_per_layer"], want["routing_per_layer"], strict=True):
        assert layer_got["layer"] == layer_want["layer"]
        np.testing.assert_allclose(
            [layer_got[k] for k in sorted(layer_got)], [layer_want[k] for k in sorted(layer_want)], rtol=1e-4
        )


def test_checkpoint_of_a_mesh_run_resumes_on_another_mesh_and_on_one_device(mesh_run, tmp_path):
    config = load_config(mesh_run)
    saved = tmp_path / "saved"
    assert run(config, saved, stop_at_step=1, mesh=cpu_mesh(MESH), log=print)["reason"] == "stop_at_step"
    assert Checkpoints(saved).all_steps() == [1]
    for layout in ("data=8", None):
        resumed = tmp_path / f"resumed_on_{layout}"
        shutil.copytree(saved, resumed)
        mesh_args = [] if layout is None else ["--mesh", layout]
        assert cli.main(["--run-dir", str(resumed), "--resume", *mesh_args]) == 0  # the real --resume path
        start = records(resumed, "start")[-1]
        assert start["resumed"] is True and start["step"] == 1
        assert start["mesh"] == (None if layout is None else {"data": 8, "expert": 1})
        # The straight run's next steps: same losses, same final parameters (optimizer moments restored).
        assert_same_training(resumed, mesh_run, ALL_STEPS, f"resumed on {layout}")


@pytest.mark.slow  # one more compilation of the sharded steps; the layer's exact count is in test_expert_parallel
def test_capacity_factor_drops_pairs_and_the_metrics_count_them(arguments, one_device_run, tmp_path):
    run_dir = tmp_path / "run"
    assert cli.main(["--run-dir", str(run_dir), "--mesh", MESH, "--ffn.expert_capacity_factor=0.5", *arguments]) == 0
    # Each device sends at most C = ceil(0.5 * 32 * (1 - (3/4)^64)) = 16 of its 32 tokens to each expert
    # shard, and every token needs every shard: pairs are dropped in every step, and in the evaluation.
    routed_per_step = 8 * 32 * 64 * 2  # sequences x tokens x K x OmniMoE layers
    dropped = [r["dropped_pairs"] for r in records(run_dir, "train")]
    assert len(dropped) == STEPS and all(0 < d < routed_per_step for d in dropped), dropped
    (evaluation,) = records(run_dir, "eval")
    assert 0 < evaluation["dropped_pairs"] < routed_per_step
    # Dropped pairs change the layer's output, so the losses part from the one-device run's.
    got, want = losses(run_dir), losses(one_device_run)
    assert all(np.isfinite(got[s]) for s in got) and got != want


def test_dropped_pairs_sums_what_every_layer_sowed():
    # The structure `apply(..., mutable=["intermediates"])` returns: sow keeps a tuple of values per name.
    collections = {
        "batch_stats": {},
        "intermediates": {
            "layer_0": {"ffn": {"experts": {"dispatch_dropped_pairs": (np.int32(3),)}}},
            "layer_1": {"ffn": {"experts": {"dispatch_dropped_pairs": (np.int32(5),)}}},
            "layer_2": {"ffn": {"other_metric": (np.int32(100),)}},
        },
    }
    assert int(dispatch_dropped_pairs(collections)) == 8
    assert int(dispatch_dropped_pairs({"batch_stats": {}})) == 0  # no OmniMoE layer sowed anything


PROCESS_0 = ["--num-processes", "2", "--process-id", "0"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--coordinator", "localhost:1234", "RUN"], "needs all of --coordinator, --num-processes and --process-id"),
        ([*PROCESS_0, "RUN"], "needs all of --coordinator"),
        (["--coordinator", "localhost:1", *PROCESS_0, "RUN"], "a multi-process run needs --mesh"),
        (["--coordinator", "localhost:1", *PROCESS_0, "--mesh", "data=8"], "a multi-process run needs --run-dir"),
        (
            ["--coordinator", "localhost", *PROCESS_0, "--mesh", "data=8", "RUN"],
            "coordinator_address='localhost' must be 'host:port'",
        ),
        (["--mesh", "data=3", "RUN"], r"has 3 devices \(3 x 1\) but 8 devices are available.*JAX_NUM_CPU_DEVICES=3"),
        (["--ffn.expert_capacity_factor=0.5", "RUN"], r"caps the expert-parallel dispatch: it needs --mesh with an"),
        (["--mesh", "data=8", "--ffn.expert_capacity_factor=0.5", "RUN"], r"needs --mesh with an expert axis of 2"),
        (["--mesh", "data=2,model=4", "RUN"], "tensor parallelism"),
        (["--mesh", "data=8", "--batch_size=4", "RUN"], r"batch_size=4 / grad_accum=1 = 4 sequences is not a multiple"),
        (["--mesh", "expert=8", "--ffn.num_experts=36", "RUN"], r"num_experts=36 expert rows do not divide over the 8"),
        (["--mesh", "data=2,expert=4", "--ffn=dense", "RUN"], r"needs ffn='omnimoe' .* use --mesh data=8"),
    ],
)
def test_bad_layouts_are_refused_before_anything_runs(argv, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = [arg for a in argv for arg in (["--run-dir", str(run_dir)] if a == "RUN" else [a])]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not run_dir.exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def test_two_processes_train_as_one(arguments, mesh_run, tmp_path):
    """Two `python -m train` processes of 4 CPU devices each, joined by jax.distributed on localhost."""
    run_dir = tmp_path / "run"
    address = f"localhost:{free_port()}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": "4",  # per process; the mesh spans both processes' 8 devices
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",  # as tests/conftest.py sets for this process
    }
    env.pop("XLA_FLAGS", None)
    distributed = ["--coordinator", address, "--num-processes", "2", "--mesh", MESH, "--run-dir", str(run_dir)]
    # Output to files, not pipes: a worker blocked on a full pipe while the other waits for it in a
    # collective would hang both until the timeout.
    logs = [(tmp_path / f"worker{i}.out", tmp_path / f"worker{i}.err") for i in range(2)]
    workers = []
    try:
        for i, (out_path, err_path) in enumerate(logs):
            with open(out_path, "w") as out, open(err_path, "w") as err:
                command = [sys.executable, "-m", "train", *distributed, "--process-id", str(i), *arguments]
                workers.append(subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env, cwd=tmp_path))
        for worker, (_, err_path) in zip(workers, logs, strict=True):
            worker.wait(timeout=300)
            assert worker.returncode == 0, err_path.read_text()[-3000:]
    finally:
        for worker in workers:
            worker.kill()
    outputs = [out_path.read_text() for out_path, _ in logs]
    # Process 0 alone prints progress and writes the metrics; both saved the checkpoint.
    assert f"step {STEPS:>6}/{STEPS}" in outputs[0] and "step " not in outputs[1]
    assert [r["kind"] for r in read_metrics(run_dir)].count("start") == 1
    (start,) = records(run_dir, "start")
    assert start["processes"] == 2 and start["mesh"] == {"data": 2, "expert": 4}
    assert [r["dropped_pairs"] for r in records(run_dir, "train")] == [0] * STEPS
    # The loss every process reads is the one-process run's on the same mesh, and so are the parameters.
    assert_same_training(run_dir, mesh_run, ALL_STEPS, "two processes")
