"""The run's metrics.jsonl: its records, how each is written and shown on the console, and the routing
health the eval records hold.

metrics.jsonl records, one JSON object per line, `kind` first, each written by one `log_<kind>` below
(which also prints its console line):

- start: step (0, or the step resumed from), resumed, resumed_from (the checkpoint restored, or null),
  skipped_checkpoints (newer checkpoints that failed verification: [{step, reason, moved_to}]), config,
  parameters {total, active}, corpus {source, byte_level, train_tokens, validation_tokens,
  train_documents, validation_documents}, device, jax, compile_s (every compilation of the train step,
  one per grad_accum "auto" tried), memory {requested_grad_accum (an int or "auto"), grad_accum (the one
  trained with, config's too), estimate_gb (XLA's estimate of its step, null where the backend has none),
  limit_gb (the device's), tried: [[grad_accum, estimate_gb], ...]} (`train.memory.MemoryFit`),
  model_flops_per_token (`train.flops`),
  peak_flops_per_device (the datasheet bf16 peak of the device kind, null where unknown), mesh
  ({"data": D, "expert": E}, or null on one device), processes.
- train: step, the fields of `TRAIN_FIELDS` that apply to the run (loss, [aux_loss], learning_rate,
  [table_learning_rate], grad_norm, dropped_pairs: each documented there), tokens_per_s (training time
  only, since the previous record), mfu (model FLOPs utilisation of that throughput against every device's
  datasheet bf16 peak; null where the device kind is unknown, as on a CPU), tokens_seen, elapsed_s.
- eval: step, val_loss (mean nats per validation target token), bits_per_byte (nats / ln 2 over the byte
  targets, BOS/EOS excluded; with a tokenizer, val_loss * validation tokens / validation bytes / ln 2;
  null for pre-tokenised corpora), tokens, dropped_pairs (expert-parallel dispatch drops over the
  evaluation, as in the train record), routing (the mean over the sparse layers of each routing field, below)
  and routing_per_layer (the same for each sparse layer, with its index). No routing fields for the dense FFN.
- checkpoint: step, seconds.
- end: step, reason ("done", "stop_at_step", "time limit", "SIGINT", "SIGTERM", "non-finite loss", or
  in a multi-process run "another process stopped"), the train fields summed over a window (dropped_pairs)
  over the steps after the last train record, elapsed_s; with "non-finite loss" also nonfinite_step (the
  first step not applied: `train.divergence`).

Routing health, per sparse layer, over all tokens of one evaluation: every sparse FFN sows per-layer sums into
the "metrics" collection under the names of `ROUTING_STATISTICS` it has (expert_counts always; router_entropy,
dropped_pairs or balance_loss where the kind has them), which the eval step reads (`sown_statistics`); each
entry of the table says which routing fields it gives, how, and how the console shows them. The dense FFN
sows none.

Adding a metric is one entry in one table: `TRAIN_FIELDS` (a train-record field, computed in the train step
from its `StepValues`) or `ROUTING_STATISTICS` (an eval routing field, from a statistic the FFN modules sow).
The steps, the loop, the records and the console lines read the tables.

Expert-parallel dropped pairs (the train/eval record's top-level `dropped_pairs`, not the routing field
above): routed (token, expert) pairs an expert-parallel OmniMoE or FlashMoE layer had no dispatch slot for
(only with `expert_capacity_factor` set on a mesh; always 0 otherwise), summed over layers: sown as
"dispatch_dropped_pairs" into "intermediates" (`dispatch_dropped_pairs`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from omnimoe_jax._model import parameter_counts
from train.config import TrainConfig
from train.flops import model_flops_per_token, peak_flops

Log = Callable[[str], None]  # prints one console line

if TYPE_CHECKING:  # train.steps reads the sown statistics with this module's helpers: no import at run time
    from train.steps import Steps, TrainState


# ---------------------------------------------------------------------------------------------------------
# The metrics, each declared once: what it is, how it is computed and reduced, how the console shows it.

StepValues = dict[str, Any]
"""What the train step exposes to `TrainField.value`, all computed inside the jitted step: loss and aux_loss
(cross-entropy and the sown auxiliary losses, means over the micro-batches; aux_loss is 0 for the kinds that
sow none), dropped_pairs ([] int32, expert-parallel dispatch drops summed over micro-batches and layers:
`dispatch_dropped_pairs`), grads (the averaged gradients), grad_norm (their global norm, before clipping),
updates (the optimizer's), params (before the update), new_params (after it), learning_rate (of this update)
and step (the state's step before it)."""


@dataclasses.dataclass(frozen=True)
class TrainField:
    """A field of the train record.

    Attributes:
      doc: what it is (for readers of this table).
      value: the field from the train step's `StepValues`, a [] array (computed inside the jitted step).
      console: format of its piece of the progress line, applied to its value (None: record only).
      window: "last" (the logged step's value) or "sum" (summed over every step since the previous train
        record; the steps after the last train record report their sum in the end record).
      show_zero: False leaves the console piece out while the value is 0.
      applies: whether a run of `config` records the field.
    """

    doc: str
    value: Callable[[StepValues], jax.Array]
    console: str | None
    window: str = "last"
    show_zero: bool = True
    applies: Callable[[TrainConfig], bool] = lambda config: True


TRAIN_FIELDS: dict[str, TrainField] = {  # record and console order
    "loss": TrainField("mean nats per target token over the step's batch", lambda v: v["loss"], "loss {:.4f}"),
    "aux_loss": TrainField(
        "the auxiliary loss term of the objective, before aux_loss_coefficient (the kinds that sow one)",
        lambda v: v["aux_loss"],
        "aux {:.4f}",
        applies=lambda config: config.model.ffn.sows_aux_loss,
    ),
    "learning_rate": TrainField("used by this step", lambda v: v["learning_rate"], "lr {:.2e}"),
    "table_learning_rate": TrainField(
        "the expert tables' learning rate of this step, when a table field of the config is set "
        "(`train.steps.make_optimizer`)",
        lambda v: v["table_learning_rate"],
        "tables lr {:.2e}",
        applies=lambda config: config.has_table_group,
    ),
    "grad_norm": TrainField("before clipping", lambda v: v["grad_norm"], "grad norm {:.3f}"),
    "dropped_pairs": TrainField(
        "routed (token, expert) pairs dropped for lack of expert-parallel dispatch capacity in all steps since "
        "the previous train record; 0 unless expert_capacity_factor is set and the run has a mesh",
        lambda v: v["dropped_pairs"],
        "dropped pairs {:,}",
        window="sum",
        show_zero=False,
    ),
}


def train_fields(config: TrainConfig) -> dict[str, TrainField]:
    """The `TRAIN_FIELDS` a run of `config` records, in order."""
    return {name: field for name, field in TRAIN_FIELDS.items() if field.applies(config)}


class TrainWindow:
    """The train fields summed over the steps since the last train record (`TrainField.window == "sum"`),
    kept as device arrays so that a step that is not logged reads nothing back."""

    def __init__(self, config: TrainConfig):
        self.names = [name for name, field in train_fields(config).items() if field.window == "sum"]
        self.values: dict[str, list[jax.Array]] = {name: [] for name in self.names}

    def add(self, metrics: dict[str, jax.Array]) -> None:
        for name in self.names:
            self.values[name].append(metrics[name])

    def take(self) -> dict[str, Any]:
        """{name: sum since the last take} as Python numbers (waits for the steps); starts a new window."""
        sums = {name: sum(np.asarray(v).item() for v in jax.device_get(self.values[name])) for name in self.names}
        self.values = {name: [] for name in self.names}
        return sums


@dataclasses.dataclass(frozen=True)
class LayerTotals:
    """What every routing statistic of one sparse layer may read, over one evaluation: counts [N] (its
    expert_counts: how many of the T K assignments each expert received), tokens T and the batches."""

    counts: np.ndarray
    tokens: int
    num_batches: int


@dataclasses.dataclass(frozen=True)
class RoutingStatistic:
    """A per-layer sum the sparse FFNs sow into "metrics" under the table's name, summed over an
    evaluation's batches, and the routing fields of the eval record it gives.

    Attributes:
      doc: what its fields are (for readers of this table).
      fields: the routing fields it gives, in record order.
      report: their values for one layer, from its evaluation total and the layer's `LayerTotals`.
      console: format of its piece of the eval line, applied to the mean over layers of `fields` (by name).
    """

    doc: str
    fields: tuple[str, ...]
    report: Callable[[np.ndarray, LayerTotals], tuple[float, ...]]
    console: str


def _load_health(counts: np.ndarray) -> tuple[float, float, float]:
    load = np.asarray(counts, np.float64)
    share = load / load.sum()
    nonzero = share[share > 0]
    entropy = -np.sum(nonzero * np.log(nonzero)) / math.log(load.size)
    return float(np.mean(load > 0)), float(load.max() / load.mean()), float(entropy)


# For PEER and PKM an assignment is a (head, slot) retrieval and PKM's "experts" are its value rows.
ROUTING_STATISTICS: dict[str, RoutingStatistic] = {  # record and console order
    "expert_counts": RoutingStatistic(
        "experts_used: fraction of the N experts chosen by at least one token (ideal 1; the used fraction); "
        "max_load: the most-chosen expert's count over the mean count T K / N (ideal 1; large = a hot expert); "
        "load_entropy: entropy of the expert load distribution / log N (1 = uniform load)",
        ("experts_used", "max_load", "load_entropy"),
        lambda counts, layer: _load_health(counts),
        "experts used {experts_used:.3f} | max load {max_load:.2f}x | load entropy {load_entropy:.3f}",
    ),
    "router_entropy": RoutingStatistic(
        "OmniMoE, FlashMoE: mean over tokens of H(p_x) + H(p_y), the entropy of the token's whole routing "
        "distribution p_x(i) p_y(j) over the N experts, / log N (1 = uniform; falls as routing sharpens)",
        ("router_entropy",),
        lambda total, layer: (float(total / layer.tokens / math.log(layer.counts.size)),),
        "router entropy {router_entropy:.3f}",
    ),
    "dropped_pairs": RoutingStatistic(
        'GShard, DeepSeekMoE with dispatch="capacity": (token, expert) pairs over an expert\'s capacity, which '
        "contribute nothing, summed over the evaluation, and their share of T K",
        ("dropped_pairs", "dropped_fraction"),
        lambda total, layer: (int(total), float(total / np.sum(layer.counts))),  # counts: every pair
        "dropped {dropped_fraction:.2%}",
    ),
    "balance_loss": RoutingStatistic(
        "GShard, DeepSeekMoE: the unweighted load-balancing loss, mean over evaluation batches (1 = balanced)",
        ("balance_loss",),
        lambda total, layer: (float(total / layer.num_batches),),
        "balance {balance_loss:.3f}",
    ),
}


def routing_health(counts, entropy_sum: float | None, num_tokens: int) -> dict[str, float]:
    """One layer's routing fields as the eval record has them (`ROUTING_STATISTICS`), from its accumulated
    expert counts [N] over `num_tokens` tokens and, for OmniMoE and FlashMoE, its summed routing entropy
    (None: leave router_entropy out): experts_used, max_load, load_entropy[, router_entropy]. For notebooks
    and studies of one layer outside an evaluation."""
    layer = LayerTotals(np.asarray(counts), num_tokens, num_batches=1)
    totals = {"expert_counts": layer.counts, **({} if entropy_sum is None else {"router_entropy": entropy_sum})}
    health: dict[str, float] = {}
    for name, total in totals.items():
        statistic = ROUTING_STATISTICS[name]
        health.update(zip(statistic.fields, statistic.report(total, layer), strict=True))
    return health


def dispatch_dropped_pairs(collections: Any) -> jax.Array:
    """[] int32: the "dispatch_dropped_pairs" every OmniMoE or FlashMoE layer's experts sowed into the
    "intermediates" collection (`omnimoe_jax.AtomicExperts`), summed.

    `collections`: the mutable collections an `apply(..., mutable=["intermediates", ...])` returned.
    """
    total = jnp.zeros((), jnp.int32)
    for path, leaf in jax.tree_util.tree_leaves_with_path(collections.get("intermediates", {})):
        # sow stores a tuple per call: path ends in ('dispatch_dropped_pairs', 0)
        if any(getattr(key, "key", None) == "dispatch_dropped_pairs" for key in path):
            total = total + leaf.astype(jnp.int32)
    return total


def sown_statistics(metrics: dict[str, Any], layers: Sequence[int]) -> dict[str, jax.Array]:
    """Per-layer sums for one batch from the "metrics" collection every sparse FFN sows its routing into.

    metrics: {layer_<i>: {ffn: {name: (value,)}}} (flax keeps a tuple of one value per call);
    layers: the sparse layers, in order. Returns {name: [M, ...]} for every name of `ROUTING_STATISTICS` the
    layers sow: expert_counts [M, N] int32 always, router_entropy [M] (OmniMoE, FlashMoE:
    `omnimoe_jax.routing_statistics`), dropped_pairs [M] and balance_loss [M] (the capacity-bound and the
    balanced MoEs).
    """
    per_layer = [metrics[f"layer_{i}"]["ffn"] for i in layers]
    sums = {}
    for name in ROUTING_STATISTICS:
        if name in per_layer[0]:
            sums[name] = jnp.stack([sum(layer[name]) for layer in per_layer])  # [M, ...]
    return sums


def routing_report(totals: dict[str, np.ndarray], layers: Sequence[int], *, num_batches: int) -> dict[str, Any]:
    """The eval record's routing fields from an evaluation's summed statistics (`ROUTING_STATISTICS`).

    totals: tokens, and {name: [M, ...]} for the statistics the layers sow (expert_counts [M, N] among them),
    each summed over the `num_batches` evaluation batches.
    Returns {"routing": mean over layers of each number, "routing_per_layer": [{"layer": i, ...}, ...]}.
    """
    per_layer = []
    for m, layer in enumerate(layers):
        totals_m = LayerTotals(totals["expert_counts"][m], int(totals["tokens"]), num_batches)
        health: dict[str, Any] = {"layer": layer}
        for name, statistic in ROUTING_STATISTICS.items():
            if name in totals:
                health.update(zip(statistic.fields, statistic.report(totals[name][m], totals_m), strict=True))
        per_layer.append(health)
    names = [k for k in per_layer[0] if k != "layer"]
    return {
        "routing": {k: float(np.mean([layer[k] for layer in per_layer])) for k in names},
        "routing_per_layer": per_layer,
    }


def evaluate(
    steps: Steps,
    state: TrainState,
    batches: list[np.ndarray],
    config: TrainConfig,
    *,
    byte_level: bool,
    tokens_per_byte: float | None = None,
):
    """The eval record's numbers over `batches` (see the module docstring): `steps.eval_step`'s sums,
    accumulated on the host in f64. `tokens_per_byte`: a tokenised corpus's validation tokens per byte
    (`Corpus.tokens_per_byte`), which converts nats/token to bits/byte."""
    totals: dict[str, np.ndarray] = {}
    for batch in batches:
        sums = jax.device_get(steps.eval_step(state, batch))
        for name, value in sums.items():
            totals[name] = totals.get(name, 0) + np.asarray(value, np.float64)
    result: dict[str, Any] = {
        "val_loss": float(totals["nll"] / totals["tokens"]),
        "bits_per_byte": float(totals["byte_nll"] / totals["bytes"] / math.log(2)) if byte_level else None,
        "tokens": int(totals["tokens"]),
        "dropped_pairs": int(totals["dispatch_dropped_pairs"]),
    }
    if tokens_per_byte is not None:
        result["bits_per_byte"] = result["val_loss"] * tokens_per_byte / math.log(2)
    if "expert_counts" in totals:
        result.update(routing_report(totals, config.model.sparse_layers, num_batches=len(batches)))
    return result


class MetricsLog:
    """Appends one JSON object per line to <run_dir>/metrics.jsonl.

    Each record is one `write` of its whole line to a file opened for appending, so a crash leaves at
    most a torn last line (no newline), never a record split by another; `repair` removes such a tail
    before a resumed run appends. `enabled=False` writes nothing: the other processes of a multi-process
    run, whose numbers process 0 already records.
    """

    def __init__(self, run_dir: str | pathlib.Path, *, enabled: bool = True):
        self.path = pathlib.Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.subscribers: list[Callable[[dict[str, Any]], None]] = []

    def subscribe(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call `callback(record)` with every record written from now on (the console's progress bar)."""
        self.subscribers.append(callback)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
        finally:
            os.close(fd)
        if written != len(line):  # a full disk: the line is torn; say so rather than log on after it
            raise OSError(f"{self.path}: wrote {written} of {len(line)} bytes of a record (disk full?)")
        for callback in self.subscribers:
            callback(record)

    def repair(self) -> int:
        """Truncate a torn last line (bytes after the last newline, from a write cut short); returns how many
        bytes were removed (0: none, or nothing to repair)."""
        if not self.enabled or not self.path.is_file():
            return 0
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1  # 0 if the only line is torn
        os.truncate(self.path, keep)
        return len(data) - keep


class TornRecordWarning(UserWarning):
    """metrics.jsonl ends in a torn line (a crash mid-write), which `read_metrics` skipped."""


def read_metrics(run_dir: str | pathlib.Path) -> list[dict[str, Any]]:
    """Every record of <run_dir>/metrics.jsonl, in order. A torn last line (no newline, not JSON: the run
    died while writing it) is skipped with a `TornRecordWarning`; any other bad line is a ValueError."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    text = path.read_text(errors="replace")
    lines = text.split("\n")  # the last item is what follows the final newline: "" unless torn
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                warnings.warn(
                    f"{path}: skipped a torn last line ({len(line)} characters) left by an interrupted write",
                    TornRecordWarning,
                    stacklevel=2,
                )
                continue
            raise ValueError(f"{path}, line {number}: not a JSON record ({err})") from None
    return records


def log_start(
    metrics_log: MetricsLog, log: Log, config: TrainConfig, corpus, *, step, resumed, compile_s, mesh, memory
):
    """The start record and the model's console line. `corpus`: a `train.data.Corpus`; `resumed`: the
    record's resumed, resumed_from and skipped_checkpoints; `mesh`: the run's Mesh or None; `memory`: the
    `train.memory.MemoryFit` of its train step."""
    counts = parameter_counts(config.model)
    metrics_log.write(
        {
            "kind": "start",
            "step": step,
            **resumed,
            "config": config.to_dict(),
            "parameters": counts,
            "corpus": corpus.summary(),
            "device": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "compile_s": round(compile_s, 2),
            "memory": memory.to_dict(),
            "model_flops_per_token": model_flops_per_token(config.model)["model_flops_per_token"],
            "peak_flops_per_device": peak_flops(jax.devices()[0].device_kind),
            "mesh": None if mesh is None else dict(mesh.shape),
            "processes": jax.process_count(),
        }
    )
    layout = "one device" if mesh is None else f"mesh {dict(mesh.shape)} over {jax.process_count()} process(es)"
    log(
        f"model: {counts['total']:,} parameters, {counts['active']:,} active per token; {layout}; "
        f"train step compiled in {compile_s:.1f} s ({memory.summary()}); steps {step} -> {config.steps}"
    )


def log_train(
    metrics_log: MetricsLog,
    log: Log,
    config: TrainConfig,
    *,
    step: int,
    metrics: dict[str, Any],
    window_steps: int,
    seconds: float,
    elapsed: float,
) -> None:
    """The train record and progress line of step `step`, for the `window_steps` steps that took `seconds`
    (`metrics`: the train step's `train_fields`, as Python numbers, the window's sums among them)."""
    tokens_per_s = window_steps * config.tokens_per_step / seconds
    utilisation = _mfu(config, tokens_per_s)
    metrics_log.write(
        {
            "kind": "train",
            "step": step,
            **metrics,
            "tokens_per_s": round(tokens_per_s, 1),
            "mfu": None if utilisation is None else round(utilisation, 4),
            "tokens_seen": step * config.tokens_per_step,
            "elapsed_s": round(elapsed, 2),
        }
    )
    eta = (config.steps - step) * seconds / window_steps
    pieces = [f"step {step:>6}/{config.steps}"]
    for name, field in train_fields(config).items():
        if field.console is not None and (field.show_zero or metrics[name]):
            pieces.append(field.console.format(metrics[name]))
    pieces.append(f"{tokens_per_s:,.0f} tok/s")
    if utilisation is not None:
        pieces.append(f"mfu {utilisation:.1%}")
    log(" | ".join([*pieces, f"eta {_duration(eta)}"]))


def _mfu(config: TrainConfig, tokens_per_s: float) -> float | None:
    """Model FLOPs utilisation against the first device's datasheet bf16 peak, summed over the devices
    (None on a device kind `train.flops.PEAK_BF16_FLOPS` does not know, such as a CPU)."""
    peak = peak_flops(jax.devices()[0].device_kind)
    if peak is None:
        return None
    flops = model_flops_per_token(config.model)["model_flops_per_token"]
    return flops * tokens_per_s / (peak * jax.device_count())


def log_eval(metrics_log: MetricsLog, log: Log, *, step: int, result: dict[str, Any]) -> None:
    """The eval record of `evaluate`'s `result` at `step`, and its console line."""
    metrics_log.write({"kind": "eval", "step": step, **result})
    line = f"eval {step:>6} | val loss {result['val_loss']:.4f}"
    if result["bits_per_byte"] is not None:
        line += f" | bits/byte {result['bits_per_byte']:.3f}"
    if result["dropped_pairs"]:
        line += f" | dropped pairs {result['dropped_pairs']:,}"
    routing = result.get("routing", {})
    for statistic in ROUTING_STATISTICS.values():
        if statistic.fields[0] in routing:
            line += " | " + statistic.console.format(**routing)
    log(line)


def log_checkpoint(metrics_log: MetricsLog, *, step: int, seconds: float) -> None:
    """The checkpoint record of a save of `step` that took `seconds` (no console line: the end line names
    the checkpoint directory)."""
    metrics_log.write({"kind": "checkpoint", "step": step, "seconds": round(seconds, 2)})


def log_end(
    metrics_log: MetricsLog,
    log: Log,
    *,
    step: int,
    reason: str,
    window: dict[str, Any],
    elapsed: float,
    nonfinite_step: int | None,
    checkpoint_directory: pathlib.Path,
) -> None:
    """The end record (`window`: the summed train fields of the steps after the last train record;
    `nonfinite_step` only with reason `train.divergence.REASON`) and the last line."""
    end = {"kind": "end", "step": step, "reason": reason, **window, "elapsed_s": elapsed}
    if nonfinite_step is not None:
        end["nonfinite_step"] = nonfinite_step
    metrics_log.write(end)
    log(f"{reason} at step {step} after {_duration(elapsed)}; checkpoints in {checkpoint_directory}")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
