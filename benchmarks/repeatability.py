"""Is a training run repeatable at a fixed seed, and what does repeatability cost (issue 13)?

Two runs of the quality sweep's dense configuration at one seed on an H200 ended 0.023 bits/byte apart
(benchmarks/NOTES.md, "Slices 3-5"): more than the seed-to-seed spread the sweep judges by. This script
runs one configuration (the sweep's shape, `--ffn`, `--steps`) several times in fresh processes under each
of a few XLA settings and reports, per setting, whether the repeats agree to the bit (every logged training
loss and the final validation loss), the first logged step where they part, how far apart they end, and
the training speed, so that the cheapest setting that makes a seed replayable can be chosen. Other
--key=value arguments go to every run (`python -m train --help`):

  default                 the environment as given
  exclude nondeterministic ops
                          XLA_FLAGS --xla_gpu_exclude_nondeterministic_ops=true: XLA's deterministic
                          scatter, GEMM, convolution and attention implementations (XLA's
                          docs/determinism.md)
  no autotuning           XLA_FLAGS --xla_gpu_autotune_level=0: every process picks the same kernels
                          (autotuning by timing can pick others in another process)
  both                    the two flags together

A setting whose flag this XLA does not know fails its runs (XLA refuses unknown flags), and its rows say so.
Every run logs its training loss every `--log-every` steps; losses are compared as the floats
metrics.jsonl holds. Written to results/repeatability_<ffn>.json (and $OUT); each run's log lies beside its
run directory in a temporary folder, removed at the end (the errors' last lines are in the rows).

    PYTHONPATH=. python benchmarks/repeatability.py                          # GPU: dense, 600 steps, 2 repeats
    PYTHONPATH=. python benchmarks/repeatability.py --ffn omnimoe --steps 300 --table_learning_rate_multiplier=3
    PYTHONPATH=. python benchmarks/repeatability.py --quick                  # tiny, CPU: the machinery
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # benchmarks/ is a folder of scripts, not a package
import quality  # the sweep's way to run one configuration (benchmarks/quality.py)

from train.metrics import read_metrics
from train.presets import matched_ffn_overrides

# setting -> the XLA flags it adds to XLA_FLAGS (module doc)
SETTINGS = {
    "default": [],
    "exclude nondeterministic ops": ["--xla_gpu_exclude_nondeterministic_ops=true"],
    "no autotuning": ["--xla_gpu_autotune_level=0"],
    "both": ["--xla_gpu_exclude_nondeterministic_ops=true", "--xla_gpu_autotune_level=0"],
}
# The quality sweep's shape (benchmarks/quality_sweep.py's defaults) at its higher learning rate, 4e-3, where a
# seed moved by 0.023; QUICK: tiny f32 runs on a CPU.
SHAPE = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "context_length": 256, "batch_size": 64}
QUICK_SHAPE = {**quality.QUICK_SHARED, "hidden_size": 16}
DEFAULT_LEARNING_RATE = 4e-3


def overrides(ffn: str, *, steps: int, seed: int, learning_rate: float, log_every: int, quick: bool) -> list[str]:
    """`python -m train --preset small` arguments of the one configuration every run repeats."""
    shape = QUICK_SHAPE if quick else SHAPE
    settings = {
        **shape,
        **matched_ffn_overrides(ffn, shape["hidden_size"]),
        "learning_rate": learning_rate,
        "steps": steps,
        "warmup_steps": max(1, steps // 10),
        "eval_every": steps,  # one evaluation, at the end
        "log_every": log_every,
        "checkpoint_every": steps,
        "seed": seed,
    }
    return [f"--{key}={value}" for key, value in settings.items()]


def compare(runs: list[dict]) -> dict:
    """What the repeats of one setting share: bitwise agreement of every logged loss and the final
    validation loss, the first logged step where two repeats differ, the final spread."""
    finished = [r for r in runs if r["status"] == "done"]
    row: dict = {"repeats": len(runs), "finished": len(finished)}
    if len(finished) < 2:
        return row
    curves = [r["losses"] for r in finished]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    parted = next((s for s in steps if len({c[s] for c in curves}) > 1), None)
    finals = [r["val_loss"] for r in finished]
    row.update(
        logged_steps=len(steps),
        first_differing_step=parted,
        val_loss_identical=len(set(finals)) == 1,
        losses_identical=parted is None,
        val_loss_spread=max(finals) - min(finals),
        bits_per_byte_spread=max(r["bits_per_byte"] for r in finished) - min(r["bits_per_byte"] for r in finished),
        tokens_per_s=sum(r["tokens_per_s"] for r in finished) / len(finished),
    )
    return row


def one_run(command_overrides: list[str], run_dir: pathlib.Path, env: dict[str, str], *, timeout_s: float) -> dict:
    """One fresh process of the configuration: its status, losses by step, final evaluation and speed."""
    outcome = quality.run_one({"overrides": command_overrides}, run_dir, env, limit_minutes=None, timeout_s=timeout_s)
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    end = next((r for r in reversed(records) if r["kind"] == "end"), None)
    evals = [r for r in records if r["kind"] == "eval"]
    train = [r for r in records if r["kind"] == "train"]
    run = {"wall_s": outcome["wall_s"], "losses": {r["step"]: r["loss"] for r in train}}
    if outcome["returncode"] != 0 or end is None or end["reason"] != "done" or not evals:
        why = "killed (timeout)" if outcome["killed"] else f"exit {outcome['returncode']}"
        run.update(status="error", error=f"{why}: " + " | ".join(outcome["log_tail"][-4:]))
        return run
    steady = train[1:] or train  # the first window holds the compilation's warm-up steps
    run.update(
        status="done",
        val_loss=evals[-1]["val_loss"],
        bits_per_byte=evals[-1]["bits_per_byte"],
        tokens_per_s=sum(r["tokens_per_s"] for r in steady) / len(steady),
    )
    return run


def run_settings(settings: list[str], command_overrides: list[str], *, repeats: int, timeout_s: float) -> list[dict]:
    """One row per setting (`compare`'s fields, the repeats' validation losses and wall times, any errors)."""
    python_path = os.pathsep.join(filter(None, [str(quality.REPO), os.environ.get("PYTHONPATH")]))
    base_env = {**os.environ, "PYTHONPATH": python_path}
    rows = []
    with tempfile.TemporaryDirectory(prefix="repeatability-") as tmp:
        for setting in settings:
            flags = " ".join(filter(None, [base_env.get("XLA_FLAGS", ""), *SETTINGS[setting]]))
            env = {**base_env, "XLA_FLAGS": flags} if flags else base_env
            runs = []
            for repeat in range(repeats):
                run_dir = pathlib.Path(tmp) / f"{setting.replace(' ', '_')}-{repeat}"
                runs.append(one_run(command_overrides, run_dir, env, timeout_s=timeout_s))
                print(f"{setting} #{repeat}: {runs[-1]['status']}, val loss {runs[-1].get('val_loss')}", flush=True)
            row = {"setting": setting, "xla_flags": SETTINGS[setting], **compare(runs)}
            row["val_losses"] = [r.get("val_loss") for r in runs]
            row["wall_s"] = [r["wall_s"] for r in runs]
            errors = [r["error"] for r in runs if r["status"] == "error"]
            if errors:
                row["errors"] = errors
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ffn", default="dense", help="the FFN kind, matched to dense's active parameters")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per setting (>= 2)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {list(SETTINGS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning-rate", type=float, default=DEFAULT_LEARNING_RATE)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per run")
    parser.add_argument("--quick", action="store_true", help="tiny f32 runs on a CPU; nothing written")
    args, extra = parser.parse_known_args(argv)
    malformed = [e for e in extra if not (e.startswith("--") and "=" in e)]
    if malformed:
        parser.error(f"unrecognised arguments {malformed}: other arguments are --key=value overrides of every run")
    try:
        quality.check_kinds([args.ffn])
    except ValueError as err:
        parser.error(f"--ffn: {err}")
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"--settings: {unknown} not among {list(SETTINGS)}")
    if args.repeats < 2:
        parser.error(f"--repeats={args.repeats} must be >= 2 (a comparison needs two runs)")
    if not 1 <= args.log_every <= args.steps:
        parser.error(f"--log-every={args.log_every} must be in [1, --steps={args.steps}]")
    command_overrides = (
        overrides(
            args.ffn,
            steps=args.steps,
            seed=args.seed,
            learning_rate=args.learning_rate,
            log_every=args.log_every,
            quick=args.quick,
        )
        + extra
    )
    start = time.time()
    rows = run_settings(settings, command_overrides, repeats=args.repeats, timeout_s=args.timeout_s)
    print(f"\n{args.ffn}, {args.steps} steps, seed {args.seed}, lr {args.learning_rate:g}, {args.repeats} repeats:")
    columns = ["setting", "finished", "losses_identical", "first_differing_step", "val_loss_spread"]
    common.print_table(rows, [*columns, "bits_per_byte_spread", "tokens_per_s"])
    if not args.quick:
        path = common.write_results(
            f"repeatability_{args.ffn}",
            rows,
            configuration=command_overrides,
            wall_s=round(time.time() - start, 1),
        )
        common.copy_to_out(path)
        print(f"\nwrote {path}")
    # A setting that did not finish its repeats is a failed measurement, not a result.
    return 1 if any(row["finished"] < args.repeats for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
