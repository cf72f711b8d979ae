"""Routing health of OmniMoE layers, and the run's metrics.jsonl.

Routing health, per OmniMoE layer, over all tokens of one evaluation (N experts, K per token):

- experts_used: fraction of the N experts chosen by at least one token (ideal 1).
- max_load: the most-chosen expert's count over the mean count T K / N (ideal 1; large = a hot expert).
- load_entropy: entropy of the expert load distribution / log N (1 = uniform load).
- router_entropy: mean over tokens of H(p_x) + H(p_y), the entropy of the token's whole routing
  distribution p_x(i) p_y(j) over the N experts, / log N (1 = uniform; falls as routing sharpens).

Dropped pairs: routed (token, expert) pairs an expert-parallel layer had no dispatch slot for (only with
`expert_capacity_factor` set on a mesh; always 0 otherwise), summed over layers (`dropped_pairs`).
"""

from __future__ import annotations

import json
import math
import pathlib
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


def routing_health(counts: np.ndarray, entropy_sum: float, num_tokens: int) -> dict[str, float]:
    """The table's four numbers from one layer's accumulated expert counts [N] and token entropy sum."""
    counts = np.asarray(counts, np.float64)
    num_experts = counts.size
    load = counts / counts.sum()
    nonzero = load[load > 0]
    return {
        "experts_used": float(np.mean(counts > 0)),
        "max_load": float(counts.max() / counts.mean()),
        "load_entropy": float(-np.sum(nonzero * np.log(nonzero)) / math.log(num_experts)),
        "router_entropy": float(entropy_sum / num_tokens / math.log(num_experts)),
    }


class MetricsLog:
    """Appends one JSON object per line to <run_dir>/metrics.jsonl (flushed at once).

    `enabled=False` writes nothing: the other processes of a multi-process run, whose numbers process 0
    already records.
    """

    def __init__(self, run_dir: str | pathlib.Path, *, enabled: bool = True):
        self.path = pathlib.Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | pathlib.Path) -> list[dict[str, Any]]:
    """Every record of <run_dir>/metrics.jsonl, in order."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
