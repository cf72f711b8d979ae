"""Sharded training of a tiny OmniMoE model: resharding checkpoint restores, and two jax.distributed
processes on localhost agreeing with one process (8 CPU devices in all)."""

import contextlib
import functools
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from helpers import assert_close
from parallel_model import Trainer, cpu_mesh, make_batch, tiny_config

from omnimoe_jax import parallel

TESTS = pathlib.Path(__file__).resolve().parent


@functools.cache
def trainer(spec: str | None) -> Trainer:
    """One Trainer per mesh spec (None: one device, no mesh), so tests share its compiled steps."""
    return Trainer(tiny_config(), None if spec is None else cpu_mesh(spec))


def on(trainer: Trainer):
    """The context its steps run in: the trainer's mesh, or none for the one-device trainer."""
    return jax.set_mesh(trainer.mesh) if trainer.mesh is not None else contextlib.nullcontext()


def train(trainer: Trainer, steps: int) -> list[float]:
    with on(trainer):
        state = trainer.init(jax.random.key(0))
        losses = []
        for step in range(steps):
            state, metrics = trainer.step(state, trainer.put_batch(make_batch(step)))
            losses.append(float(metrics["loss"]))
            assert int(metrics["dropped_pairs"]) == 0
    return losses


def test_checkpoint_saved_on_one_mesh_restores_on_others_and_training_continues(tmp_path):
    source = trainer("data=2,expert=4")
    with on(source):
        state = source.init(jax.random.key(0))
        state, _ = source.step(state, source.put_batch(make_batch(0)))
    manager = ocp.CheckpointManager(tmp_path)
    manager.save(1, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    saved = jax.device_get(state)
    abstract = jax.eval_shape(lambda s: s, state)
    with on(source):
        next_state, metrics = source.step(state, source.put_batch(make_batch(1)))
    want_loss, want_params = float(metrics["loss"]), jax.device_get(next_state["params"])

    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    targets = {
        "data=8": parallel.abstract_state(abstract, trainer("data=8").mesh),
        None: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one_device), abstract),
    }
    for spec, target in targets.items():
        restored = manager.restore(1, args=ocp.args.StandardRestore(target))
        for got, want, expect in zip(*map(jax.tree.leaves, (restored, saved, target)), strict=True):
            assert got.sharding.is_equivalent_to(expect.sharding, got.ndim), spec
            np.testing.assert_array_equal(got, want)
        resumed = trainer(spec)
        with on(resumed):
            new_state, metrics = resumed.step(restored, resumed.put_batch(make_batch(1)))
        # Same loss, and the same update: the optimizer moments came back too.
        assert_close(metrics["loss"], want_loss, np.float32, what=f"loss after restoring onto {spec}")
        for got, want in zip(jax.tree.leaves(new_state["params"]), jax.tree.leaves(want_params), strict=True):
            assert_close(got, want, np.float32, what=f"params after one step on {spec}")
    manager.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def worker_args(process_id: int) -> list[str]:
    return ["--num-processes", "2", "--process-id", str(process_id), "--steps", "3"]


def test_two_processes_train_in_step_and_match_one_process():
    address = f"localhost:{free_port()}"
    path = os.pathsep.join(p for p in (str(TESTS.parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    env.pop("XLA_FLAGS", None)  # device counts come from initialize_distributed, not the parent's flags
    workers = [
        subprocess.Popen(
            [sys.executable, str(TESTS / "distributed_worker.py"), "--coordinator", address, *worker_args(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    # Meanwhile, the same run in this process over its own 8 devices.
    want = train(trainer("data=2,expert=4"), 3)
    reports = []
    try:
        for worker in workers:
            out, err = worker.communicate(timeout=240)
            assert worker.returncode == 0, err[-3000:]
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for worker in workers:
            worker.kill()
    for index, report in enumerate(reports):
        assert report["process_index"] == index and report["process_count"] == 2
        assert report["global_devices"] == 8 and report["local_devices"] == 4
        assert report["dropped_pairs"] == [0, 0, 0]
    # Both processes read the same replicated loss; it matches the one-process run.
    assert reports[0]["losses"] == reports[1]["losses"]
    for step, (got, ref) in enumerate(zip(reports[0]["losses"], want, strict=True)):
        assert_close(np.float32(got), np.float32(ref), np.float32, what=f"loss at step {step}")
    assert len(set(want)) == 3, "three steps should give three different losses"
