"""Orbax checkpoints of a run: the train state (arrays) and the data sampler's RNG state (JSON), each one
verified before it is trusted.

Layout: <run_dir>/checkpoints/<step>/{state, data, sha256sums.json}. `state` is the whole `TrainState`
pytree (step, params, batch_stats, opt_state) through `StandardSave`; `data` is {"sampler": numpy
bit-generator state} through `JsonSave`.

Integrity: orbax's save is atomic (it writes a temporary directory and renames it), but nothing checks the
files afterwards: a flipped byte restores silently as a changed parameter. So once a save has finished
(synchronously, or at the next wait point of an asynchronous save), `sha256sums.json` records the SHA-256
of every file of the step; a checkpoint is trusted only if every recorded file is there with its digest
and orbax restores it. A step without the manifest (the process died between orbax's commit and the
manifest) counts as unfinished. `restore_latest` moves each checkpoint that fails to
<run_dir>/bad_checkpoints/<step> (never deletes it), reporting step and reason, and restores the newest
one that verifies.

Rotation (`keep`) is done here rather than by orbax, after the new step's manifest is written, so the
newest verified checkpoint is never deleted before its successor is verified.

Asynchronous saving (`asynchronous=True`, what the training loop uses) is orbax's: `save` returns once the
arrays are copied off the device (its blocking part), and the files are written on a background thread. So
the train step may donate and overwrite the saved state's buffers right after `save` returns (tested). A
save's manifest is written once it has finished: at the next `poll` that finds it done, `save`,
`wait_until_finished` or `close`; a process killed before then leaves that step without a manifest, which
`--resume` passes over for the previous one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from train.run_directory import RunDirectoryError

MANIFEST = "sha256sums.json"
BAD_DIRECTORY = "bad_checkpoints"


class CheckpointError(RunDirectoryError):
    """A checkpoint that cannot be trusted: it fails verification or cannot be restored."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint {step}: {reason}")
        self.step, self.reason = step, reason


@dataclasses.dataclass(frozen=True)
class SkippedCheckpoint:
    """A checkpoint `restore_latest` passed over: its step, why, and where it now lies (None if it was
    left in place, as a process other than the primary leaves it)."""

    step: int
    reason: str
    moved_to: str | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(step_dir: pathlib.Path) -> dict[str, str]:
    """{path relative to `step_dir`: SHA-256 hex} of every file of one checkpoint but the manifest."""
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.relative_to(step_dir).as_posix() != MANIFEST)
    return {p.relative_to(step_dir).as_posix(): _sha256(p) for p in files}


class Checkpoints:
    """Save, list, verify and restore the checkpoints of one run directory, keeping the latest `keep`."""

    def __init__(self, run_dir: str | pathlib.Path, *, keep: int = 3, asynchronous: bool = False):
        self.run_dir = pathlib.Path(run_dir).absolute()
        self.directory = self.run_dir / "checkpoints"
        self.bad_directory = self.run_dir / BAD_DIRECTORY
        self.keep = keep
        self.asynchronous = asynchronous
        # max_to_keep=None: rotation is ours (`_finish`), after the successor's manifest exists.
        options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=asynchronous, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
        self._pending: list[int] = []  # saved steps whose manifest is not written yet

    def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
        """Save `step`; its manifest is written once the save has finished (at once unless asynchronous,
        else at the next `poll` that finds it done, `save`, `wait_until_finished` or `close`)."""
        self.wait_until_finished()
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        self._manager.save(step, args=args, force=True)
        self._pending.append(step)
        if not self.asynchronous:
            self.wait_until_finished()

    def wait_until_finished(self) -> None:
        """Wait for a save in flight, then write the manifests of the finished steps and rotate."""
        self._manager.wait_until_finished()
        if not self._pending:
            return
        for step in self._pending:
            if jax.process_index() == 0:  # the files of every process are in place once orbax has finished
                self._write_manifest(step)
        self._pending = []
        # orbax's own list of steps, not a fresh listing: it is the same in every process, and each delete
        # is a barrier every process must reach
        for step in self.all_steps()[: -self.keep]:
            self._manager.delete(step)

    def poll(self) -> None:
        """Finish (manifest, rotation) a save that has completed in the background, without waiting for one
        still in flight. Single-process runs only: in a multi-process run rotation's deletes are barriers
        that every process must reach together, and processes may see a save finish at different steps, so
        there a save is finished at the next `save` or `close`, which all processes reach in step."""
        if self._pending and jax.process_count() == 1 and not self._manager.is_saving_in_progress():
            self.wait_until_finished()

    def _write_manifest(self, step: int) -> None:
        step_dir = self.step_directory(step)
        manifest = {"step": step, "sha256": file_digests(step_dir)}
        temporary = step_dir / (MANIFEST + ".tmp")
        temporary.write_text(json.dumps(manifest, indent=1) + "\n")
        temporary.rename(step_dir / MANIFEST)  # atomic: a manifest is whole or absent

    def step_directory(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def moved_aside(self) -> list[pathlib.Path]:
        """The checkpoints of this run that failed verification and were moved aside."""
        return sorted(self.bad_directory.iterdir()) if self.bad_directory.is_dir() else []

    def verify(self, step: int) -> str | None:
        """Why checkpoint `step` cannot be trusted, or None if every file matches its recorded digest."""
        step_dir = self.step_directory(step)
        try:
            manifest = json.loads((step_dir / MANIFEST).read_text())
            recorded = manifest["sha256"]
            if not isinstance(recorded, dict) or not recorded:
                raise ValueError(f"'sha256' holds {recorded!r}, not a table of file digests")
        except FileNotFoundError:
            return f"no {MANIFEST}: its save did not finish (or it predates checksummed checkpoints)"
        except (OSError, ValueError, KeyError, TypeError) as err:
            return f"{MANIFEST} is unreadable ({type(err).__name__}: {err})"
        missing, changed = [], []
        for name, digest in sorted(recorded.items()):
            path = step_dir / name
            try:
                actual = _sha256(path)
            except FileNotFoundError:
                missing.append(name)
                continue
            except OSError as err:
                return f"{name} is unreadable ({err})"
            if actual != digest:
                changed.append(name)
        if missing:
            return f"{len(missing)} file(s) missing: {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}"
        if changed:
            shown = ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else "")
            return f"{len(changed)} file(s) changed since the save (SHA-256 differs): {shown}"
        return None

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """(state shaped like `abstract_state`, data state) saved at `step`; CheckpointError if it does
        not verify or cannot be restored."""
        if step not in self.all_steps():
            raise CheckpointError(step, f"no such checkpoint in {str(self.directory)!r}; steps: {self.all_steps()}")
        reason = self.verify(step)
        if reason is not None:
            raise CheckpointError(step, reason)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as err:  # orbax/TensorStore raise many kinds; each means "cannot be restored"
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise CheckpointError(step, f"cannot be restored ({type(err).__name__}: {first_line})") from err
        return restored["state"], restored["data"]

    def latest_verified_step(self) -> int | None:
        """The newest step that verifies (its files' digests; nothing restored, nothing moved)."""
        return next((step for step in reversed(self.all_steps()) if self.verify(step) is None), None)

    def restore_latest(
        self, abstract_state: Any, *, move_aside: bool = True
    ) -> tuple[int | None, Any, dict[str, Any] | None, list[SkippedCheckpoint]]:
        """(step, state, data state, skipped) of the newest checkpoint that verifies and restores; step None
        (and state None) if none does. Each newer one that fails is moved to bad_checkpoints/ (with
        `move_aside`) and listed in `skipped`."""
        skipped = []
        for step in reversed(self.all_steps()):
            try:
                state, data_state = self.restore(step, abstract_state)
            except CheckpointError as err:
                moved_to = self._move_aside(step) if move_aside else None
                skipped.append(SkippedCheckpoint(step, err.reason, moved_to))
                continue
            self._forget_moved()
            return step, state, data_state, skipped
        self._forget_moved()
        return None, None, None, skipped

    def _forget_moved(self) -> None:
        """Drop the moved-aside steps from orbax's list, in every process once the primary has moved them."""
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("checkpoints moved aside")
        self._manager.reload()

    def _move_aside(self, step: int) -> str:
        self.bad_directory.mkdir(exist_ok=True)
        target = self.bad_directory / str(step)
        suffix = 1
        while target.exists():  # the same step may fail again after a later run saved it anew
            target, suffix = self.bad_directory / f"{step}.{suffix}", suffix + 1
        self.step_directory(step).rename(target)
        return str(target)

    def close(self) -> None:
        self.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
