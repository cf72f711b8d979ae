"""Validation quality of every FFN kind at matched active parameters, trained for the same tokens on one device.

Run from the repository root (the GPU machine; see the README's results section):

    PYTHONPATH=. python benchmarks/quality.py                      # seven kinds, at most --budget-minutes 8
    PYTHONPATH=. python benchmarks/quality.py --quick              # tiny f32 runs: the machinery, on a CPU
    PYTHONPATH=. python benchmarks/quality.py --ffn omnimoe,peer --steps 3000 --budget-minutes 10 --learning_rate=1e-3

What it does, in order:
1. Plans one `python -m train` command per FFN kind. Every kind gets the same model shape, data (the default
   corpus: the Python standard library's sources), optimizer, seed and number of steps, so the same batches in
   the same order; only the FFN differs, sized by `train.presets.matched_ffn_overrides(kind, d)`, i.e.
   `omnimoe_jax.baselines.presets.small_presets(d)`: about 12 d^2 active parameters per token and layer for
   every kind (the table is in that module). Any other `--key=value` arguments go to every run (but not
   those that would size the FFNs differently or change the token budget of one run: see RESERVED).
2. Runs the commands one after another, each in its own process, so a kind that fails (a config refused, a
   kernel error, out of memory) is recorded with its error and the others still run. Each run gets a share of
   the remaining budget as its `--time_limit_minutes` (fast kinds run first, so what they leave passes on) and
   is killed GRACE_S after its share. A run its time limit stopped is reported with the step it reached.
3. Reads every run's metrics.jsonl: validation bits per byte at each evaluation, the routing health of the
   last one (`train.metrics`), training tokens per second (median of the logged windows after the first),
   compile time and parameter counts. Bits per byte are compared at the final step and, in case some run
   stopped early, at the last evaluation step every run reached ("common step").
4. Prints a table; writes quality.json (`benchmarks/common.write_results`: device, versions, date, command;
   the plan and every run's metrics records) and quality.png (validation bits per byte and training loss
   against tokens, one curve per kind) under benchmarks/results/, both copied to $OUT when set.

The default shape (d = 128, 4 layers, 1500 steps of 32 x 256 tokens = 12.3M tokens per kind) is an estimate
of what six kinds can train in 8 minutes on one H100 (made before any GPU run, and before FlashMoE made them
seven): the table's steps column says whether each run finished. `--hidden-size`, `--steps` and overrides
such as `--num_layers=8` scale it.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # benchmarks/ is a folder of scripts, not a package

from omnimoe_jax._model import FFN_KINDS
from train.config import apply_overrides, parse_overrides
from train.metrics import read_metrics
from train.presets import get_preset, matched_ffn_overrides

REPO = pathlib.Path(__file__).resolve().parents[1]
# Every registered kind, fast ones first: the time a run leaves unused passes to the ones after it (a kind not
# in this order runs last).
_FAST_FIRST = ["dense", "gshard", "deepseekmoe", "omnimoe", "flashmoe", "peer", "pkm"]
DEFAULT_KINDS = sorted(FFN_KINDS, key=lambda k: _FAST_FIRST.index(k) if k in _FAST_FIRST else len(_FAST_FIRST))
BASE_PRESET = "small"  # its optimizer settings; the overrides below set the shape and schedule
# The model shape, batch and learning rate every kind shares (on top of the small preset), besides the FFN.
SHARED = {"num_layers": 4, "num_heads": 4, "context_length": 256, "batch_size": 32, "learning_rate": 2e-3}
QUICK_SHARED = {
    "num_layers": 1,
    "num_heads": 2,
    "context_length": 16,
    "batch_size": 4,
    "learning_rate": 2e-3,
    "dtype": "float32",
    "eval_batches": 1,
}
DEFAULT_HIDDEN_SIZE, QUICK_HIDDEN_SIZE = 128, 16
DEFAULT_STEPS, QUICK_STEPS = 1500, 4
EVALUATIONS = 6  # per run, evenly spaced (the last at the final step)
STARTUP_S = 20.0  # of a run's share, left for starting Python and JAX before the run's own clock starts
GRACE_S = 60.0  # a run past its share gets this long (its final checkpoint, a slow compile) before it is killed
RESULTS_NAME = "quality"
# Keys the plan sets for every run: extra overrides may not change them (the matching, the token budget).
RESERVED = (
    *("hidden_size", "ffn", "intermediate_size", "num_experts", "num_experts_per_token"),
    *("steps", "seed", "time_limit_minutes"),
)


# ----------------------------------------------------------------------------------------------------------
# planning


def run_overrides(
    kind: str,
    *,
    hidden_size: int,
    steps: int,
    seed: int,
    quick: bool,
    extra: list[str],
    shared: dict[str, Any] | None = None,
    ffn: dict[str, str] | None = None,
) -> list[str]:
    """The `python -m train --preset small` arguments of one kind's run (all but --run-dir and the time limit).

    shared: the model shape, batch and learning rate of every run (default SHARED, or QUICK_SHARED when quick);
    ffn: the FFN's overrides (default `matched_ffn_overrides(kind, hidden_size)`).
    """
    if steps < EVALUATIONS and not quick:
        raise ValueError(f"steps={steps} must be >= {EVALUATIONS} (one evaluation every steps / {EVALUATIONS})")
    eval_every = max(1, steps // EVALUATIONS) if not quick else max(1, steps // 2)
    if shared is None:
        shared = QUICK_SHARED if quick else SHARED
    settings = {
        **shared,
        **(matched_ffn_overrides(kind, hidden_size) if ffn is None else ffn),
        "steps": steps,
        "warmup_steps": max(1, steps // 10) if steps > 1 else 0,
        "eval_every": eval_every,
        "log_every": max(1, min(50, eval_every // 2)),
        "checkpoint_every": steps,  # one checkpoint, at the end: these runs are not resumed
        "seed": seed,
    }
    return [f"--{key}={value}" for key, value in settings.items()] + list(extra)


def plan(kinds: list[str], *, hidden_size: int, steps: int, seed: int, quick: bool, extra: list[str]) -> list[dict]:
    """One entry per kind: {"kind", "overrides"} and, when its config is refused, "error" instead of a run.

    Every config is built here first (`train.config.apply_overrides`, nothing allocated), so a refused one is
    reported without starting a process.
    """
    check_kinds(kinds)
    check_extra(extra, RESERVED, "--hidden-size, --steps, --seed, --budget-minutes")
    entries = []
    for kind in kinds:
        entry: dict[str, Any] = {"kind": kind}
        try:
            entry["overrides"] = run_overrides(
                kind, hidden_size=hidden_size, steps=steps, seed=seed, quick=quick, extra=extra
            )
            config = apply_overrides(get_preset(BASE_PRESET), parse_overrides(entry["overrides"]))
            entry["tokens_per_step"] = config.tokens_per_step
        except ValueError as err:
            entry["error"] = f"config refused: {err}"
        entries.append(entry)
    return entries


def check_kinds(kinds: list[str]) -> None:
    unknown = sorted(set(kinds) - set(FFN_KINDS))
    if unknown:
        raise ValueError(f"unknown FFN kinds {unknown}; expected some of {FFN_KINDS}")


def check_extra(extra: list[str], reserved: tuple[str, ...], flags: str) -> None:
    """ValueError if the extra overrides set a key the plan sets (`reserved`) or an FFN field ("ffn.<field>"):
    those would unmatch the runs. `flags`: the script's own options that set them instead."""
    refused = sorted(k for k in parse_overrides(extra) if k in reserved or "." in k)
    if refused:
        raise ValueError(
            f"overrides {refused} would unmatch the runs; use {flags} "
            "(and `python -m train` for one kind's own settings)"
        )


def time_share(remaining_s: float, runs_left: int) -> float:
    """Seconds for the next run: an equal share of what is left of the budget."""
    if runs_left < 1:
        raise ValueError(f"runs_left={runs_left} must be >= 1")
    return max(0.0, remaining_s) / runs_left


def time_limit_minutes(share_s: float) -> float:
    """The run's own `--time_limit_minutes` for a share (its clock starts after Python and JAX have): at least
    half a minute, so that a run whose share is gone still compiles and records something."""
    return max(0.5, (share_s - STARTUP_S) / 60)


# ----------------------------------------------------------------------------------------------------------
# running


def run_one(
    entry: dict,
    run_dir: pathlib.Path,
    env: dict[str, str],
    *,
    limit_minutes: float | None,
    timeout_s: float | None,
    resume: bool = False,
) -> dict:
    """Run one planned kind; {"command", "returncode", "wall_s", "log_tail", "killed"} (its metrics stay in
    run_dir, its log beside it). limit_minutes: the run's own `--time_limit_minutes` (None: none, the run goes
    to its last step); timeout_s: kill the process after this long (None: never); resume: continue the run
    already in run_dir (`python -m train --resume`: its stored config, from its latest checkpoint)."""
    command = [sys.executable, "-m", "train", "--run-dir", str(run_dir)]
    command += ["--resume"] if resume else ["--preset", BASE_PRESET, *entry["overrides"]]
    if limit_minutes is not None:
        command.append(f"--time_limit_minutes={limit_minutes:.3f}")
    log_path = run_dir.parent / f"{run_dir.name}.log"
    start = time.time()
    killed = False
    with log_path.open("w") as log:
        try:
            returncode = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, timeout=timeout_s, check=False
            ).returncode
        except subprocess.TimeoutExpired:
            returncode, killed = None, True
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return {
        "command": command,
        "returncode": returncode,
        "killed": killed,
        "wall_s": round(time.time() - start, 1),
        "log_tail": lines[-12:],
    }


# ----------------------------------------------------------------------------------------------------------
# results


def summarise(kind: str, records: list[dict], outcome: dict, planned_steps: int) -> dict:
    """One table row from a run's metrics records and how its process ended.

    status: "done" (all planned steps), "stopped at step S (time limit)" or another end reason, or "error"
    (with the error: the log's last lines, or why the run never started).
    """
    row: dict[str, Any] = {"ffn": kind, "planned_steps": planned_steps}
    start = next((r for r in records if r["kind"] == "start"), None)
    end = next((r for r in reversed(records) if r["kind"] == "end"), None)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    if start:
        row.update(
            active_params=start["parameters"]["active"],
            total_params=start["parameters"]["total"],
            compile_s=start["compile_s"],
        )
    if train:
        steady = train[1:] or train  # the first window includes the first steps' warm-up
        row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in steady)
    if evals:
        last = evals[-1]
        row.update(eval_step=last["step"], val_loss=last["val_loss"], bits_per_byte=last["bits_per_byte"])
        row.update(last.get("routing", {}))
    if end:
        row["steps"] = end["step"]
        row["tokens"] = end["step"] * start["config"]["batch_size"] * start["config"]["model"]["context_length"]
    failed = outcome.get("error") or outcome.get("killed") or outcome.get("returncode") not in (0, None)
    if outcome.get("error"):
        row.update(status="error", error=outcome["error"])
    elif failed or end is None:
        why = "killed after its share and grace" if outcome.get("killed") else f"exit {outcome.get('returncode')}"
        row.update(status="error", error=f"{why}: " + " | ".join(outcome.get("log_tail", [])[-4:]))
    elif end["reason"] == "done":
        row["status"] = "done"
    else:
        row["status"] = f"stopped at step {end['step']} ({end['reason']})"
    return row


def common_step(curves: dict[str, list[dict]]) -> int | None:
    """The last evaluation step every run with evaluations reached (None if there is no such step)."""
    steps = [{point["step"] for point in curve} for curve in curves.values() if curve]
    shared = set.intersection(*steps) if steps else set()
    return max(shared) if shared else None


def bits_at(curve: list[dict], step: int | None) -> float | None:
    return next((p["bits_per_byte"] for p in curve if p["step"] == step), None)


def eval_curve(records: list[dict], tokens_per_step: int) -> list[dict]:
    """[{step, tokens, bits_per_byte, val_loss}] of a run's evaluations."""
    return [
        {
            "step": r["step"],
            "tokens": r["step"] * tokens_per_step,
            "bits_per_byte": r["bits_per_byte"],
            "val_loss": r["val_loss"],
        }
        for r in records
        if r["kind"] == "eval"
    ]


def print_table(rows: list[dict], shared_step: int | None) -> None:
    shown = []
    for row in rows:
        line = {
            "ffn": row["ffn"],
            "active": row.get("active_params"),
            "total": row.get("total_params"),
            "steps": f"{row.get('steps', 0)}/{row['planned_steps']}",
            "Mtokens": None if "tokens" not in row else row["tokens"] / 1e6,
            "val bpb": row.get("bits_per_byte"),
            f"bpb@{shared_step}": row.get("bits_at_common_step"),
            "tok/s": None if "tokens_per_s" not in row else round(row["tokens_per_s"]),
            "compile s": row.get("compile_s"),
            "used": row.get("experts_used"),
            "max load": row.get("max_load"),
            "dropped": row.get("dropped_fraction"),
            "status": row["status"] if row["status"] != "error" else f"error: {row['error']}"[:100],
        }
        shown.append(line)
    common.print_table(shown, list(shown[0]) if shown else [])


def plot(curves: dict[str, list[dict]], losses: dict[str, list[dict]], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bpb, ax_loss) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, kind in enumerate(curves):
        color = f"C{i % 10}"
        if curves[kind]:
            tokens = [p["tokens"] / 1e6 for p in curves[kind]]
            ax_bpb.plot(tokens, [p["bits_per_byte"] for p in curves[kind]], "o-", color=color, label=kind)
        if losses.get(kind):
            tokens = [p["tokens"] / 1e6 for p in losses[kind]]
            ax_loss.plot(tokens, [p["loss"] for p in losses[kind]], color=color, label=kind)
    ax_bpb.set(xlabel="training tokens (M)", ylabel="validation bits per byte", title=title)
    ax_loss.set(xlabel="training tokens (M)", ylabel="training loss (nats per token)", title="training loss")
    for ax in (ax_bpb, ax_loss):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Other --key=value arguments are passed to every run (see `python -m train --help`).",
    )
    parser.add_argument("--ffn", default=",".join(DEFAULT_KINDS), help=f"comma-separated kinds from {FFN_KINDS}")
    parser.add_argument("--budget-minutes", type=float, default=8.0, help="wall-clock budget of all runs together")
    parser.add_argument("--hidden-size", type=int, default=None, help=f"d (default {DEFAULT_HIDDEN_SIZE})")
    parser.add_argument("--steps", type=int, default=None, help=f"steps of every run (default {DEFAULT_STEPS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run (initialisation and batches)")
    parser.add_argument("--quick", action="store_true", help="tiny f32 runs (d = 16, 4 steps): on a CPU")
    parser.add_argument("--name", default=RESULTS_NAME, help="results file stem (another name keeps runs apart)")
    args, extra = parser.parse_known_args(argv)
    hidden_size = args.hidden_size or (QUICK_HIDDEN_SIZE if args.quick else DEFAULT_HIDDEN_SIZE)
    steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    kinds = [k.strip() for k in args.ffn.split(",") if k.strip()]
    try:
        parse_overrides(extra)  # a malformed extra argument fails here, not in every run
        entries = plan(kinds, hidden_size=hidden_size, steps=steps, seed=args.seed, quick=args.quick, extra=extra)
    except ValueError as err:
        parser.error(str(err))

    # The runs own the device; this process only names it at the end, without JAX's preallocation.
    child_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    start = time.time()
    budget_s = 60 * args.budget_minutes
    rows, curves, losses, outcomes = [], {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        for i, entry in enumerate(entries):
            kind = entry["kind"]
            records: list[dict] = []
            if "error" in entry:
                outcome = {"error": entry["error"]}
            else:
                share = time_share(budget_s - (time.time() - start), len(entries) - i)
                run_dir = pathlib.Path(tmp) / kind
                print(f"{kind}: {share:.0f} s share; {' '.join(entry['overrides'])}", flush=True)
                outcome = run_one(
                    entry, run_dir, child_env, limit_minutes=time_limit_minutes(share), timeout_s=share + GRACE_S
                )
                if (run_dir / "metrics.jsonl").exists():
                    records = read_metrics(run_dir)
            outcomes[kind] = {**outcome, "records": records}
            row = summarise(kind, records, outcome, steps)
            curves[kind] = eval_curve(records, entry.get("tokens_per_step", 0))
            losses[kind] = [
                {"step": r["step"], "tokens": r["tokens_seen"], "loss": r["loss"]}
                for r in records
                if r["kind"] == "train"
            ]
            rows.append(row)
            print(f"{kind}: {row['status']} after {time.time() - start:.0f} s", flush=True)

    shared_step = common_step(curves)
    for row in rows:
        row["common_step"] = shared_step
        row["bits_at_common_step"] = bits_at(curves[row["ffn"]], shared_step)
    print(
        f"\nvalidation bits per byte at matched active parameters (d = {hidden_size}, {steps} steps, seed {args.seed})"
    )
    print_table(rows, shared_step)

    common.RESULTS.mkdir(parents=True, exist_ok=True)
    png = common.RESULTS / f"{args.name}.png"
    device = common.environment()["device"]
    plot(curves, losses, png, f"validation bits per byte, d = {hidden_size}, {device}")
    path = common.write_results(
        args.name,
        rows,
        quick=args.quick,
        hidden_size=hidden_size,
        steps=steps,
        seed=args.seed,
        budget_minutes=args.budget_minutes,
        base_preset=BASE_PRESET,
        plan=entries,
        common_step=shared_step,
        curves=curves,
        runs=outcomes,
        wall_s=round(time.time() - start, 1),
    )
    print(f"\nwrote {path} and {png} in {time.time() - start:.0f} s")
    common.copy_to_out(path, png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
