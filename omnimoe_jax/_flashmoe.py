"""FlashMoE (flash-algo/flash-moe): OmniMoE's sibling with a BatchNorm on the input tokens, one joint router
gate, and the expert tables' roles reversed."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnimoe_jax._batch_norm import TorchBatchNorm
from omnimoe_jax._config import FlashMoEConfig
from omnimoe_jax._experts import AtomicExperts
from omnimoe_jax._router import RoutingResult, by_score, cartesian_routing, sow_routing_statistics
from omnimoe_jax._shapes import flatten_tokens
from omnimoe_jax._shared_mlp import SharedMLP


class FlashMoE(nn.Module):
    """y = SharedMLP(x) + routed(x), routed by a Cartesian product router over N = n*n atomic experts.

    1. Flatten the input's leading dims to tokens x [T, d].
    2. `router_norm`: non-affine BatchNorm over the tokens of x itself (torch's `BatchNorm1d(d)`: batch
       statistics in training, running statistics in eval, unbiased running variance).
    3. `router_gate`: one bias-free d -> 2n projection of the normalised tokens, read as [T, 2, n]: the row
       axis's logits first, then the column axis's; returned as router_logits [2, T, n].
    4. log_softmax per axis, the exact top-K of the n*n sums (expert e = i*n + j), weights exp(score),
       renormalised over the K if `norm_topk_prob` (`cartesian_routing`, OmniMoE's routing step).
    5. `experts`: h = act(down_embed[e] . x) * w, routed = sum h * up_embed[e], on the raw tokens (OmniMoE
       reads up_embed first); `shared`: the SwiGLU MLP on the raw tokens. y = shared + routed, as [..., d].

    Call: `(x, *, train=False, return_routing=False)`, x [..., d]. Returns `(y, router_logits)`: y like x
    (in `dtype`), router_logits [2, T, n] f32 (the gate's output, T the flattened leading dims), as the seed
    module returns. With `return_routing` it returns `(y, RoutingResult)` instead ([..., K] and [..., n]
    fields, whose logits_x and logits_y are router_logits[0] and [1]), as `OmniMoE` does; with
    `mutable=["metrics", ...]` it sows "metrics"/"expert_counts" and "router_entropy" as `OmniMoE` does.

    Variables: "params" {router_gate: {kernel}, experts: {up_embed, down_embed}, shared: {gate_proj, up_proj,
    down_proj}} and "batch_stats" {router_norm: {running_mean, running_var, num_batches_tracked}} ([d] each).
    `train=True` normalises with the batch's statistics; pass `mutable=["batch_stats"]` to `apply` to keep the
    updated running statistics. `omnimoe_jax.convert` maps the seed's state dict to these 1:1.
    """

    config: FlashMoEConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False, return_routing: bool = False
    ) -> tuple[jax.Array, jax.Array | RoutingResult]:
        cfg = self.config
        tokens = flatten_tokens(x, cfg.hidden_size, cfg.dtype)  # [T, d]
        lead, n = x.shape[:-1], cfg.num_expert_sqrt
        # The statistics and the normalisation in f32 at least, as OmniMoE's router norm; the gate then runs in
        # cfg.dtype, as the seed's nn.Linear does.
        acc = jnp.promote_types(cfg.dtype, jnp.float32)
        norm = TorchBatchNorm(
            cfg.hidden_size, eps=cfg.router_norm_eps, momentum=cfg.router_norm_momentum, name="router_norm"
        )
        normed = norm(tokens.astype(acc), train=train).astype(cfg.dtype)  # [T, d]
        gate = nn.Dense(2 * n, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="router_gate")
        logits = gate(normed).astype(acc).reshape(-1, 2, n)  # [T, 2n] -> [T, 2, n], torch's view
        router_logits = jnp.swapaxes(logits, 0, 1)  # [2, T, n], torch's transpose(0, 1)
        # Unsorted for the experts; only a returned RoutingResult is sorted by score (as in OmniMoE).
        routing = cartesian_routing(
            router_logits[0], router_logits[1], cfg, top_k=cfg.num_experts_per_tok, sort_by_score=False
        )
        sow_routing_statistics(self, routing, cfg.num_experts)
        experts = AtomicExperts(cfg, score_table="down_embed", name="experts")
        routed = experts(tokens, routing.weights, routing.indices)  # [T, d]
        shared = SharedMLP(cfg, name="shared")(tokens)  # [T, d]
        y = (shared + routed).reshape(*lead, cfg.hidden_size)  # [..., d]
        if not return_routing:
            return y, router_logits
        # [T, K] / [T, n] -> [..., K] / [..., n]
        return y, jax.tree.map(lambda a: a.reshape(*lead, a.shape[-1]), by_score(routing))
