"""Orbax checkpoints of a run: the train state (arrays) and the data sampler's RNG state (JSON).

Layout: <run_dir>/checkpoints/<step>/{state, data}. `state` is the whole `TrainState` pytree (step,
params, batch_stats, opt_state) through `StandardSave`; `data` is {"sampler": numpy bit-generator state}
through `JsonSave`. Saving is synchronous: the train step donates the state's buffers right after a save,
so an asynchronous writer could read memory that is already being overwritten.
"""

from __future__ import annotations

import pathlib
from typing import Any

import orbax.checkpoint as ocp


class Checkpoints:
    """Save, list and restore the checkpoints of one run directory, keeping the latest `keep`."""

    def __init__(self, run_dir: str | pathlib.Path, *, keep: int = 3):
        self.directory = pathlib.Path(run_dir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """(state shaped like `abstract_state`, data state) saved at `step`."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        return restored["state"], restored["data"]

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
