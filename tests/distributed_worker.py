"""One process of a multi-process CPU training run (started by tests/test_parallel_training.py).

    python tests/distributed_worker.py --coordinator localhost:PORT --num-processes 2 --process-id I

Joins the job with `parallel.initialize_distributed` (4 CPU devices per process), trains the tiny model of
tests/parallel_model.py for a few steps on a mesh over all processes' devices, and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # parallel_model beside this file

import jax
from parallel_model import Trainer, make_batch, tiny_config

from omnimoe_jax import parallel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--local-devices", type=int, default=4)
    parser.add_argument("--mesh", default="data=2,expert=4")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    parallel.initialize_distributed(
        args.coordinator,
        args.num_processes,
        args.process_id,
        local_device_count=args.local_devices,
        initialization_timeout=120,
    )
    jax.config.update("jax_default_matmul_precision", "highest")  # as in tests/conftest.py

    mesh = parallel.make_mesh(args.mesh)
    trainer = Trainer(tiny_config(), mesh)
    losses, dropped = [], []
    with jax.set_mesh(mesh):
        state = trainer.init(jax.random.key(0))
        for step in range(args.steps):
            state, metrics = trainer.step(state, trainer.put_batch(make_batch(step)))
            losses.append(float(metrics["loss"]))
            dropped.append(int(metrics["dropped_pairs"]))
    report = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "global_devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "losses": losses,
        "dropped_pairs": dropped,
    }
    print(json.dumps(report), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
