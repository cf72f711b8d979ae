"""Command line of `python -m train`: a preset, `--key=value` overrides, a run directory, `--resume`, and
the layout: `--mesh` (data + expert parallelism) and `--coordinator`/`--num-processes`/`--process-id`
(one process per host, joined with `jax.distributed`)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import signal
import sys
from collections.abc import Sequence

import jax

from omnimoe_jax import parallel, parameter_counts
from train import divergence
from train import help as help_text
from train.checkpoint import CheckpointError, Checkpoints
from train.config import TrainConfig, apply_overrides, parse_overrides
from train.data import CorpusError
from train.flops import model_flops_per_token
from train.loop import load_config, run
from train.memory import StepDoesNotFitError
from train.mesh import check_mesh
from train.presets import PRESETS, get_preset
from train.run_directory import RunDirectoryError
from train.steps import RECORDING_FIELDS, RESUMABLE_LAYOUT_FIELDS, abstract_state
from train.tokenizer import TextTokenizer, TokenizerError

# What --resume may change: how long the run goes on, what the loop records, and how the expert tables
# lay out over the mesh (the numbers are the same either way; the checkpoint restores into the new layout).
# Everything else (model, optimizer, batch, data, seed) would make the rest of the run another run's.
RESUMABLE_FIELDS = ("steps", *RESUMABLE_LAYOUT_FIELDS, *RECORDING_FIELDS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train an OmniMoE byte-level language model (default: the tiny preset on the Python "
        "standard library's sources).",
        epilog=help_text.render_fields(),
        # The field list is laid out by train/help.py; a fixed width keeps the stored help.txt terminal-free.
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=help_text.WIDTH),
        allow_abbrev=False,  # an override such as --r=... must never be taken for --run-dir
    )
    # default None, read as tiny: so --resume can tell a --preset it would ignore from none given
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="starting config (default tiny)")
    parser.add_argument("--run-dir", help="where config, metrics and checkpoints go (default runs/<preset>-<time>)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its latest checkpoint, exactly; may change only "
        + ", ".join(f"--{f}" for f in RESUMABLE_FIELDS)
        + " (a new --steps reshapes the rest of the learning-rate schedule)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (preset + overrides, or the stored run's with --resume), its parameter "
        "counts and model FLOPs per token as JSON, then exit without loading data or compiling",
    )
    scale = parser.add_argument_group(
        "scale-out", "a run may resume on another mesh (or none): the layout is not part of the run's config"
    )
    scale.add_argument(
        "--mesh",
        metavar="SPEC",
        help="train data + expert parallel on a device mesh such as data=2,expert=4 (axis sizes multiply to the "
        "number of devices, of all processes); default: one device",
    )
    scale.add_argument("--coordinator", metavar="HOST:PORT", help="multi-process run: process 0's address")
    scale.add_argument("--num-processes", type=int, metavar="N", help="multi-process run: processes in the job")
    scale.add_argument("--process-id", type=int, metavar="I", help="multi-process run: this process, 0 .. N-1")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the job; returns the exit status (0 done, 2 bad input, an unusable run directory or a train step
    that does not fit the device's memory, 3 diverged (a
    non-finite loss; nothing of it saved), 128 + signal number when interrupted)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    distributed = (args.coordinator, args.num_processes, args.process_id)
    if any(value is not None for value in distributed):
        if any(value is None for value in distributed):
            parser.error("a multi-process run needs all of --coordinator, --num-processes and --process-id")
        if args.mesh is None:
            parser.error("a multi-process run needs --mesh: one mesh spans the devices of every process")
        if args.run_dir is None:
            parser.error("a multi-process run needs --run-dir: every process saves into the same directory")
        try:  # first, before anything starts a JAX backend
            parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        except (TypeError, ValueError) as err:
            parser.error(str(err))
    status = _run(parser, args, rest)
    if args.coordinator is not None:
        # Waits for the other processes, so none exits while others still save. Only after a clean run: a
        # process that failed exits at once, and the coordination service stops the others.
        jax.distributed.shutdown()
    return status


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> int:
    try:
        overrides = parse_overrides(rest)
        if args.resume:
            if args.run_dir is None:
                parser.error("--resume needs --run-dir")
            if args.preset is not None:
                parser.error(
                    f"--resume continues the run stored in --run-dir; --preset {args.preset} would be ignored "
                    "(a preset starts a new run)"
                )
            run_dir = pathlib.Path(args.run_dir)
            stored = load_config(run_dir)
            fixed = sorted(set(overrides) - set(RESUMABLE_FIELDS))
            if fixed:
                parser.error(
                    f"--resume keeps the run's model, optimizer and data; it can change only "
                    f"{', '.join(RESUMABLE_FIELDS)}, not {fixed} (to change those, start a new run)"
                )
            config = apply_overrides(stored, overrides)
            with Checkpoints(run_dir) as checkpoints:
                # Read-only here (the run, once it holds the directory's lock, moves bad ones aside).
                latest = checkpoints.latest_verified_step()
                # "complete" only if that checkpoint restores, too; else the run resumes from an older one
                complete = latest == config.steps and _restores(checkpoints, latest, config)
            if latest is not None and config.steps < latest:
                parser.error(f"--steps={config.steps} is below the run's latest checkpoint, step {latest}")
            if complete and not args.print_config:
                print(f"{run_dir} is complete at step {latest} of {config.steps}; --steps=N continues it to step N")
                return 0
        else:
            preset = args.preset or "tiny"
            config: TrainConfig = apply_overrides(get_preset(preset), overrides, scale_warmup=True)
            if config.tokenizer is not None and "vocab_size" not in overrides:
                # The tokenizer's ids and the three this package adds (train.tokenizer).
                vocab_size = TextTokenizer(config.tokenizer).vocab_size
                config = dataclasses.replace(config, model=config.model.replace(vocab_size=vocab_size))
            run_dir = pathlib.Path(args.run_dir or default_run_dir(preset))
        if args.print_config:
            counts = {"parameters": parameter_counts(config.model), "flops": model_flops_per_token(config.model)}
            print(json.dumps({**config.to_dict(), **counts}, indent=2))
            return 0
        mesh = None if args.mesh is None else parallel.make_mesh(args.mesh)
        if mesh is not None:
            check_mesh(config, mesh)
        expert_shards = 1 if mesh is None else mesh.shape[parallel.EXPERT_AXIS]
        capacity_factor = getattr(config.model.ffn, "expert_capacity_factor", None)  # routed kinds have one
        if not args.resume and capacity_factor is not None and expert_shards == 1:
            # A resumed run may move to a mesh without an expert axis; a new one would record an inert factor.
            parser.error(
                f"--ffn.expert_capacity_factor={capacity_factor} caps the expert-parallel "
                "dispatch: it needs --mesh with an expert axis of 2 or more devices"
            )
    except ValueError as err:
        parser.error(str(err))
    try:
        summary = run(config, run_dir, resume=args.resume, mesh=mesh)
    except (CorpusError, RunDirectoryError, StepDoesNotFitError, TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        print(f"curves: python -m train.plot {run_dir}", flush=True)
    if summary["reason"] == divergence.REASON:
        return 3
    if summary["reason"] in ("SIGINT", "SIGTERM"):
        return 128 + int(getattr(signal, summary["reason"]))
    return 0


def _restores(checkpoints: Checkpoints, step: int, config: TrainConfig) -> bool:
    try:
        checkpoints.restore(step, abstract_state(config))
    except CheckpointError:
        return False
    return True


def default_run_dir(preset: str) -> pathlib.Path:
    return pathlib.Path("runs") / f"{preset}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
