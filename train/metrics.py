"""The run's metrics.jsonl: its records, how each is written and shown on the console, and the routing
health the eval records hold.

metrics.jsonl records, one JSON object per line, `kind` first, each written by one `log_<kind>` below
(which also prints its console line):

- start: step (0, or the step resumed from), resumed, resumed_from (the checkpoint restored, or null),
  skipped_checkpoints (newer checkpoints that failed verification: [{step, reason, moved_to}]), config,
  parameters {total, active}, corpus {source, byte_level, train_tokens, validation_tokens,
  train_documents, validation_documents}, device, jax, compile_s, model_flops_per_token (`train.flops`),
  peak_flops_per_device (the datasheet bf16 peak of the device kind, null where unknown), mesh
  ({"data": D, "expert": E}, or null on one device), processes.
- train: step, loss (mean nats per target token over the step's batch), [aux_loss (the auxiliary loss term
  of the objective, before aux_loss_coefficient; GShard and DeepSeekMoE only)], grad_norm (before
  clipping), learning_rate (used by this step), [table_learning_rate (the expert tables' learning rate of
  this step; when a table field of the config is set: `train.steps.make_optimizer`)], dropped_pairs
  (routed (token, expert) pairs dropped for lack of expert-parallel dispatch capacity in all steps since
  the previous train record; 0 unless expert_capacity_factor is set and the run has a mesh), tokens_per_s
  (training time only, since the previous record), mfu (model FLOPs utilisation of that throughput against
  every device's datasheet bf16 peak; null where the device kind is unknown, as on a CPU), tokens_seen,
  elapsed_s.
- eval: step, val_loss (mean nats per validation target token), bits_per_byte (nats / ln 2 over the byte
  targets, BOS/EOS excluded; with a tokenizer, val_loss * validation tokens / validation bytes / ln 2;
  null for pre-tokenised corpora), tokens, dropped_pairs (expert-parallel
  dispatch drops over the evaluation, as above), routing (mean over the sparse layers of experts_used,
  max_load, load_entropy, and router_entropy (OmniMoE, FlashMoE) or dropped_pairs, dropped_fraction (pairs over a
  capacity-bound MoE expert's capacity: GShard, DeepSeekMoE with dispatch="capacity") and balance_loss
  (MoEs): below) and routing_per_layer (the same for each sparse layer, with its index). No
  routing fields for the dense FFN.
- checkpoint: step, seconds.
- end: step, reason ("done", "stop_at_step", "time limit", "SIGINT", "SIGTERM", "non-finite loss", or
  in a multi-process run "another process stopped"), dropped_pairs (in the steps after the last train
  record), elapsed_s; with "non-finite loss" also nonfinite_step (the first step not applied:
  `train.divergence`).

Routing health, per sparse layer, over all tokens of one evaluation (N experts, K assignments per token;
for PEER and PKM an assignment is a (head, slot) retrieval and PKM's "experts" are its value rows):

- experts_used: fraction of the N experts chosen by at least one token (ideal 1; the "used fraction").
- max_load: the most-chosen expert's count over the mean count T K / N (ideal 1; large = a hot expert).
- load_entropy: entropy of the expert load distribution / log N (1 = uniform load).
- router_entropy (OmniMoE, FlashMoE): mean over tokens of H(p_x) + H(p_y), the entropy of the token's whole routing
  distribution p_x(i) p_y(j) over the N experts, / log N (1 = uniform; falls as routing sharpens).
- dropped_pairs, dropped_fraction (GShard, DeepSeekMoE with dispatch="capacity"): (token, expert) pairs
  over an expert's capacity, which contribute nothing, summed over the evaluation, and their share of T K.
- balance_loss (GShard, DeepSeekMoE): the unweighted load-balancing loss, mean over evaluation batches
  (1 = balanced).

Every sparse FFN sows these per-layer sums into the "metrics" collection under the same names
(expert_counts, and router_entropy, dropped_pairs or balance_loss where the kind has them), which the eval
step reads (`sown_statistics`); the dense FFN sows none.

Expert-parallel dropped pairs (the train/eval record's top-level `dropped_pairs`, not the routing field
above): routed (token, expert) pairs an expert-parallel OmniMoE or FlashMoE layer had no dispatch slot for
(only with `expert_capacity_factor` set on a mesh; always 0 otherwise), summed over layers: sown as
"dispatch_dropped_pairs" into "intermediates" (`dispatch_dropped_pairs`).
"""

from __future__ import annotations

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
    layers: the sparse layers, in order. Returns expert_counts [M, N] int32 and, where the layers sow them,
    router_entropy [M] (OmniMoE, FlashMoE: `omnimoe_jax.routing_statistics`), dropped_pairs [M] and
    balance_loss [M] (the capacity-bound and the balanced MoEs).
    """
    per_layer = [metrics[f"layer_{i}"]["ffn"] for i in layers]
    sums = {}
    for name in ("expert_counts", "router_entropy", "dropped_pairs", "balance_loss"):
        if name in per_layer[0]:
            sums[name] = jnp.stack([sum(layer[name]) for layer in per_layer])  # [M, ...]
    return sums


def routing_health(counts: np.ndarray, entropy_sum: float | None, num_tokens: int) -> dict[str, float]:
    """experts_used, max_load, load_entropy and (given the token entropy sum) router_entropy of one layer's
    accumulated expert counts [N]."""
    counts = np.asarray(counts, np.float64)
    num_experts = counts.size
    load = counts / counts.sum()
    nonzero = load[load > 0]
    health = {
        "experts_used": float(np.mean(counts > 0)),
        "max_load": float(counts.max() / counts.mean()),
        "load_entropy": float(-np.sum(nonzero * np.log(nonzero)) / math.log(num_experts)),
    }
    if entropy_sum is not None:
        health["router_entropy"] = float(entropy_sum / num_tokens / math.log(num_experts))
    return health


def routing_report(totals: dict[str, np.ndarray], layers: Sequence[int], *, num_batches: int) -> dict[str, Any]:
    """The eval record's routing fields from an evaluation's summed statistics (see the module docstring).

    totals: tokens and expert_counts [M, N], and router_entropy [M] (OmniMoE, FlashMoE) or dropped_pairs [M] and
    balance_loss [M] (the MoEs), each summed over the `num_batches` evaluation batches.
    Returns {"routing": mean over layers of each number, "routing_per_layer": [{"layer": i, ...}, ...]}.
    """
    per_layer = []
    for m, layer in enumerate(layers):
        counts = totals["expert_counts"][m]
        entropy = totals["router_entropy"][m] if "router_entropy" in totals else None
        health = routing_health(counts, entropy, int(totals["tokens"]))
        if "dropped_pairs" in totals:
            health["dropped_pairs"] = int(totals["dropped_pairs"][m])
            health["dropped_fraction"] = float(totals["dropped_pairs"][m] / np.sum(counts))  # counts: every pair
        if "balance_loss" in totals:
            health["balance_loss"] = float(totals["balance_loss"][m] / num_batches)
        per_layer.append({"layer": layer, **health})
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


def log_start(metrics_log: MetricsLog, log: Log, config: TrainConfig, corpus, *, step, resumed, compile_s, mesh):
    """The start record and the model's console line. `corpus`: a `train.data.Corpus`; `resumed`: the
    record's resumed, resumed_from and skipped_checkpoints; `mesh`: the run's Mesh or None."""
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
            "model_flops_per_token": model_flops_per_token(config.model)["model_flops_per_token"],
            "peak_flops_per_device": peak_flops(jax.devices()[0].device_kind),
            "mesh": None if mesh is None else dict(mesh.shape),
            "processes": jax.process_count(),
        }
    )
    layout = "one device" if mesh is None else f"mesh {dict(mesh.shape)} over {jax.process_count()} process(es)"
    log(
        f"model: {counts['total']:,} parameters, {counts['active']:,} active per token; {layout}; "
        f"train step compiled in {compile_s:.1f} s; steps {step} -> {config.steps}"
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
    (`metrics`: the train step's, as Python numbers, with dropped_pairs summed over the window)."""
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
    aux = f" | aux {metrics['aux_loss']:.4f}" if "aux_loss" in metrics else ""
    table = f" (tables {metrics['table_learning_rate']:.2e})" if "table_learning_rate" in metrics else ""
    dropped = f" | dropped pairs {metrics['dropped_pairs']:,}" if metrics["dropped_pairs"] else ""
    log(
        f"step {step:>6}/{config.steps} | loss {metrics['loss']:.4f}{aux} | lr {metrics['learning_rate']:.2e}{table}"
        f" | grad norm {metrics['grad_norm']:.3f}{dropped} | {tokens_per_s:,.0f} tok/s"
        + ("" if utilisation is None else f" | mfu {utilisation:.1%}")
        + f" | eta {_duration(eta)}"
    )


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
    if "routing" in result:
        r = result["routing"]
        line += f" | experts used {r['experts_used']:.3f} | max load {r['max_load']:.2f}x"
        line += f" | load entropy {r['load_entropy']:.3f}"
        if "router_entropy" in r:
            line += f" | router entropy {r['router_entropy']:.3f}"
        if "dropped_fraction" in r:
            line += f" | dropped {r['dropped_fraction']:.2%}"
        if "balance_loss" in r:
            line += f" | balance {r['balance_loss']:.3f}"
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
    dropped_pairs: int,
    elapsed: float,
    nonfinite_step: int | None,
    checkpoint_directory: pathlib.Path,
) -> None:
    """The end record (`nonfinite_step` only with reason `train.divergence.REASON`) and the last line."""
    end = {"kind": "end", "step": step, "reason": reason, "dropped_pairs": dropped_pairs, "elapsed_s": elapsed}
    if nonfinite_step is not None:
        end["nonfinite_step"] = nonfinite_step
    metrics_log.write(end)
    log(f"{reason} at step {step} after {_duration(elapsed)}; checkpoints in {checkpoint_directory}")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
