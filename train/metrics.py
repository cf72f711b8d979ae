"""Routing health of the sparse FFN layers, and the run's metrics.jsonl.

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

Expert-parallel dropped pairs (the train/eval record's top-level `dropped_pairs`, not the routing field
above): routed (token, expert) pairs an expert-parallel OmniMoE layer had no dispatch slot for (only with
`expert_capacity_factor` set on a mesh; always 0 otherwise), summed over layers (`dropped_pairs`).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from omnimoe_jax._router import RoutingResult


def routing_statistics(routing: RoutingResult, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Per-layer sums for one batch: expert counts [N] int32 and the sum over tokens of H(p_x) + H(p_y) []."""
    counts = jnp.bincount(routing.indices.reshape(-1), length=num_experts)  # [N]
    log_px = jax.nn.log_softmax(routing.logits_x, axis=-1)  # [..., n]
    log_py = jax.nn.log_softmax(routing.logits_y, axis=-1)  # [..., n]
    entropy = -jnp.sum(jnp.exp(log_px) * log_px, axis=-1) - jnp.sum(jnp.exp(log_py) * log_py, axis=-1)  # [...]
    return counts, jnp.sum(entropy)


def dropped_pairs(collections: Any) -> jax.Array:
    """[] int32: the "dropped_pairs" every OmniMoE layer sowed into the "intermediates" collection, summed.

    `collections`: the mutable collections an `apply(..., mutable=["intermediates", ...])` returned.
    """
    total = jnp.zeros((), jnp.int32)
    for path, leaf in jax.tree_util.tree_leaves_with_path(collections.get("intermediates", {})):
        # sow stores a tuple per call: path ends in ('dropped_pairs', 0)
        if any(getattr(key, "key", None) == "dropped_pairs" for key in path):
            total = total + leaf.astype(jnp.int32)
    return total


def sown_statistics(metrics: dict[str, Any], layers: Sequence[int]) -> dict[str, jax.Array]:
    """Per-layer sums for one batch from the "metrics" collection the baseline FFNs sow.

    metrics: {layer_<i>: {ffn: {name: (value,)}}} (flax keeps a tuple of one value per call);
    layers: the sparse layers, in order. Returns expert_counts [M, E] int32 and, where the layers sow them,
    dropped_pairs [M] and balance_loss [M].
    """
    per_layer = [metrics[f"layer_{i}"]["ffn"] for i in layers]
    sums = {}
    for name in ("expert_counts", "dropped_pairs", "balance_loss"):
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

    totals: tokens and expert_counts [M, N], and router_entropy [M] (OmniMoE) or dropped_pairs [M] and
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
