"""The Cartesian product router: two small gates whose log-probabilities add up to an expert score."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from omnimoe_jax._batch_norm import TorchBatchNorm, batch_moments_of
from omnimoe_jax._config import OmniMoEConfig
from omnimoe_jax.parallel._device_mesh import expert_parallel_mesh, shard_tokens
from pallas_kernels import omni_router
from pallas_kernels.omni_router import kernel as router_kernel


@struct.dataclass
class RoutingResult:
    """What the router chose for each token. Leading dims are the input's token dims.

    Attributes:
      scores: [..., K] f32, log p_x(i) + log p_y(j) of the chosen experts, descending (ties by lowest
        index) as the layers return it; inside them the router's unsorted order (`by_score` says which).
      indices: [..., K] int32 expert ids e = i * n + j.
      weights: [..., K] f32 routing weights exp(scores) (renormalised to sum 1 if `norm_topk_prob`).
      logits_x: [..., n] f32 router logits of the row axis after the router norm (input of log_softmax).
      logits_y: [..., n] f32, the column axis.
    """

    scores: jax.Array
    indices: jax.Array
    weights: jax.Array
    logits_x: jax.Array
    logits_y: jax.Array


def by_score(routing: RoutingResult) -> RoutingResult:
    """`routing` with each token's K (score, index, weight) entries ordered by score descending, then by
    lowest index: the order of `omni_router`'s default, for a RoutingResult routed with sort_by_score=False.

    The layers route unsorted (the expert op needs only the set) and sort only the RoutingResult they return
    (`return_routing`), so their output y is the same with and without it; where the caller drops the
    RoutingResult (the language model's blocks, under jit), the sort is dead code.
    """
    # The kernels' own sort key for f32 scores (`kernel.sort_by_score`: the IEEE total order, so -0.0, +0.0
    # and NaN order as `lax.top_k` puts them); the reference's -score for other dtypes (negation is exact).
    # Ties go to the lower index: the indices of a row are distinct.
    scores = routing.scores
    key = ~router_kernel.order_key(scores) if scores.dtype == jnp.float32 else -scores
    _, indices, scores, weights = jax.lax.sort(
        (key, routing.indices, scores, routing.weights), dimension=-1, num_keys=2
    )
    return routing.replace(scores=scores, indices=indices, weights=weights)


def routing_statistics(routing: RoutingResult, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Sums over one batch's tokens: expert counts [N] int32 and the sum of H(p_x) + H(p_y) [] f32, the
    entropy of each token's routing distribution p_x(i) p_y(j) over the N experts."""
    counts = jnp.bincount(routing.indices.reshape(-1), length=num_experts)  # [N]
    log_px = jax.nn.log_softmax(routing.logits_x, axis=-1)  # [..., n]
    log_py = jax.nn.log_softmax(routing.logits_y, axis=-1)  # [..., n]
    entropy = -jnp.sum(jnp.exp(log_px) * log_px, axis=-1) - jnp.sum(jnp.exp(log_py) * log_py, axis=-1)  # [...]
    return counts, jnp.sum(entropy)


def sow_routing_statistics(module: nn.Module, routing: RoutingResult, num_experts: int) -> None:
    """Sow a Cartesian-routed layer's `routing_statistics` into "metrics" as "expert_counts" [N] and
    "router_entropy" [], the names every sparse FFN of this package sows its routing health under.

    Computed only when the caller made "metrics" mutable (an evaluation), and never by `init`: a training
    step, which collects no metrics, traces none of it, and `init` returns the variables it always did.
    """
    if module.is_initializing() or not module.is_mutable_collection("metrics"):
        return
    counts, entropy = routing_statistics(routing, num_experts)
    module.sow("metrics", "expert_counts", counts)
    module.sow("metrics", "router_entropy", entropy)


class _GateKernel(nn.Module):
    """The [d, n] weight of one bias-free router gate, named and initialised as nn.Dense's "kernel".

    The router multiplies the tokens by both gates' kernels at once; keeping each kernel under its own
    module keeps the parameter tree (and so the seed checkpoints, `convert`) as with two nn.Dense gates.
    Creating the parameter as nn.Dense does (same name, initialiser and first RNG draw of the module's
    scope) gives the same initial values.
    """

    features: int
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, in_features: int) -> jax.Array:
        return self.param("kernel", nn.initializers.lecun_normal(), (in_features, self.features), self.param_dtype)


class CartesianRouter(nn.Module):
    """Routes each token to its top-K of N = n*n atomic experts in O(n) scores per token.

    1. Two bias-free gates give row and column logits: logits_x = W_x t, logits_y = W_y t ([T, n] each),
       computed as one [T, d] x [d, 2n] matmul (the parameters stay two gates: `_GateKernel`).
    2. Each is normalised over the batch (`router_norm`; both axes' statistics taken together) and turned
       into log-probabilities per axis (one log_softmax over [T, 2, n]).
    3. Expert e = i*n + j scores lp_x[i] + lp_y[j] = log p_x(i) p_y(j).
    4. The exact top K of those n*n scores comes from the top k' = min(K, n) of each axis
       (`pallas_kernels.omni_router`); the kernels never form all n*n (the "xla" reference does when K >= n).
    5. weights = exp(scores), renormalised over the K if `norm_topk_prob`.

    Input tokens [T, d]; returns a `RoutingResult` with [T, K] and [T, n] fields, its K entries by score
    (descending, ties by lowest index) or, with `sort_by_score=False`, in `omni_router`'s unsorted order.
    Under expert parallelism (`config.expert_axis` and a mesh, see `AtomicExperts`) the gates and the norm
    run on the sharded batch (BatchNorm statistics are global) and step 4 runs on each device's own tokens.
    """

    config: OmniMoEConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool = False, sort_by_score: bool = True) -> RoutingResult:
        cfg = self.config
        n = cfg.num_expert_sqrt
        # Both gates in one matmul: tokens [T, d] @ [d, 2n] (the kernels side by side), as nn.Dense computes
        # each (inputs and kernel in cfg.dtype, as the seed's nn.Linear does, so bf16 rounds the logits).
        kernels = [_GateKernel(n, cfg.param_dtype, name=f"router_gate_{axis}")(tokens.shape[-1]) for axis in "xy"]
        inputs, kernel = nn.dtypes.promote_dtype(tokens, jnp.concatenate(kernels, axis=1), dtype=cfg.dtype)
        logits = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())))  # [T, 2n]
        # Normalisation and log_softmax in f32 at least: routing decisions hinge on small score gaps.
        logits = logits.astype(jnp.promote_types(cfg.dtype, jnp.float32))  # [T, 2n]
        halves = (slice(0, n), slice(n, 2 * n))  # the x and the y logits of [T, 2n]
        if cfg.router_norm == "batchnorm":
            norm = dict(num_features=n, eps=cfg.router_norm_eps, momentum=cfg.router_norm_momentum)
            # Both axes' batch statistics by one pair of reductions over the tokens of [T, 2n] (fewer than 2
            # tokens: none, and TorchBatchNorm says why).
            moments = batch_moments_of(logits) if train and logits.shape[0] >= 2 else None
            logits = jnp.concatenate(
                [
                    TorchBatchNorm(**norm, name=f"router_norm_{axis}")(
                        logits[:, half],
                        train=train,
                        batch_moments=None if moments is None else (moments[0][half], moments[1][half]),
                    )
                    for axis, half in zip("xy", halves, strict=True)
                ],
                axis=1,
            )  # [T, 2n]
        logits_x, logits_y = (logits[:, half] for half in halves)  # [T, n] each
        return cartesian_routing(logits_x, logits_y, cfg, top_k=cfg.num_experts_per_token, sort_by_score=sort_by_score)


def cartesian_routing(
    logits_x: jax.Array, logits_y: jax.Array, config: Any, *, top_k: int, sort_by_score: bool = True
) -> RoutingResult:
    """Steps 3-5 of `CartesianRouter` from the two axes' final logits [T, n] (f32): log_softmax per axis, the
    exact top-K of the n*n sums through `omni_router`, weights exp(score) (renormalised if
    `config.norm_topk_prob`). Shared by OmniMoE's router and FlashMoE's (which has one joint gate and
    normalises the input tokens instead of the logits). `sort_by_score`: passed to `omni_router`.

    `config`: an OmniMoEConfig or FlashMoEConfig (norm_topk_prob, implementation, expert_axis are read).
    """
    log_probs_x = jax.nn.log_softmax(logits_x, axis=-1)  # [T, n]
    log_probs_y = jax.nn.log_softmax(logits_y, axis=-1)  # [T, n]
    route = functools.partial(
        omni_router, top_k=top_k, implementation=config.implementation, sort_by_score=sort_by_score
    )
    mesh = expert_parallel_mesh(config.expert_axis)
    if mesh is not None:
        # Top-K is per token, so each device ranks its own tokens; left to XLA's partitioner, top_k (and
        # any Pallas kernel) would be computed on the gathered global batch by every device.
        route = shard_tokens(route, mesh)
    scores, indices = route(log_probs_x, log_probs_y)  # [T, K] each
    weights = jnp.exp(scores)  # [T, K]
    if config.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return RoutingResult(scores=scores, indices=indices, weights=weights, logits_x=logits_x, logits_y=logits_y)
