"""Command line of `python -m train`: a preset, `--key=value` overrides, a run directory, `--resume`."""

from __future__ import annotations

import argparse
import datetime
import pathlib
import signal
import sys
from collections.abc import Sequence

from train.config import TrainConfig, apply_overrides, override_keys, parse_overrides
from train.data import CorpusError
from train.loop import RunDirectoryError, load_config, run
from train.presets import PRESETS, get_preset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train an OmniMoE byte-level language model (default: the tiny preset on the Python "
        "standard library's sources).",
        epilog="Any config field can be overridden with --key=value (or --key value): " + ", ".join(override_keys()),
        allow_abbrev=False,  # an override such as --r=... must never be taken for --run-dir
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="starting config (default tiny)")
    parser.add_argument("--run-dir", help="where config, metrics and checkpoints go (default runs/<preset>-<time>)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --run-dir from its latest checkpoint, exactly"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the job; returns the exit status (0 done, 2 bad input, 128 + signal number when interrupted)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        overrides = parse_overrides(rest)
        if args.resume:
            if args.run_dir is None:
                parser.error("--resume needs --run-dir")
            if overrides:
                parser.error(
                    f"--resume continues the stored config exactly; drop the overrides {sorted(overrides)} "
                    "(to change the config, start a new run)"
                )
            run_dir = pathlib.Path(args.run_dir)
            config = load_config(run_dir)
        else:
            config: TrainConfig = apply_overrides(get_preset(args.preset), overrides)
            run_dir = pathlib.Path(args.run_dir or default_run_dir(args.preset))
    except ValueError as err:
        parser.error(str(err))
    try:
        summary = run(config, run_dir, resume=args.resume)
    except (CorpusError, RunDirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if summary["reason"] in ("SIGINT", "SIGTERM"):
        return 128 + int(getattr(signal, summary["reason"]))
    return 0


def default_run_dir(preset: str) -> pathlib.Path:
    return pathlib.Path("runs") / f"{preset}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
