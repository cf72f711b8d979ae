"""Independent, obviously-correct baselines in numpy float64, one token (and head) at a time.

They read the Flax parameter trees directly (as float64 numpy), score every expert or slot (no product-key
shortcut, no sorting, no ragged_dot, no capacity buffers) and share only the activation table, the softmax
and the tie rule with tests/oracle.py.
"""

from __future__ import annotations

import math

import numpy as np
from oracle import activation, top_k_by_score_then_index


def as_float64(tree):
    """A nested dict of arrays as float64 numpy arrays (ints stay ints)."""
    if isinstance(tree, dict):
        return {k: as_float64(v) for k, v in tree.items()}
    array = np.asarray(tree)
    return array.astype(np.float64) if np.issubdtype(array.dtype, np.floating) else array


def softmax(v):
    v = np.exp(v - v.max())
    return v / v.sum()


def swiglu(params, x, act):
    """One SwiGLU (Flax Dense kernels are [in, out]) on one token x [d]."""
    gate = activation(act, x @ params["gate_proj"]["kernel"])
    return (gate * (x @ params["up_proj"]["kernel"])) @ params["down_proj"]["kernel"]


def dense_forward(params, x, act):
    return np.stack([swiglu(params, t, act) for t in np.asarray(x, np.float64)])


def coarse_moe_forward(params, x, *, top_k, normalize, capacity_factor, counted_choices, act):
    """GShard / DeepSeekMoE: y [T, d], balance loss, expert counts [E], dropped pairs, smallest routing margin.

    capacity_factor None = dropless. With a capacity, pairs are admitted in priority order (every token's
    first choice before any token's second), each expert taking at most C = ceil(cf * k * T / E) <= T.
    counted_choices: how many of each token's choices count as load in the balance loss (k or 1).
    """
    x = np.asarray(x, np.float64)
    tokens, num_experts = x.shape[0], params["gate"]["kernel"].shape[1]
    probs = np.stack([softmax(t @ params["gate"]["kernel"]) for t in x])  # [T, E]
    chosen = np.stack([top_k_by_score_then_index(p, top_k) for p in probs])  # [T, k]
    margin = math.inf
    for p in probs:
        ranked = np.sort(p)[::-1]
        if top_k < num_experts:
            margin = min(margin, ranked[top_k - 1] - ranked[top_k])
    kept = np.ones_like(chosen, bool)
    if capacity_factor is not None:
        capacity = max(1, min(tokens, math.ceil(capacity_factor * top_k * tokens / num_experts)))
        used = np.zeros(num_experts, int)
        for slot in range(top_k):
            for t in range(tokens):
                e = chosen[t, slot]
                kept[t, slot] = used[e] < capacity
                used[e] += 1
    experts = params["experts"]
    y = np.zeros_like(x)
    for t in range(tokens):
        gates = probs[t, chosen[t]]
        if normalize:
            gates = gates / gates.sum()
        for slot, e in enumerate(chosen[t]):
            if kept[t, slot]:
                expert = {name: {"kernel": experts[name][e]} for name in ("gate_proj", "up_proj", "down_proj")}
                y[t] += gates[slot] * swiglu(expert, x[t], act)
        if "shared" in params:
            y[t] += swiglu(params["shared"], x[t], act)
    counts = np.bincount(chosen[:, :counted_choices].ravel(), minlength=num_experts)
    balance = num_experts * np.sum(counts / counts.sum() * probs.mean(0))
    load = np.bincount(chosen.ravel(), minlength=num_experts)  # every choice, kept or dropped
    return y, balance, load, int((~kept).sum()), margin


def product_key_forward(params, batch_stats, x, *, heads, top_k, shared_keys, train, eps, expert_act=None):
    """PEER (expert_act given: single-neuron experts up_embed/down_embed) or PKM (values).

    Returns y [T, d], the smallest gap between the k-th and (k+1)-th slot score over all (token, head), and
    the retrievals per slot [n*n].
    """
    x = np.asarray(x, np.float64)
    retrieval = params["retrieval"]
    query = x @ retrieval["query"]["kernel"]  # [T, h * c]
    if batch_stats is not None:
        if train:
            mean, var = query.mean(0), query.var(0)
        else:
            stats = batch_stats["retrieval"]["query_norm"]
            mean, var = stats["running_mean"], stats["running_var"]
        query = (query - mean) / np.sqrt(var + eps)
    sub_keys = retrieval["sub_keys"]
    n, half = sub_keys.shape[-2], sub_keys.shape[-1]
    y = np.zeros_like(x)
    margin = math.inf
    used = np.zeros(sub_keys.shape[-2] ** 2, int)
    for t in range(x.shape[0]):
        for h in range(heads):
            q = query[t, h * 2 * half : (h + 1) * 2 * half]
            keys = sub_keys if shared_keys else sub_keys[h]  # [2, n, c/2]
            scores = np.array([q[:half] @ keys[0][e // n] + q[half:] @ keys[1][e % n] for e in range(n * n)])
            chosen = top_k_by_score_then_index(scores, top_k)
            if top_k < n * n:
                ranked = np.sort(scores)[::-1]
                margin = min(margin, ranked[top_k - 1] - ranked[top_k])
            gates = softmax(scores[chosen])
            np.add.at(used, chosen, 1)
            for g, e in zip(gates, chosen, strict=True):
                if expert_act is None:
                    y[t] += g * params["values"][e]
                else:
                    y[t] += g * activation(expert_act, params["up_embed"][e] @ x[t]) * params["down_embed"][e]
    return y, margin, used
