"""Dynamic expert assembly: N single-neuron experts, K of them summed per token."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnimoe_jax._config import OmniMoEConfig
from omnimoe_jax.parallel._device_mesh import batch_axes, expert_parallel_mesh
from omnimoe_jax.parallel._expert_dispatch import expert_parallel_omni_expert
from omnimoe_jax.parallel._hidden_dispatch import hidden_parallel_omni_expert
from omnimoe_jax.parallel._table_layout import config_table_layout
from pallas_kernels import omni_expert


class AtomicExperts(nn.Module):
    """y[t] = sum_k w[t,k] * act(u_e . x[t]) * v_e over the token's K routed experts e.

    Each atomic expert is one neuron: a row u_e of `up_embed` [N, d] and a row v_e of `down_embed` [N, d]
    (the seed's `nn.Embedding` tables; with score_table="down_embed", FlashMoE's roles, u_e is the row of
    `down_embed` and v_e that of `up_embed`). The K experts a token picks assemble, on the fly, a K-wide MLP of
    its own. The work runs in `pallas_kernels.omni_expert` (expert-centric kernels on GPU).

    Initialisation: rows ~ N(0, 1/d), so u_e . x is O(1) for unit-scale x. (The seed's `nn.Embedding`
    defaults to N(0, 1); loading a seed checkpoint replaces both anyway.)

    Expert parallelism: with `config.expert_axis` set and a mesh holding that axis in context
    (`jax.set_mesh`), the tables stay sharded as `config.expert_parallel_layout` says (`omnimoe_jax.parallel`):
    "rows", tokens travel to the shards owning their experts; "hidden", every shard computes its columns of
    every expert and the partial pre-activations are summed; "auto", whichever moves fewer bytes for this
    call's tokens per device. Otherwise the op runs on whatever devices hold its inputs. Both paths sow
    "dispatch_dropped_pairs" (int32, routed (token, expert) pairs dropped for lack of dispatch capacity,
    summed over devices; always 0 with the default capacity) into the "intermediates" collection: pass
    `mutable=["intermediates", ...]` to `apply` to read it (`init` leaves it out). Not in "metrics" with
    the routing health: a training step reads it every step, and collects no metrics. Nor "dropped_pairs",
    which is what a capacity-bound baseline MoE sows for the pairs over an expert's capacity.
    """

    config: OmniMoEConfig  # or a FlashMoEConfig: the same fields are read
    # The table whose rows are dotted with the token; the other one's rows are summed into the output.
    # "up_embed" in OmniMoE (u_e = up_embed[e]); FlashMoE, with the same two tables, reads them the other way.
    score_table: str = "up_embed"

    @nn.compact
    def __call__(self, tokens: jax.Array, weights: jax.Array, indices: jax.Array) -> jax.Array:
        # tokens: [T, d]; weights, indices: [T, K] -> [T, d]
        cfg = self.config
        shape = (cfg.num_experts, cfg.hidden_size)
        init = nn.initializers.normal(stddev=cfg.hidden_size**-0.5)
        up = self.param("up_embed", init, shape, cfg.param_dtype)
        down = self.param("down_embed", init, shape, cfg.param_dtype)
        if self.score_table not in ("up_embed", "down_embed"):
            raise ValueError(f"score_table={self.score_table!r} must be 'up_embed' or 'down_embed'")
        scored, summed = (up, down) if self.score_table == "up_embed" else (down, up)
        args = (tokens.astype(cfg.dtype), scored.astype(cfg.dtype), summed.astype(cfg.dtype), weights, indices)
        ops = dict(activation=cfg.hidden_act, implementation=cfg.implementation)
        mesh = expert_parallel_mesh(cfg.expert_axis)
        if mesh is None:
            layout = None
        else:
            shards = math.prod(mesh.shape[a] for a in batch_axes(mesh))
            local_tokens = max(1, tokens.shape[0] // shards)  # a count that does not divide is refused below
            layout = config_table_layout(cfg, local_tokens=local_tokens, num_shards=mesh.shape[cfg.expert_axis])
        if layout == "hidden":
            y, dropped = hidden_parallel_omni_expert(*args, mesh=mesh, expert_axis=cfg.expert_axis, **ops)
        elif layout == "rows":
            y, dropped = expert_parallel_omni_expert(
                *args, mesh=mesh, expert_axis=cfg.expert_axis, capacity_factor=cfg.expert_capacity_factor, **ops
            )
        else:
            y, dropped = omni_expert(*args, **ops), jnp.zeros((), jnp.int32)
        self.sow("intermediates", "dispatch_dropped_pairs", dropped)
        return y
