"""`run`: the imperative driver of a training run, over the pure steps of `train.steps`.

It loads the corpus (`train.data`), builds and compiles the steps (`train.memory`: grad_accum "auto" resolved,
a step whose memory estimate cannot fit refused before anything is written), restores or starts the TrainState
(`train.checkpoint`), then feeds it batches (`train.prefetch`), stopping on `steps`, `stop_at_step`, a
signal, the time limit or a non-finite loss (`train.divergence`), and writes metrics.jsonl through the
`log_<kind>` functions of `train.metrics`, which document every record and print its console line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from train import data as data_lib
from train import divergence
from train import memory as memory_lib
from train import mesh as mesh_lib
from train import metrics as metrics_lib
from train import progress as progress_lib
from train import tokenizer as tokenizer_lib
from train.checkpoint import Checkpoints
from train.config import AUTO_GRAD_ACCUM, TrainConfig
from train.metrics import MetricsLog, evaluate
from train.prefetch import BatchPrefetcher
from train.run_directory import RunDirectoryError, RunLock
from train.steps import RECORDING_FIELDS, TrainState, abstract_state


def load_config(run_dir: str | pathlib.Path) -> TrainConfig:
    """The TrainConfig a run stored in <run_dir>/config.json."""
    path = pathlib.Path(run_dir) / "config.json"
    if not path.is_file():
        raise RunDirectoryError(f"{str(path)!r} does not exist: {str(run_dir)!r} is not a run directory")
    return TrainConfig.from_dict(json.loads(path.read_text()))


class _StopFlag:
    """Set by SIGINT/SIGTERM (the loop then saves a checkpoint and exits); a second signal acts as usual."""

    def __init__(self):
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        self.reason = signal.Signals(signum).name
        print(f"\n{self.reason}: saving a checkpoint after this step (send it again to abort)", flush=True)
        self._restore()

    def _restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopFlag]:
        # Python delivers signals to the main thread only; elsewhere (a worker thread) run without handlers.
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            self._restore()


def run(
    config: TrainConfig,
    run_dir: str | pathlib.Path,
    *,
    resume: bool = False,
    stop_at_step: int | None = None,
    log: Callable[[str], None] | None = None,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """Train `config` in `run_dir` (new, or resumed from its latest checkpoint). Returns a summary dict.

    Resuming restores params, optimizer state, batch_stats, step and the data sampler's RNG, so the rest
    of the run is exactly what an uninterrupted run would have done. `stop_at_step` ends the run early
    (with a checkpoint) once that many steps are done, as a signal or the time limit would.

    grad_accum "auto" is resolved by `train.memory.fit_train_step` and config.json stores the int it chose (a
    resumed run given "auto" takes the stored one); `train.memory.StepDoesNotFitError` when the step's memory
    estimate cannot fit the device, raised before the run directory holds a config.

    `mesh`: train data + expert parallel on it (`train.mesh`; None = one device). A run may resume on
    another mesh, or none: the checkpoint is restored with the new layout. In a multi-process job every
    process calls `run` with the same arguments; process 0 alone writes config.json, metrics.jsonl and `log`
    lines, and all of them save and restore the checkpoints.
    """
    started = time.perf_counter()
    deadline = started + 60 * config.time_limit_minutes if config.time_limit_minutes else math.inf
    console = log is None and mesh_lib.is_primary()  # our own console: a progress bar if it is a terminal
    log = (log or functools.partial(print, flush=True)) if mesh_lib.is_primary() else (lambda line: None)
    run_dir = pathlib.Path(run_dir)
    if resume and config.grad_accum == AUTO_GRAD_ACCUM and (run_dir / "config.json").is_file():
        # The stored config holds the grad_accum "auto" chose for this run: resuming exactly trains with it.
        config = dataclasses.replace(config, grad_accum=load_config(run_dir).grad_accum)
    if mesh is not None:
        mesh_lib.check_mesh(config, mesh)
    corpus, sampler, eval_batches = _prepare_data(config, log)  # fails before anything is compiled
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.tokenizer is not None and mesh_lib.is_primary():
        tokenizer_lib.store(config.tokenizer, run_dir)  # train.sample encodes and decodes with the copy
    metrics_log = MetricsLog(run_dir, enabled=mesh_lib.is_primary())
    with (
        RunLock(run_dir, enabled=mesh_lib.is_primary()),  # before anything in run_dir is written
        # Asynchronous: a save blocks the loop only while the state is copied off the device.
        Checkpoints(run_dir, keep=config.keep_checkpoints, asynchronous=True) as checkpoints,
        _StopFlag().installed() as stop,
        contextlib.ExitStack() as stack,
        progress_lib.Progress(config.steps, enabled=None if console else False) as progress,
        jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext(),
    ):
        if torn := metrics_log.repair():
            log(f"metrics.jsonl: removed a torn last line ({torn} bytes) left by an interrupted write")
        _check_run_directory(config, run_dir, checkpoints, resume=resume)  # before compiling: it may take minutes
        # Compile ahead, so the first tokens/s figure measures training, not compilation, and before config.json is
        # written, so a step that cannot fit (refused with its estimate) leaves no run behind; "auto" resolves here.
        compile_start = time.perf_counter()
        config, steps, train_step, memory_fit = memory_lib.fit_train_step(config, mesh, resuming=resume)
        compile_s = time.perf_counter() - compile_start
        state, resumed = _initial_state(config, run_dir, steps, checkpoints, sampler, resume=resume, log=log, mesh=mesh)
        step = int(state.step)
        if stop_at_step is not None and not step <= stop_at_step <= config.steps:
            raise ValueError(f"stop_at_step={stop_at_step} must be in [{step}, steps={config.steps}]")
        shape = (config.grad_accum, config.micro_batch_size, config.model.context_length + 1)
        metrics_lib.log_start(
            metrics_log,
            log,
            config,
            corpus,
            step=step,
            resumed=resumed,
            compile_s=compile_s,
            mesh=mesh,
            memory=memory_fit,
        )
        log = progress.start(step, log, metrics_log)  # after compiling; lines print above the bar from here on
        if mesh is not None:
            eval_batches = [mesh_lib.put_batch(mesh, batch, axis=0) for batch in eval_batches]

        # The sampler runs ahead of the step (train.prefetch); the state after the last batch used is saved.
        sampler_state = sampler.state()

        def put(batch: np.ndarray) -> jax.Array:
            batch = batch.reshape(shape)  # [accum, micro, L + 1], the global batch in every process
            if mesh is None:
                return jax.device_put(batch)
            return mesh_lib.put_batch(mesh, batch, axis=1)  # micro-batches split over the devices

        def save() -> None:
            save_start = time.perf_counter()
            checkpoints.save(step, state, {"sampler": sampler_state})
            metrics_lib.log_checkpoint(metrics_log, step=step, seconds=time.perf_counter() - save_start)

        prefetcher = stack.enter_context(BatchPrefetcher(sampler.next, put=put, state=sampler.state))
        reason, last_eval = "done", None
        window_start, window_steps = time.perf_counter(), 0  # tokens/s counts training time since the last record
        window = metrics_lib.TrainWindow(config)  # the fields summed since the last train record, read when logging
        while step < config.steps:
            if step == stop_at_step:
                reason = "stop_at_step"
                break
            wanted = stop.reason or ("time limit" if time.perf_counter() > deadline else None)
            # Processes must stop after the same step: they agree at logged steps (train.mesh.agree_on_stop).
            if agreed := mesh_lib.agree_on_stop(wanted, at_agreement_point=step % config.log_every == 0):
                reason = agreed
                break
            batch, sampler_state = prefetcher.next()  # on the device already
            state, metrics = train_step(state, batch)  # dispatched asynchronously; read back only when logged
            window.add(metrics)
            step, window_steps = step + 1, window_steps + 1
            progress.advance(step)  # no device read: shows the last logged metrics
            done = step == config.steps
            logged = step % config.log_every == 0 or done
            evaluated = step % config.eval_every == 0 or done
            saved = step % config.checkpoint_every == 0 or done
            if logged:
                metrics = {k: np.asarray(v).item() for k, v in jax.device_get(metrics).items()}  # waits for the step
                metrics.update(window.take())
                metrics_lib.log_train(
                    metrics_log,
                    log,
                    config,
                    step=step,
                    metrics=metrics,
                    window_steps=window_steps,
                    seconds=time.perf_counter() - window_start,
                    elapsed=time.perf_counter() - started,
                )
            if (logged or saved) and (nonfinite := divergence.first_nonfinite_step(state)) is not None:
                reason = divergence.REASON  # before the save: a non-finite state is never written
                log(divergence.message(nonfinite, checkpoints.latest_step()))
                break
            if evaluated:
                last_eval = evaluate(
                    steps,
                    state,
                    eval_batches,
                    config,
                    byte_level=corpus.byte_level,
                    tokens_per_byte=corpus.tokens_per_byte,
                )
                metrics_lib.log_eval(metrics_log, log, step=step, result=last_eval)
            if saved:
                save()
            if logged:
                checkpoints.poll()  # a background save that has finished gets its manifest now
            if logged or evaluated or saved:
                window_start, window_steps = time.perf_counter(), 0
        if reason != divergence.REASON and step not in checkpoints.all_steps():  # stopped early: keep what was done
            if (nonfinite := divergence.first_nonfinite_step(state)) is not None:  # since the last check
                reason = divergence.REASON
                log(divergence.message(nonfinite, checkpoints.latest_step()))
            else:
                save()
    elapsed = round(time.perf_counter() - started, 2)
    # Steps after the last train record (a run stopped between logged steps) report their sums here.
    metrics_lib.log_end(
        metrics_log,
        log,
        step=step,
        reason=reason,
        window=window.take(),
        elapsed=elapsed,
        nonfinite_step=nonfinite if reason == divergence.REASON else None,
        checkpoint_directory=checkpoints.directory,
    )
    return {"step": step, "reason": reason, "last_eval": last_eval, "elapsed_s": elapsed, "run_dir": str(run_dir)}


def _prepare_data(config: TrainConfig, log: Callable[[str], None]):
    """(corpus, training batch sampler, fixed evaluation batches); CorpusError on a bad corpus."""
    corpus = data_lib.load_corpus(
        config.data,
        val_fraction=config.val_fraction,
        vocab_size=config.model.vocab_size,
        token_dtype=config.token_dtype,
        tokenizer=config.tokenizer,
    )
    window = config.model.context_length + 1
    data_lib.check_fits(corpus, window)
    sampler = data_lib.BatchSampler(corpus.train, window=window, batch_size=config.batch_size, seed=config.seed)
    eval_batches = data_lib.evaluation_batches(
        corpus.validation, window=window, batch_size=config.batch_size, num_batches=config.eval_batches
    )
    log(f"corpus {corpus.source}: {len(corpus.train):,} train / {len(corpus.validation):,} validation tokens")
    return corpus, sampler, eval_batches


def _initial_state(config, run_dir, steps, checkpoints, sampler, *, resume, log, mesh) -> tuple[TrainState, dict]:
    """(state, the start record's resumed, resumed_from and skipped_checkpoints).

    Resuming restores the newest checkpoint that verifies (`Checkpoints.restore_latest`: those that fail
    are moved aside and reported) with the sampler's state, laid out for `mesh`. A fresh state writes
    config.json; so does a run in a directory whose run never saved a checkpoint (it died compiling, or
    failed before its first save), which starts it again from step 0 if its config is the same but for
    what a resume may change. A directory with checkpoints, none of which verifies, is refused.
    """
    config_path = run_dir / "config.json"
    # Before restoring: another config's state (an optimizer of another structure) would not restore, and its
    # checkpoints would be moved aside as if damaged. (`run` has checked already, before compiling.)
    never_saved = _check_run_directory(config, run_dir, checkpoints, resume=resume)
    if resume and not never_saved:
        target = abstract_state(config, mesh)
        latest, state, data_state, skipped = checkpoints.restore_latest(target, move_aside=mesh_lib.is_primary())
        for bad in skipped:
            where = f"moved to {bad.moved_to}" if bad.moved_to else "left in place"
            log(f"checkpoint {bad.step} skipped: {bad.reason} ({where})")
        if latest is None:
            moved = ", ".join(str(p) for p in checkpoints.moved_aside())
            raise RunDirectoryError(
                f"resume: no checkpoint of {str(run_dir)!r} verifies (moved aside: {moved}); "
                "nothing was trained or written"
            )
        sampler.restore(data_state["sampler"])
        log(f"resumed {run_dir} at step {latest}" + (" (the newest checkpoint that verifies)" if skipped else ""))
        _check_config(config, run_dir, log, after=latest)
        resumed = {"resumed": True, "resumed_from": latest, "skipped_checkpoints": [s.to_dict() for s in skipped]}
        return state, resumed
    if config_path.exists():
        log(f"{run_dir} holds a run that never saved a checkpoint: starting it again from step 0")
        _check_config(config, run_dir, log, after=None)
    else:
        mesh_lib.sync("run directory checked")  # before process 0 writes the config the others would take for a run
        if mesh_lib.is_primary():
            config_path.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    resumed = {"resumed": False, "resumed_from": None, "skipped_checkpoints": []}
    return steps.init_state(jax.random.key(config.seed)), resumed


def _check_run_directory(config: TrainConfig, run_dir: pathlib.Path, checkpoints: Checkpoints, *, resume: bool) -> bool:
    """Whether the directory's run never saved a checkpoint; RunDirectoryError where `config` cannot start or
    resume in it: a new run in a directory that holds one, a resume of a directory without a run, a resume
    with another config (`_config_changes`). Reads only: `run` calls it before compiling, `_initial_state`
    again before restoring."""
    never_saved = not checkpoints.all_steps() and not checkpoints.moved_aside()
    if not never_saved:
        if not resume:
            raise RunDirectoryError(f"run directory {str(run_dir)!r} already holds a run; resume it or choose another")
        _config_changes(config, run_dir)
    elif resume and not (run_dir / "config.json").exists():
        load_config(run_dir)  # raises: not a run directory
    return never_saved


def _config_changes(config: TrainConfig, run_dir: pathlib.Path) -> dict[str, tuple[Any, Any]]:
    """{field: (stored, new)} of the fields `config` changes in the run's config.json (the FFN's table layout
    as "ffn.expert_parallel_layout"); RunDirectoryError if any is not `steps`, one of RECORDING_FIELDS or
    the table layout."""
    stored, stored_layout = _without_table_layout(load_config(run_dir).to_dict())
    fields, layout = _without_table_layout(config.to_dict())
    changed = {key: (stored[key], value) for key, value in fields.items() if stored[key] != value}
    fixed = sorted(set(changed) - {"steps", *RECORDING_FIELDS})
    if fixed:
        raise RunDirectoryError(
            f"run directory {str(run_dir)!r} holds a run with another config ({', '.join(fixed)} differ); "
            "resume it with its own config, or choose another directory"
        )
    if stored_layout != layout:
        changed["ffn.expert_parallel_layout"] = (stored_layout, layout)
    return changed


def _check_config(config: TrainConfig, run_dir: pathlib.Path, log: Callable[[str], None], *, after: int | None):
    """Rewrite config.json for a run continued with `config` (from checkpoint `after`, or from step 0), which
    may change `steps`, RECORDING_FIELDS and the FFN's table layout only (train.cli checks this for --resume;
    a restarted run is checked here)."""
    changed = _config_changes(config, run_dir)
    if not changed:
        return
    log("changed on resume: " + ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items()))
    if "steps" in changed and after is not None:
        log(f"the learning-rate schedule now spans {config.steps} steps, from step {after} on")
    mesh_lib.sync("config read")
    if mesh_lib.is_primary():
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def _without_table_layout(fields: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(a TrainConfig's dict without its FFN's `expert_parallel_layout`, that layout or None for a kind
    without one): the layout is what a resume may change inside the model (`RESUMABLE_LAYOUT_FIELDS`)."""
    ffn = dict(fields["model"]["ffn"])
    layout = ffn.pop("expert_parallel_layout", None)
    return {**fields, "model": {**fields["model"], "ffn": ffn}}, layout
