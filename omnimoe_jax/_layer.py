"""OmniMoE: the shared SwiGLU MLP plus K routed atomic experts per token."""

from __future__ import annotations

import flax.linen as nn
import jax

from omnimoe_jax._config import OmniMoEConfig
from omnimoe_jax._experts import AtomicExperts
from omnimoe_jax._router import CartesianRouter, RoutingResult, by_score, sow_routing_statistics
from omnimoe_jax._shapes import flatten_tokens
from omnimoe_jax._shared_mlp import SharedMLP


class OmniMoE(nn.Module):
    """y = SharedMLP(x) + AtomicExperts(x; CartesianRouter(x)), a drop-in feed-forward block.

    1. Flatten the input's leading dims to tokens [T, d] (T = product of leading dims).
    2. `router`: the Cartesian product router picks K of N = n*n experts per token with weights.
    3. `experts`: the K single-neuron experts assemble the routed output [T, d].
    4. `shared`: the SwiGLU MLP every token passes through; the sum is reshaped back to [..., d].

    Variables: "params" {router: {router_gate_x, router_gate_y}, experts: {up_embed, down_embed},
    shared: {gate_proj, up_proj, down_proj}} and, with router_norm="batchnorm", "batch_stats"
    {router: {router_norm_x, router_norm_y}}. `train=True` normalises router logits with batch statistics;
    pass `mutable=["batch_stats"]` to `apply` to keep the updated running statistics.

    Routing health, as every sparse FFN of this package reports it: with `mutable=["metrics", ...]` the
    layer sows "metrics"/"expert_counts" ([N] int32, how many of the T*K assignments each expert received)
    and "metrics"/"router_entropy" ([] f32, the sum over tokens of H(p_x) + H(p_y))
    (`omnimoe_jax.routing_statistics`). `return_routing=True` returns `(y, RoutingResult)` instead of y:
    what the router chose for each token, with [..., K] and [..., n] fields, the K by score. The experts
    take the router's unsorted output (`omni_router(sort_by_score=False)`: the expert op groups the pairs by
    expert itself); only the returned RoutingResult is sorted (`by_score`), so y does not depend on
    `return_routing`. Against a router that sorts, y differs only by the order of each token's K-term sum (and,
    with norm_topk_prob, of the sum that normalises the weights).
    """

    config: OmniMoEConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False, return_routing: bool = False
    ) -> jax.Array | tuple[jax.Array, RoutingResult]:
        cfg = self.config
        tokens = flatten_tokens(x, cfg.hidden_size, cfg.dtype)  # [T, d]
        lead = x.shape[:-1]
        routing = CartesianRouter(cfg, name="router")(tokens, train=train, sort_by_score=False)
        sow_routing_statistics(self, routing, cfg.num_experts)
        routed = AtomicExperts(cfg, name="experts")(tokens, routing.weights, routing.indices)  # [T, d]
        shared = SharedMLP(cfg, name="shared")(tokens)  # [T, d]
        y = (shared + routed).reshape(*lead, cfg.hidden_size)  # [..., d]
        if not return_routing:
            return y
        # [T, K] / [T, n] -> [..., K] / [..., n]
        routing = jax.tree.map(lambda a: a.reshape(*lead, a.shape[-1]), by_score(routing))
        return y, routing
