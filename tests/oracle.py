"""Independent, obviously-correct OmniMoE and FlashMoE layers in numpy float64, one token at a time.

Each reads its seed's torch-layout state dict directly (no Flax, no conversion code, no JAX) and scores all
N = n*n experts per token, so it checks the factorised router, the conversion and the layer at once.
"""

from __future__ import annotations

import math

import numpy as np


def activation(name: str, s):
    s = np.asarray(s, np.float64)
    erf = np.vectorize(math.erf)
    table = {
        "silu": lambda v: v / (1.0 + np.exp(-v)),
        "gelu": lambda v: 0.5 * v * (1.0 + erf(v / math.sqrt(2.0))),
        "gelu_pytorch_tanh": lambda v: 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3))),
        "relu": lambda v: np.maximum(v, 0.0),
    }
    return table[name](s)


def batch_norm(logits, mean, var, eps):
    return (logits - mean) / np.sqrt(var + eps)


def log_softmax(v):
    v = v - v.max()
    return v - np.log(np.exp(v).sum())


def top_k_by_score_then_index(scores, k):
    """Indices of the k largest scores; equal scores ordered by lower index."""
    order = np.lexsort((np.arange(scores.size), -scores))
    return order[:k]


def route_token(logits_x, logits_y, top_k: int, *, normalize: bool):
    """One token's routing from its two axes' logits [n] each, scoring all n*n experts: the K chosen (by score,
    ties to the lower index) and their gates exp(lp_x[i] + lp_y[j]), renormalised to sum 1 if `normalize`."""
    lp_x, lp_y = log_softmax(logits_x), log_softmax(logits_y)
    n = lp_x.size
    scores = np.array([lp_x[e // n] + lp_y[e % n] for e in range(n * n)])
    chosen = top_k_by_score_then_index(scores, top_k)
    gates = np.exp(scores[chosen])
    if normalize:
        gates = gates / gates.sum()
    return chosen, gates


def score_margin(logits_x, logits_y, top_k: int) -> float:
    """Smallest gap between the K-th and (K+1)-th expert score over the tokens of logits [T, n] (each axis's)."""
    margin = math.inf
    for t in range(logits_x.shape[0]):
        lp_x, lp_y = log_softmax(logits_x[t]), log_softmax(logits_y[t])
        scores = np.sort((lp_x[:, None] + lp_y[None, :]).ravel())[::-1]
        margin = min(margin, scores[top_k - 1] - scores[top_k])
    return margin


def omnimoe_forward(state, config, x, *, train: bool):
    """y [T, d], indices [T, K], weights [T, K], new running stats (train) for tokens x [T, d] (float64)."""
    x = np.asarray(x, np.float64)
    w = {k: np.asarray(v, np.float64) for k, v in state.items()}
    top_k, eps, momentum = config.num_experts_per_token, config.router_norm_eps, config.router_norm_momentum
    logits = {axis: x @ w[f"router_gate_{axis}.weight"].T for axis in "xy"}  # [T, n] (torch Linear: x W^T)
    new_stats = {}
    if config.router_norm == "batchnorm":
        for axis in "xy":
            prefix = f"router_norm_{axis}."
            if train:
                mean = logits[axis].mean(0)
                var = logits[axis].var(0)  # biased, as torch normalises with
                count = x.shape[0]
                new_stats[prefix + "running_mean"] = (1 - momentum) * w[prefix + "running_mean"] + momentum * mean
                new_stats[prefix + "running_var"] = (1 - momentum) * w[prefix + "running_var"] + momentum * var * (
                    count / (count - 1)
                )
            else:
                mean, var = w[prefix + "running_mean"], w[prefix + "running_var"]
            logits[axis] = batch_norm(logits[axis], mean, var, eps)
    tokens, d = x.shape
    y = np.zeros((tokens, d))
    all_indices = np.zeros((tokens, top_k), np.int64)
    all_weights = np.zeros((tokens, top_k))
    for t in range(tokens):
        chosen, gates = route_token(logits["x"][t], logits["y"][t], top_k, normalize=config.norm_topk_prob)
        routed = np.zeros(d)
        for e, g in zip(chosen, gates, strict=True):
            routed += g * activation(config.hidden_act, w["up_embed.weight"][e] @ x[t]) * w["down_embed.weight"][e]
        gate = activation(config.hidden_act, w["gate_proj.weight"] @ x[t])
        shared = w["down_proj.weight"] @ (gate * (w["up_proj.weight"] @ x[t]))
        y[t] = shared + routed
        all_indices[t], all_weights[t] = chosen, gates
    return y, all_indices, all_weights, new_stats


def random_state_dict(rng: np.random.Generator, config, *, dtype=np.float32):
    """A seed-layout state dict with random values (unit-scale router so routing is decisive)."""
    d, inter, n, experts = config.hidden_size, config.intermediate_size, config.num_expert_sqrt, config.num_experts
    shapes = {
        "gate_proj.weight": ((inter, d), d**-0.5),
        "up_proj.weight": ((inter, d), d**-0.5),
        "down_proj.weight": ((d, inter), inter**-0.5),
        "router_gate_x.weight": ((n, d), d**-0.5),
        "router_gate_y.weight": ((n, d), d**-0.5),
        "up_embed.weight": ((experts, d), d**-0.5),
        "down_embed.weight": ((experts, d), d**-0.5),
    }
    state = {k: (scale * rng.standard_normal(shape)).astype(dtype) for k, (shape, scale) in shapes.items()}
    if config.router_norm == "batchnorm":
        for axis in "xy":
            state[f"router_norm_{axis}.running_mean"] = (0.1 * rng.standard_normal(n)).astype(np.float32)
            state[f"router_norm_{axis}.running_var"] = rng.uniform(0.5, 2.0, n).astype(np.float32)
            state[f"router_norm_{axis}.num_batches_tracked"] = np.array(int(rng.integers(0, 1000)), np.int64)
    return state


def decisive_inputs(seed, config, tokens: int, *, train: bool):
    """A random seed-layout state dict and tokens [tokens, d] f32 whose routing is far from a tie (a
    `routing_margin` above 1e-4), from numpy's generator at `seed`."""
    rng = np.random.default_rng(seed)
    for _ in range(20):
        state = random_state_dict(rng, config)
        x = rng.standard_normal((tokens, config.hidden_size)).astype(np.float32)
        if routing_margin(state, config, x, train=train) > 1e-4:
            return state, x
    raise AssertionError("could not draw inputs with a decisive routing")


def routing_margin(state, config, x, *, train: bool) -> float:
    """Smallest gap between the K-th and (K+1)-th expert score over tokens (inf when K = N).

    A comparison between float32 and float64 routing is only well-posed when this gap is far above f32
    rounding; tests redraw inputs otherwise.
    """
    top_k, experts = config.num_experts_per_token, config.num_experts
    if top_k == experts:
        return math.inf
    x = np.asarray(x, np.float64)
    logits = {axis: x @ np.asarray(state[f"router_gate_{axis}.weight"], np.float64).T for axis in "xy"}
    if config.router_norm == "batchnorm":
        for axis in "xy":
            prefix = f"router_norm_{axis}."
            if train:
                mean, var = logits[axis].mean(0), logits[axis].var(0)
            else:
                mean, var = state[prefix + "running_mean"], state[prefix + "running_var"]
            logits[axis] = batch_norm(logits[axis], mean, var, config.router_norm_eps)
    return score_margin(logits["x"], logits["y"], top_k)


# ----------------------------------------------------------------------------------------------------------
# FlashMoE (flash-algo/flash-moe), from the description of issue 17: BatchNorm on the input tokens, one joint
# gate d -> 2n, experts act(down_embed[e] . x) * w * up_embed[e] on the raw tokens.


def random_flashmoe_state_dict(rng: np.random.Generator, config, *, dtype=np.float32):
    """A FlashMoE seed-layout state dict with random values and running statistics far from (0, 1)."""
    d, inter, n, experts = config.hidden_size, config.intermediate_size, config.num_expert_sqrt, config.num_experts
    shapes = {
        "gate_proj.weight": ((inter, d), d**-0.5),
        "up_proj.weight": ((inter, d), d**-0.5),
        "down_proj.weight": ((d, inter), inter**-0.5),
        "router_gate.weight": ((2 * n, d), d**-0.5),
        "down_embed.weight": ((experts, d), d**-0.5),
        "up_embed.weight": ((experts, d), d**-0.5),
    }
    state = {k: (scale * rng.standard_normal(shape)).astype(dtype) for k, (shape, scale) in shapes.items()}
    state["router_norm.running_mean"] = (0.3 * rng.standard_normal(d)).astype(np.float32)
    state["router_norm.running_var"] = rng.uniform(0.5, 2.0, d).astype(np.float32)
    state["router_norm.num_batches_tracked"] = np.array(int(rng.integers(0, 1000)), np.int64)
    return state


def flashmoe_router_logits(state, config, x, *, train: bool):
    """router_logits [2, T, n] and the BatchNorm's new running statistics (train) for tokens x [T, d]."""
    x = np.asarray(x, np.float64)
    w = {k: np.asarray(v, np.float64) for k, v in state.items()}
    n, momentum = config.num_expert_sqrt, config.router_norm_momentum
    if train:
        count = x.shape[0]
        mean, var = x.mean(0), x.var(0)  # per feature over the tokens; biased, as torch normalises with
        new_stats = {
            "router_norm.running_mean": (1 - momentum) * w["router_norm.running_mean"] + momentum * mean,
            "router_norm.running_var": (1 - momentum) * w["router_norm.running_var"]
            + momentum * var * count / (count - 1),
        }
    else:
        mean, var, new_stats = w["router_norm.running_mean"], w["router_norm.running_var"], {}
    normed = batch_norm(x, mean, var, config.router_norm_eps)  # [T, d]
    joint = normed @ w["router_gate.weight"].T  # [T, 2n]: torch Linear
    return np.stack([joint[:, :n], joint[:, n:]]), new_stats  # the first n columns are the row axis


def flashmoe_forward(state, config, x, *, train: bool):
    """y [T, d], router_logits [2, T, n], indices [T, K], weights [T, K], new running stats (train)."""
    x = np.asarray(x, np.float64)
    w = {k: np.asarray(v, np.float64) for k, v in state.items()}
    top_k = config.num_experts_per_tok
    router_logits, new_stats = flashmoe_router_logits(state, config, x, train=train)
    tokens, d = x.shape
    y = np.zeros((tokens, d))
    all_indices = np.zeros((tokens, top_k), np.int64)
    all_weights = np.zeros((tokens, top_k))
    for t in range(tokens):
        chosen, gates = route_token(router_logits[0, t], router_logits[1, t], top_k, normalize=config.norm_topk_prob)
        routed = np.zeros(d)
        for e, g in zip(chosen, gates, strict=True):
            h = activation(config.hidden_act, w["down_embed.weight"][e] @ x[t]) * g
            routed += h * w["up_embed.weight"][e]
        gate = activation(config.hidden_act, w["gate_proj.weight"] @ x[t])
        shared = w["down_proj.weight"] @ (gate * (w["up_proj.weight"] @ x[t]))
        y[t] = shared + routed
        all_indices[t], all_weights[t] = chosen, gates
    return y, router_logits, all_indices, all_weights, new_stats


def flashmoe_routing_margin(state, config, x, *, train: bool) -> float:
    """As `routing_margin`, for FlashMoE: the smallest gap between the K-th and (K+1)-th score over tokens."""
    top_k = config.num_experts_per_tok
    if top_k == config.num_experts:
        return math.inf
    router_logits, _ = flashmoe_router_logits(state, config, x, train=train)
    return score_margin(router_logits[0], router_logits[1], top_k)
