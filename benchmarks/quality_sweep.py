"""A quality sweep that can be trusted (issue 13): OmniMoE, dense, DeepSeekMoE and PEER at matched active
parameters and equal tokens, over seeds, base learning rates, the expert tables' learning-rate multiplier and
OmniMoE's split between shared MLP width and K; resumable, so it can run in slices across sessions.

Run from the repository root (the GPU machine; `benchmarks/quality.py` is the one-setting comparison it builds on):

    PYTHONPATH=. python benchmarks/quality_sweep.py --list                # the plan in order: done, left, estimates
    PYTHONPATH=. python benchmarks/quality_sweep.py --budget-minutes 8    # the next runs that fit in 8 minutes
    PYTHONPATH=. python benchmarks/quality_sweep.py --combine             # every run -> quality_sweep.json, .png
    PYTHONPATH=. python benchmarks/quality_sweep.py --quick --ffn dense,omnimoe --seeds 0   # tiny, CPU, a tmp folder

The grid, per kind (the first value of every list is its centre):
- the same model shape (`--hidden-size`, `--num-layers`, `--num-heads`, `--context-length`, `--batch-size`, on
  top of the `small` preset's optimizer), the same tokens (`--tokens`: steps = tokens / tokens per step) and,
  seed for seed, the same batches; the FFN sized by `train.presets.matched_ffn_overrides(kind, d)`, so about
  12 d^2 active parameters per token and layer for every kind;
- seeds (`--seeds`) x base learning rates (`--learning-rates`) x the kind's variants: for the kinds with
  expert or value tables (TABLE_KINDS) every `--table-multipliers` value at the centre split, passed as
  `--table_learning_rate_multiplier=` (the kind's `table_parameters` train at that multiple), and for
  OmniMoE every other `--omnimoe-splits` value (intermediate_size:K, each within 1% of dense's active
  parameters) at the centre multiplier. The two axes are not crossed: each is varied around the centre.

Other `--key=value` overrides go to every run (the `--table_*` ones, such as `--table_lr_decay_to_one`, to
the kinds with tables alone) and are part of the shape's name, so runs with other overrides keep apart.

`--order informative` (the default) runs the centre setting first (seed by seed, every kind), then the other
learning rates, then the multipliers, then the splits; `--order grid` runs kind by kind.

Each run is one `python -m train` process (`quality.run_one`) in `--runs-dir`; its record (settings, final
validation bits per byte, tokens, wall time, device, versions, date, command, and the routing health of its
last evaluation: experts used, load entropy, max load, from the sown expert counts; `train.metrics`) is
written atomically to `<results-dir>/<shape>__<run>.json` and copied to $OUT/quality_sweep/ when $OUT is
set (commit those files: the next slice skips them). A run whose record exists is skipped, unless the budget
stopped it (`--retry-errors` reruns failed ones too), so each slice continues where the last stopped.

`--budget-minutes` bounds a slice: no run starts in its last minute, and a run still going at its end stops
itself (its own `--time_limit_minutes`, a checkpoint) and is recorded as stopped: the next slice resumes it
from that checkpoint if its run directory is still there (a warm GPU machine keeps the ignored runs/ between
calls), else starts it again. A run whose expected time (from the finished or stopped runs of the same
kind, split and shape) would fit a whole slice but not what is left of this one waits for the next.

`--combine` merges every record of the results folder into `<results-dir>.json` and `.png` (by default
benchmarks/results/quality_sweep.json, which `benchmarks/report.py` renders): for every shape and kind, the
kind at its own best configuration (the lowest mean over seeds, among its configurations with the most
finished seeds), the mean, standard deviation (over seeds, n - 1) and min/max of its validation bits per
byte, the routing health, and issue 13's target: OmniMoE's mean below dense's by more than twice the larger
of the two kinds' seed standard deviations, and below DeepSeekMoE's and PEER's (judged only once every one
of the four kinds has >= 2 seeds at >= 2 learning rates).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # benchmarks/ is a folder of scripts, not a package
import quality

from omnimoe_jax import OmniMoEConfig, ffn_registry
from omnimoe_jax.baselines import DenseFFNConfig
from train import divergence
from train.config import apply_overrides, parse_overrides
from train.metrics import read_metrics
from train.presets import get_preset, matched_ffn_overrides

SWEEP_KINDS = ("omnimoe", "dense", "deepseekmoe", "peer")
TABLE_KINDS = ffn_registry.table_kinds()  # expert or value tables: the table multiplier applies
SPLIT_KINDS = ("omnimoe",)
RIVALS = ("dense", "deepseekmoe", "peer")  # what OmniMoE must beat (issue 13's target)
TABLE_LR_FIELD = "table_learning_rate_multiplier"
SPLIT_TOLERANCE = 0.01  # a split's active parameters may differ from dense's by at most this fraction
RESULTS_DIR = common.RESULTS / "quality_sweep"
RUNS_DIR = quality.REPO / "runs" / "quality_sweep"  # git ignores runs/; a warm GPU machine keeps it between calls
MIN_START_S = 60.0  # no run starts with less of the budget left: starting Python and JAX and compiling take that
TIERS = ("centre", "learning rate", "table multiplier", "split")
# The shape of every run: (default, --quick default). d = 256 and 40M tokens are issue 13's floor.
SHAPE_DEFAULTS = {
    "hidden_size": (256, quality.QUICK_HIDDEN_SIZE),
    "num_layers": (4, quality.QUICK_SHARED["num_layers"]),
    "num_heads": (4, quality.QUICK_SHARED["num_heads"]),
    "context_length": (256, quality.QUICK_SHARED["context_length"]),
    "batch_size": (64, quality.QUICK_SHARED["batch_size"]),
    "tokens": (
        40_000_000,
        quality.QUICK_STEPS * quality.QUICK_SHARED["batch_size"] * quality.QUICK_SHARED["context_length"],
    ),
}
# 2e-3: benchmarks/quality.py's. The first slices also ran 1e-3 (the small preset's), which lost to 2e-3 by
# 0.06-0.09 bits/byte for omnimoe and dense (NOTES.md, the sweep's measured slices): the second rate is now the
# other side, 4e-3, so each kind's best is bracketed. Records at 1e-3 stay in the results and in --combine.
DEFAULT_LEARNING_RATES = "2e-3,4e-3"
DEFAULT_MULTIPLIERS = "1,3,10"
# Keys the sweep sets (through its own flags) for every run: extra overrides may not change them.
RESERVED = (*quality.RESERVED, "learning_rate", TABLE_LR_FIELD, *(k for k in SHAPE_DEFAULTS if k != "tokens"))


# ----------------------------------------------------------------------------------------------------------
# the grid


@dataclasses.dataclass(frozen=True)
class Shape:
    """What every run of one sweep shares: the model shape, batch, tokens and extra overrides."""

    hidden_size: int
    num_layers: int
    num_heads: int
    context_length: int
    batch_size: int
    tokens: int
    quick: bool = False
    extra: tuple[str, ...] = ()

    def __post_init__(self):
        if self.steps < (1 if self.quick else quality.EVALUATIONS):
            raise ValueError(
                f"tokens={self.tokens:,} is {self.steps} steps of {self.tokens_per_step:,} tokens (batch_size x "
                f"context_length); expected at least {quality.EVALUATIONS} (one evaluation every steps / "
                f"{quality.EVALUATIONS})"
            )

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context_length

    @property
    def steps(self) -> int:
        return self.tokens // self.tokens_per_step

    @property
    def key(self) -> str:
        """Names the shape in every record's file name, so sweeps of other shapes keep apart."""
        tokens = f"{self.tokens // 10**6}M" if self.tokens % 10**6 == 0 else str(self.tokens)
        key = (
            f"d{self.hidden_size}-L{self.num_layers}-H{self.num_heads}-ctx{self.context_length}"
            f"-b{self.batch_size}-{tokens}"
        )
        if self.extra:  # other overrides make other runs: a short hash of them keeps the name short
            key += "-x" + hashlib.sha1(" ".join(self.extra).encode()).hexdigest()[:8]
        return ("quick-" if self.quick else "") + key

    def shared(self, learning_rate: float) -> dict[str, Any]:
        """quality.run_overrides' `shared`: quality.py's run settings with this shape and learning rate."""
        base = quality.QUICK_SHARED if self.quick else quality.SHARED
        fields = ("num_layers", "num_heads", "context_length", "batch_size")
        return {**base, **{f: getattr(self, f) for f in fields}, "learning_rate": learning_rate}

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "extra": list(self.extra), "key": self.key, "steps": self.steps}


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of the grid. table_multiplier is None for kinds without tables, split (intermediate_size, K)
    None for kinds other than OmniMoE. index: (kind, learning rate, multiplier, split, seed) positions in
    their lists (0 = the centre), which the orders sort by."""

    kind: str
    seed: int
    learning_rate: float
    table_multiplier: float | None
    split: tuple[int, int] | None
    index: tuple[int, int, int, int, int]

    @property
    def tier(self) -> int:
        """0 the centre setting, 1 another learning rate, 2 another table multiplier, 3 another split."""
        _, lr, multiplier, split, _ = self.index
        return 3 if split else 2 if multiplier else 1 if lr else 0

    @property
    def name(self) -> str:
        name = f"{self.kind}-lr{self.learning_rate:g}"
        if self.table_multiplier is not None:
            name += f"-tm{self.table_multiplier:g}"
        if self.split is not None:
            name += f"-i{self.split[0]}k{self.split[1]}"
        return f"{name}-seed{self.seed}"

    def filename(self, shape: Shape) -> str:
        return f"{shape.key}__{self.name}.json"


def grid(
    kinds: Sequence[str],
    *,
    seeds: Sequence[int],
    learning_rates: Sequence[float],
    multipliers: Sequence[float],
    splits: Sequence[tuple[int, int]],
) -> list[Run]:
    """Every run of the sweep, kind by kind (the module docstring says which). `multipliers` apply to
    TABLE_KINDS and `splits` to SPLIT_KINDS; their first values are the centre the other axis varies around."""
    for name, values in (("seeds", seeds), ("learning_rates", learning_rates), ("multipliers", multipliers)):
        _check_list(name, values)
    _check_list("splits", splits)
    runs = []
    for k, kind in enumerate(kinds):
        kind_multipliers = list(multipliers) if kind in TABLE_KINDS else [None]
        kind_splits = list(splits) if kind in SPLIT_KINDS else [None]
        # (multiplier, split) positions: every multiplier at the centre split, every other split at the centre
        # multiplier.
        variants = [(m, 0) for m in range(len(kind_multipliers))] + [(0, s) for s in range(1, len(kind_splits))]
        for r, lr in enumerate(learning_rates):
            for m, s in variants:
                for i, seed in enumerate(seeds):
                    runs.append(Run(kind, seed, lr, kind_multipliers[m], kind_splits[s], (k, r, m, s, i)))
    return runs


def _check_list(name: str, values: Sequence) -> None:
    if not values:
        raise ValueError(f"{name}: expected at least one value")
    if len(set(values)) != len(values):
        raise ValueError(f"{name}={list(values)} has repeated values")


def order(runs: list[Run], how: str) -> list[Run]:
    """The runs in the order `how` names. "informative": tier by tier (the centre, other learning rates,
    multipliers, splits), each seed by seed across every kind, so a sweep cut short holds the most comparable
    runs; "grid": kind by kind."""
    if how == "informative":
        return sorted(runs, key=lambda r: (r.tier, r.index[4], r.index[1], r.index[2], r.index[3], r.index[0]))
    if how == "grid":
        return sorted(runs, key=lambda r: r.index)
    raise ValueError(f"order={how!r} must be 'informative' or 'grid'")


def default_splits(hidden_size: int) -> list[tuple[int, int]]:
    """The matched preset's (2d, 5d/2), then (3d, d) and (7d/2, d/4): 3 I + 2 K = 11 d, the same active
    parameters (at d = 512 the splits train_step.py timed: K = 1280, 512, 128)."""
    d = hidden_size
    return [(2 * d, 5 * d // 2), (3 * d, d), (7 * d // 2, d // 4)]


def check_splits(splits: Sequence[tuple[int, int]], hidden_size: int) -> None:
    """ValueError, with the numbers, unless every OmniMoE split (intermediate_size, K) is a valid config whose
    active parameters per token are within SPLIT_TOLERANCE of dense's at width `hidden_size`."""
    base = OmniMoEConfig.small_preset(hidden_size)
    dense = DenseFFNConfig.small_preset(hidden_size).active_parameters()
    d, n = hidden_size, base.num_expert_sqrt
    for intermediate, k in splits:
        try:
            config = base.replace(intermediate_size=intermediate, num_experts_per_token=k)
        except ValueError as err:
            raise ValueError(f"--omnimoe-splits {intermediate}:{k} at d={d}: {err}") from None
        active = config.active_parameters()
        if abs(active / dense - 1) > SPLIT_TOLERANCE:
            matched = (dense - 2 * d * n - 2 * d * k) / (3 * d)  # 3 d I + 2 d n + 2 d K = dense's 12 d^2
            raise ValueError(
                f"--omnimoe-splits {intermediate}:{k} at d={d}: OmniMoE's active parameters per token and layer "
                f"are {active:,} (3 d I + 2 d n + 2 d K with n={n}), {active / dense - 1:+.2%} from dense's "
                f"{dense:,}; at most {SPLIT_TOLERANCE:.0%} apart (K={k} matches at intermediate_size {matched:g})"
            )


def run_entry(run: Run, shape: Shape) -> dict[str, Any]:
    """{"kind", "overrides", "tokens_per_step"}: what `quality.run_one` runs; the config is built here (nothing
    allocated), so a refused one fails the plan, naming the run, before anything trains."""
    ffn = matched_ffn_overrides(run.kind, shape.hidden_size)
    if run.split is not None:
        ffn["ffn.intermediate_size"], ffn["ffn.num_experts_per_token"] = map(str, run.split)
    # The table settings (table_lr_decay_to_one, table_weight_decay) go to the kinds with tables alone: the
    # others have none for them to change.
    extra = [e for e in shape.extra if run.kind in TABLE_KINDS or not e.startswith("--table_")]
    if run.table_multiplier is not None:
        extra.append(f"--{TABLE_LR_FIELD}={run.table_multiplier:g}")
    overrides = quality.run_overrides(
        run.kind,
        hidden_size=shape.hidden_size,
        steps=shape.steps,
        seed=run.seed,
        quick=shape.quick,
        extra=extra,
        shared=shape.shared(run.learning_rate),
        ffn=ffn,
    )
    try:
        config = apply_overrides(get_preset(quality.BASE_PRESET), parse_overrides(overrides))
    except ValueError as err:
        raise ValueError(f"{run.name}: config refused: {err}") from None
    return {"kind": run.kind, "overrides": overrides, "tokens_per_step": config.tokens_per_step}


# ----------------------------------------------------------------------------------------------------------
# records


def make_record(run: Run, shape: Shape, records: list[dict], outcome: dict, environment: dict) -> dict:
    """One run's JSON record from its metrics records and how its process ended (`quality.run_one`).

    status: "done" (every step, a final evaluation), "diverged" (a non-finite loss: a result too, of a bad
    setting), "stopped" (the budget ran out: not a result; the run resumes, or starts again, next time) or
    "error".
    """
    row = quality.summarise(run.kind, records, outcome, shape.steps)
    start = next((r for r in records if r["kind"] == "start"), None)
    end = next((r for r in reversed(records) if r["kind"] == "end"), None)
    evals = [r for r in records if r["kind"] == "eval"]
    if end is not None and end["reason"] == divergence.REASON:
        status = "diverged"
    elif row["status"] == "done" and evals and evals[-1]["step"] == shape.steps:
        status = "done"
    elif row["status"].startswith("stopped") or outcome.get("killed"):
        status = "stopped"
    else:
        status = "error"
    record = {
        **environment,  # the sweep's: versions, machine, the sweep's own command line as sweep_command
        "sweep_command": environment["command"],
        "command": shlex.join(outcome["command"]) if "command" in outcome else None,  # this run's
        "date": common.utc_now(),
        "device": start["device"] if start else environment["device"],
        "name": run.name,
        "shape": shape.to_dict(),
        "kind": run.kind,
        "seed": run.seed,
        "learning_rate": run.learning_rate,
        "table_multiplier": run.table_multiplier,
        "split": None if run.split is None else dict(zip(("intermediate_size", "K"), run.split, strict=True)),
        "tier": TIERS[run.tier],
        "status": status,
        "detail": row["status"] if status != "error" else row.get("error"),
        # Only a finished run's last evaluation is its result; the curve keeps what the others evaluated.
        "bits_per_byte": row.get("bits_per_byte") if status == "done" else None,
        "val_loss": row.get("val_loss") if status == "done" else None,
        "eval_step": row.get("eval_step"),
        "steps": row.get("steps"),
        "planned_steps": shape.steps,
        "tokens": row.get("tokens"),
        "planned_tokens": shape.steps * shape.tokens_per_step,
        "routing": evals[-1].get("routing") if evals else None,
        "routing_per_layer": evals[-1].get("routing_per_layer") if evals else None,
        "active_params": row.get("active_params"),
        "total_params": row.get("total_params"),
        "compile_s": row.get("compile_s"),
        "tokens_per_s": row.get("tokens_per_s"),
        "train_s": end["elapsed_s"] if end else None,
        "wall_s": outcome.get("wall_s"),
        # A resumed run's metrics hold every segment; an evaluation repeated at the step it resumed from is kept once.
        "curve": list({p["step"]: p for p in quality.eval_curve(records, shape.tokens_per_step)}.values()),
        "config": start["config"] if start else None,
    }
    if status == "error":
        record["log_tail"] = outcome.get("log_tail", [])
    return record


def load_records(results_dir: pathlib.Path) -> list[dict]:
    """Every run record in `results_dir` (none if it does not exist), in file-name order."""
    if not results_dir.is_dir():
        return []
    return [json.loads(path.read_text()) for path in sorted(results_dir.glob("*.json"))]


def should_run(record: dict | None, *, retry_errors: bool) -> bool:
    """A run without a record, stopped by a budget, or (with retry_errors) failed, runs (again)."""
    if record is None or record["status"] == "stopped":
        return True
    return retry_errors and record["status"] == "error"


def expected_seconds(records: list[dict], shape: Shape, run: Run) -> float | None:
    """The wall time of the newest finished run of this kind and split at this shape (the longest of the
    newest if several share its date), or without one the newest stopped one's scaled to all its steps;
    None when there is neither (the run is then started whatever is left). The newest, not the longest of
    all: the code gets faster between slices, and a record from before a speed-up would keep short slices
    from starting the run. A finished run before a stopped one: a run stopped early is mostly its start-up,
    which scaling by its steps multiplies."""
    split = None if run.split is None else dict(zip(("intermediate_size", "K"), run.split, strict=True))
    finished, stopped = [], []  # (date, seconds)
    for r in records:
        if (r["shape"]["key"], r["kind"], r["split"]) != (shape.key, run.kind, split) or not r.get("wall_s"):
            continue
        if r["status"] in ("done", "diverged"):
            finished.append((r.get("date", ""), r["wall_s"]))
        elif r["status"] == "stopped" and r.get("steps"):
            stopped.append((r.get("date", ""), r["wall_s"] * r["planned_steps"] / r["steps"]))
    times = finished or stopped
    return max(times)[1] if times else None


# ----------------------------------------------------------------------------------------------------------
# running


def sweep(
    runs: list[Run],
    shape: Shape,
    results_dir: pathlib.Path,
    runs_dir: pathlib.Path,
    *,
    budget_s: float,
    retry_errors: bool,
    child_env: dict[str, str],
    environment: dict,
) -> dict[str, int]:
    """Run, in order, the runs that should run and fit in the budget; returns counts of what happened.

    Each run trains in `runs_dir/<shape>__<run>`, removed once its record is a result or an error. A run the
    budget stopped keeps its directory (and the checkpoint its time limit saved), so a later slice on the
    same machine resumes it (`python -m train --resume`); elsewhere it starts again from step 0.
    """
    start = time.time()
    records = load_records(results_dir)
    by_name = {(r["shape"]["key"], r["name"]): r for r in records}
    counts = {"skipped (recorded)": 0, "ran": 0, "not started (would not fit)": 0, "left (budget spent)": 0}
    for i, run in enumerate(runs):
        previous = by_name.get((shape.key, run.name))
        if not should_run(previous, retry_errors=retry_errors):
            counts["skipped (recorded)"] += 1
            continue
        left = budget_s - (time.time() - start)
        if left < MIN_START_S:
            counts["left (budget spent)"] = sum(
                should_run(by_name.get((shape.key, r.name)), retry_errors=retry_errors) for r in runs[i:]
            )
            break
        run_dir = runs_dir / f"{shape.key}__{run.name}"
        # A stopped run with steps done and its directory here resumes (one killed before its first step, or
        # whose directory went with another machine, starts again).
        resume = bool(
            previous and previous["status"] == "stopped" and previous["steps"] and (run_dir / "config.json").exists()
        )
        if resume:
            expected = previous["wall_s"] * (previous["planned_steps"] - previous["steps"]) / max(previous["steps"], 1)
        else:
            expected = expected_seconds(records, shape, run)
        # Deferred only if a later slice could hold it whole; one longer than any slice starts (and resumes in
        # the next slice on this machine), and a resumed one keeps what it trains.
        if not resume and expected is not None and left < expected <= budget_s:
            print(f"{run.name}: not started: expected {expected:.0f} s, {left:.0f} s of the budget left", flush=True)
            counts["not started (would not fit)"] += 1
            continue
        if not resume and run_dir.exists():  # what a killed or failed attempt left: this run starts again
            shutil.rmtree(run_dir)
        runs_dir.mkdir(parents=True, exist_ok=True)
        entry = run_entry(run, shape)
        what = f"resuming at step {previous['steps']}" if resume else " ".join(entry["overrides"])
        print(f"{run.name} ({TIERS[run.tier]}): {left:.0f} s left; {what}", flush=True)
        outcome = quality.run_one(
            entry,
            run_dir,
            child_env,
            limit_minutes=quality.time_limit_minutes(left),
            timeout_s=left + quality.GRACE_S,
            resume=resume,
        )
        metrics = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
        record = make_record(run, shape, metrics, outcome, environment)
        if resume:  # the record covers every segment of the run
            record["wall_s"] = round(previous["wall_s"] + record["wall_s"], 1)
            record["segments"] = previous.get("segments", 1) + 1
        if record["status"] != "stopped":
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.with_name(run_dir.name + ".log").unlink(missing_ok=True)
        path = results_dir / run.filename(shape)
        common.write_json_atomic(path, record)
        common.copy_to_out(path, under=results_dir.name)
        records = [r for r in records if (r["shape"]["key"], r["name"]) != (shape.key, run.name)] + [record]
        by_name[(shape.key, run.name)] = record
        counts["ran"] += 1
        bits = "-" if record["bits_per_byte"] is None else f"{record['bits_per_byte']:.4f}"
        print(f"{run.name}: {record['detail']}, {bits} bits/byte, {record['wall_s']} s -> {path}", flush=True)
    return counts


def print_plan(runs: list[Run], shape: Shape, results_dir: pathlib.Path) -> None:
    """--list: every run in order, its state and (where known) its expected time."""
    records = load_records(results_dir)
    by_name = {(r["shape"]["key"], r["name"]): r for r in records}
    rows = []
    for i, run in enumerate(runs):
        record = by_name.get((shape.key, run.name))
        expected = expected_seconds(records, shape, run)
        rows.append(
            {
                "#": i,
                "run": run.name,
                "tier": TIERS[run.tier],
                "state": "pending" if record is None else record["status"],
                "bits/byte": None if record is None else record.get("bits_per_byte"),
                "wall s": None if record is None else record.get("wall_s"),
                "expected s": None if expected is None else round(expected),
            }
        )
    common.print_table(rows, list(rows[0]) if rows else [])
    pending = [r for r in rows if r["state"] in ("pending", "stopped")]
    known = [r["expected s"] for r in pending if r["expected s"] is not None]
    print(
        f"\n{shape.key}: {len(runs)} runs, {len(runs) - len(pending)} recorded, {len(pending)} to run "
        f"({len(known)} with an estimate, {sum(known) / 60:.1f} minutes together)"
    )


# ----------------------------------------------------------------------------------------------------------
# combining


def seed_stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, standard deviation over seeds (n - 1; None for one seed), min and max."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def _setting(record: dict) -> tuple:
    split = record["split"]
    return (
        record["learning_rate"],
        record["table_multiplier"],
        None if split is None else (split["intermediate_size"], split["K"]),
    )


def configurations(records: list[dict]) -> list[dict]:
    """One row per (shape, kind, learning rate, multiplier, split) from the done and diverged records:
    its seeds, their bits per byte statistics (none if a seed diverged) and mean routing health."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        if record["status"] in ("done", "diverged"):
            groups.setdefault((record["shape"]["key"], record["kind"], *_setting(record)), []).append(record)
    rows = []
    for (key, kind, lr, multiplier, split), members in groups.items():
        members = sorted(members, key=lambda r: r["seed"])
        diverged = [r["seed"] for r in members if r["status"] == "diverged"]
        row = {
            "shape": key,
            "kind": kind,
            "learning_rate": lr,
            "table_multiplier": multiplier,
            "split": None if split is None else {"intermediate_size": split[0], "K": split[1]},
            "seeds": [r["seed"] for r in members],
            "diverged_seeds": diverged,
            "values": [r["bits_per_byte"] if r["status"] == "done" else None for r in members],  # seed by seed
        }
        if not diverged:
            row.update(seed_stats([r["bits_per_byte"] for r in members]))
        for name in ("experts_used", "load_entropy", "max_load", "router_entropy"):
            values = [r["routing"][name] for r in members if r.get("routing") and name in r["routing"]]
            row[name] = statistics.fmean(values) if values else None
        rows.append(row)
    return rows


def best_per_kind(configs: list[dict]) -> list[dict]:
    """Each (shape, kind) at its best configuration: the lowest mean among those with the most seeds (so a
    lucky single seed cannot beat a two-seed mean), with how many configurations and learning rates it was
    chosen from and whether a learning rate was tried on either side of the best one."""
    rows = []
    for key, kind in dict.fromkeys((c["shape"], c["kind"]) for c in configs):
        own = [c for c in configs if (c["shape"], c["kind"]) == (key, kind)]
        finished = [c for c in own if "mean" in c]
        if not finished:
            rows.append({"shape": key, "kind": kind, "status": "every configuration diverged", "configurations": 0})
            continue
        most = max(len(c["seeds"]) for c in finished)
        candidates = [c for c in finished if len(c["seeds"]) == most]
        best = min(candidates, key=lambda c: c["mean"])
        rates = sorted({c["learning_rate"] for c in candidates})
        rows.append(
            {
                **best,
                "status": "done",
                "configurations": len(candidates),
                "learning_rates": rates,
                "lr_bracketed": rates[0] < best["learning_rate"] < rates[-1],
            }
        )
    return rows


def target(best: list[dict], shape: str) -> dict[str, Any]:
    """Issue 13's target at one shape from `best_per_kind`'s rows: met True/False, or None with what is
    missing (every one of omnimoe and RIVALS needs >= 2 seeds at >= 2 learning rates)."""
    rows = {r["kind"]: r for r in best if r["shape"] == shape and "mean" in r}
    missing = []
    for kind in ("omnimoe", *RIVALS):
        row = rows.get(kind)
        if row is None:
            missing.append(f"{kind}: no finished configuration")
        elif len(row["seeds"]) < 2 or len(row["learning_rates"]) < 2:
            missing.append(f"{kind}: {len(row['seeds'])} seed(s) at {len(row['learning_rates'])} learning rate(s)")
    claim = (
        "OmniMoE's mean validation bits/byte below dense's by more than twice the seed-to-seed spread, and below "
        "DeepSeekMoE's and PEER's, each kind at its own best configuration"
    )
    if missing:
        return {"shape": shape, "claim": claim, "met": None, "missing": missing}
    omni, dense = rows["omnimoe"], rows["dense"]
    spread = max(omni["std"], dense["std"])
    margin = dense["mean"] - omni["mean"]
    beats = {kind: omni["mean"] < rows[kind]["mean"] for kind in RIVALS if kind != "dense"}
    return {
        "shape": shape,
        "claim": claim,
        "margin_over_dense": margin,
        "spread": spread,
        "beats_dense_by_two_spreads": margin > 2 * spread,
        **{f"beats_{kind}": won for kind, won in beats.items()},
        "met": margin > 2 * spread and all(beats.values()),
    }


def combine(records: list[dict]) -> dict[str, Any]:
    """The combined result's fields: rows (best per kind), configurations, targets, runs (one line each)."""
    configs = configurations(records)
    best = best_per_kind(configs)
    shapes = list(dict.fromkeys(r["shape"]["key"] for r in records))
    return {
        "rows": best,
        "configurations": configs,
        "targets": [target(best, shape) for shape in shapes],
        "shapes": {r["shape"]["key"]: r["shape"] for r in records},
        "runs": [
            {k: r.get(k) for k in ("name", "status", "detail", "bits_per_byte", "wall_s", "date")}
            | {"shape": r["shape"]["key"]}
            for r in records
        ],
    }


def _label(row: dict) -> str:
    parts = [row["kind"]]
    if row.get("table_multiplier") is not None:
        parts.append(f"tm {row['table_multiplier']:g}")
    if row.get("split") is not None:
        parts.append(f"{row['split']['intermediate_size']}:{row['split']['K']}")
    return " ".join(parts)


def print_combined(result: dict) -> None:
    for shape in result["shapes"]:
        rows = [r for r in result["rows"] if r["shape"] == shape]
        shown = [
            {
                "kind": _label(r),
                "lr": r.get("learning_rate"),
                "seeds": len(r.get("seeds", [])),
                "mean bpb": r.get("mean"),
                "std": r.get("std"),
                "min": r.get("min"),
                "max": r.get("max"),
                "configs": r["configurations"],
                "lr bracketed": r.get("lr_bracketed"),
                "used": r.get("experts_used"),
                "load entropy": r.get("load_entropy"),
                "max load": r.get("max_load"),
            }
            for r in rows
        ]
        print(f"\n{shape}: each kind at its best configuration (validation bits per byte over seeds)")
        common.print_table(shown, list(shown[0]) if shown else [])
    for t in result["targets"]:
        if t["met"] is None:
            print(f"\n{t['shape']}: target not judged yet: {'; '.join(t['missing'])}")
        else:
            verdict = "met" if t["met"] else "NOT met"
            print(
                f"\n{t['shape']}: target {verdict}: dense - omnimoe = {t['margin_over_dense']:+.4f} bits/byte "
                f"against 2 x spread {2 * t['spread']:.4f}; "
                + ", ".join(f"{k.removeprefix('beats_')}: {v}" for k, v in t.items() if k.startswith("beats_"))
            )


def plot(result: dict, path: pathlib.Path) -> None:
    """Mean validation bits per byte against the learning rate (min..max over seeds as bars), one line per
    kind and variant, one panel per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(result["shapes"])
    fig, axes = plt.subplots(1, len(shapes), figsize=(7 * len(shapes), 4.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        configs = [c for c in result["configurations"] if c["shape"] == shape and "mean" in c]
        for i, label in enumerate(dict.fromkeys(_label(c) for c in configs)):
            line = sorted((c for c in configs if _label(c) == label), key=lambda c: c["learning_rate"])
            x = [c["learning_rate"] for c in line]
            y = [c["mean"] for c in line]
            bars = [[c["mean"] - c["min"] for c in line], [c["max"] - c["mean"] for c in line]]
            ax.errorbar(x, y, yerr=bars, fmt="o-", capsize=3, color=f"C{i % 10}", label=label)
        ax.set_xscale("log")
        ax.set(xlabel="base learning rate", ylabel="validation bits per byte (mean; bars: min..max)", title=shape)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"quality sweep, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_combined(results_dir: pathlib.Path) -> pathlib.Path:
    """--combine: `<results_dir>.json` and `.png` from every record in results_dir."""
    records = load_records(results_dir)
    if not records:
        raise SystemExit(f"--combine: no run records in {results_dir}")
    devices = {r["device"] for r in records}
    if len(devices) > 1:
        raise SystemExit(f"--combine: the runs were on different devices {sorted(devices)}; keep one per folder")
    result = combine(records)
    (device,) = devices
    versions = [r["versions"] for r in records]
    result.update(
        {
            **common.environment(),  # this merge's command; the device and versions are the runs'
            "device": device,
            "platform": records[-1]["platform"],
            "cpu_count": records[-1]["cpu_count"],
            "versions": versions[0] if all(v == versions[0] for v in versions) else None,
            "date": max(r["date"] for r in records),
            "sweep_commands": sorted({r["sweep_command"] for r in records}),
        }
    )
    print_combined(result)
    path = results_dir.parent / f"{results_dir.name}.json"
    png = path.with_suffix(".png")
    plot(result, png)
    common.write_json_atomic(path, result)
    print(f"\nwrote {path} and {png} from {len(records)} run records")
    common.copy_to_out(path, png)
    return path


# ----------------------------------------------------------------------------------------------------------
# main


def _numbers(text: str, kind: type, name: str) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected comma-separated {kind.__name__}s") from None


def _splits(text: str) -> list[tuple[int, int]]:
    splits = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        size, _, k = item.partition(":")
        if not (size.isdigit() and k.isdigit()):
            raise ValueError(f"--omnimoe-splits item {item!r}: expected intermediate_size:K, as 512:640")
        splits.append((int(size), int(k)))
    return splits


def _tokens(text: str) -> int:
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise ValueError(f"--tokens={text!r}: expected a count such as 40000000 or 40M") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Other --key=value arguments go to every run (see `python -m train --help`; the --table_* ones to "
        "the kinds with tables alone) and name the shape.",
    )
    parser.add_argument("--ffn", default=",".join(SWEEP_KINDS), help="comma-separated FFN kinds")
    for field, (default, quick) in SHAPE_DEFAULTS.items():
        parser.add_argument(f"--{field.replace('_', '-')}", default=None, help=f"default {default} ({quick} quick)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--learning-rates", default=DEFAULT_LEARNING_RATES, help="base learning rates (>= 2)")
    parser.add_argument("--table-multipliers", default=DEFAULT_MULTIPLIERS, help=f"{TABLE_LR_FIELD} values")
    parser.add_argument("--omnimoe-splits", default=None, help="intermediate_size:K,... (default: K = 5d/2, d, d/4)")
    parser.add_argument("--order", default="informative", choices=["informative", "grid"])
    parser.add_argument("--budget-minutes", type=float, default=8.0, help="no run starts (or goes on) past this")
    parser.add_argument("--results-dir", default=None, help=f"run records (default {RESULTS_DIR}; --quick: a tmp dir)")
    parser.add_argument("--runs-dir", default=None, help=f"run directories (default {RUNS_DIR}; --quick: a tmp dir)")
    parser.add_argument("--retry-errors", action="store_true", help="run failed runs again")
    parser.add_argument("--list", action="store_true", help="print the plan and what is recorded; run nothing")
    parser.add_argument("--combine", action="store_true", help="merge the records into <results-dir>.json")
    parser.add_argument("--quick", action="store_true", help="tiny f32 runs on a CPU, into a tmp dir")
    args, extra = parser.parse_known_args(argv)
    if args.results_dir:
        results_dir = pathlib.Path(args.results_dir)
    elif args.quick:
        results_dir = pathlib.Path(tempfile.mkdtemp(prefix="quality-sweep-quick-")) / "quality_sweep"
    else:
        results_dir = RESULTS_DIR
    default_runs = results_dir.parent / "runs" if args.quick else RUNS_DIR
    runs_dir = pathlib.Path(args.runs_dir) if args.runs_dir else default_runs
    if args.combine:
        write_combined(results_dir)
        return 0
    try:
        parse_overrides(extra)  # a malformed extra argument fails here, not in every run
        quality.check_extra(extra, RESERVED, "this script's flags")
        kinds = [k.strip() for k in args.ffn.split(",") if k.strip()]
        quality.check_kinds(kinds)
        values = {}
        for field, (default, quick) in SHAPE_DEFAULTS.items():
            text = getattr(args, field)
            values[field] = (quick if args.quick else default) if text is None else _tokens(text)
        # One spelling per override ("--key=value"), so the same overrides name the same shape.
        extra = [f"--{key}" if value is None else f"--{key}={value}" for key, value in parse_overrides(extra).items()]
        shape = Shape(**values, quick=args.quick, extra=tuple(extra))
        learning_rates = _numbers(args.learning_rates, float, "--learning-rates")
        if len(learning_rates) < 2 and not args.quick:
            raise ValueError(f"--learning-rates={args.learning_rates}: expected >= 2 (each kind at its own best)")
        multipliers = _numbers(args.table_multipliers, float, "--table-multipliers")
        splits = _splits(args.omnimoe_splits) if args.omnimoe_splits else default_splits(shape.hidden_size)
        if any(kind in SPLIT_KINDS for kind in kinds):
            check_splits(splits, shape.hidden_size)
        runs = grid(
            kinds,
            seeds=_numbers(args.seeds, int, "--seeds"),
            learning_rates=learning_rates,
            multipliers=multipliers,
            splits=splits,
        )
        runs = order(runs, args.order)
        for run in runs:
            run_entry(run, shape)  # every config checked before anything runs
    except ValueError as err:
        parser.error(str(err))
    if args.list:
        print_plan(runs, shape, results_dir)
        return 0

    # The runs own the device; this process only names it, without JAX's preallocation.
    child_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(quality.REPO), os.environ.get("PYTHONPATH")])),
    }
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    start = time.time()
    print(f"{shape.key}: {len(runs)} runs of {shape.steps} steps x {shape.tokens_per_step:,} tokens -> {results_dir}")
    counts = sweep(
        runs,
        shape,
        results_dir,
        runs_dir,
        budget_s=60 * args.budget_minutes,
        retry_errors=args.retry_errors,
        child_env=child_env,
        environment=common.environment(),
    )
    print(f"\n{shape.key} after {time.time() - start:.0f} s: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
