"""A tiny OmniMoE model and its sharded AdamW step, shared by the parallel training tests and
tests/distributed_worker.py. Just enough training loop to exercise meshes, processes and checkpoints; the
real training script is train/."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from omnimoe_jax import OmniMoE, OmniMoEConfig, parallel

VOCAB = 64
BATCH = 8  # global sequences per step: one per device on 8 devices
SEQUENCE = 8


def cpu_mesh(spec: str | dict[str, int]) -> jax.sharding.Mesh:
    """A mesh over the 8 CPU devices of tests/conftest.py (also on a GPU machine, where they are not default)."""
    return parallel.make_mesh(spec, devices=jax.devices("cpu"))


def tiny_config(**changes) -> OmniMoEConfig:
    fields = dict(
        hidden_size=32,
        intermediate_size=48,
        num_experts=64,
        num_experts_per_token=6,
        implementation="xla",
        expert_axis=parallel.EXPERT_AXIS,
    )
    return OmniMoEConfig(**{**fields, **changes})


class TinyLM(nn.Module):
    """Byte embedding, `layers` residual OmniMoE blocks, a readout to next-token logits."""

    config: OmniMoEConfig
    layers: int = 1

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool) -> jax.Array:
        # tokens: [B, S] int -> logits [B, S, VOCAB]
        h = nn.Embed(VOCAB, self.config.hidden_size, name="embed")(tokens)  # [B, S, d]
        for i in range(self.layers):
            h = h + OmniMoE(self.config, name=f"moe_{i}")(h, train=train)  # [B, S, d]
        return nn.Dense(VOCAB, name="readout")(h)  # [B, S, VOCAB]


def make_batch(step: int) -> dict[str, np.ndarray]:
    """The global batch of a step, the same in every process: inputs and next-token targets [B, S]."""
    text = np.random.default_rng(1000 + step).integers(0, VOCAB, (BATCH, SEQUENCE + 1), dtype=np.int32)
    return {"inputs": text[:, :-1], "targets": text[:, 1:]}


def local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's consecutive share of a global batch (what a per-host data loader would read)."""
    share = BATCH // jax.process_count()
    start = jax.process_index() * share
    return {k: v[start : start + share] for k, v in batch.items()}


@dataclasses.dataclass(frozen=True)
class Trainer:
    """init() and step() jitted for `mesh` (None: one device, plain jit). Call them under jax.set_mesh."""

    config: OmniMoEConfig
    mesh: jax.sharding.Mesh | None
    learning_rate: float = 1e-2

    @functools.cached_property
    def model(self) -> TinyLM:
        return TinyLM(self.config)

    @functools.cached_property
    def tx(self) -> optax.GradientTransformation:
        return optax.adamw(self.learning_rate)

    def _init(self, key: jax.Array) -> dict[str, Any]:
        variables = self.model.init(key, jnp.zeros((BATCH, SEQUENCE), jnp.int32), train=False)
        params = variables["params"]
        return {"params": params, "batch_stats": variables["batch_stats"], "opt_state": self.tx.init(params)}

    def _step(self, state: dict[str, Any], batch: dict[str, jax.Array]) -> tuple[dict[str, Any], dict]:
        def loss_fn(params):
            variables = {"params": params, "batch_stats": state["batch_stats"]}
            logits, updates = self.model.apply(
                variables, batch["inputs"], train=True, mutable=["batch_stats", "intermediates"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
            return loss, updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        changes, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], changes)
        dropped = sum(jax.tree.leaves(updates["intermediates"]))
        new_state = {"params": params, "batch_stats": updates["batch_stats"], "opt_state": opt_state}
        return new_state, {"loss": loss, "dropped_pairs": dropped}

    @functools.cached_property
    def state_shardings(self) -> Any:
        with jax.set_mesh(self.mesh):
            abstract = jax.eval_shape(self._init, jax.random.key(0))
        return parallel.shardings(abstract, self.mesh)

    @functools.cached_property
    def init(self):
        if self.mesh is None:
            return jax.jit(self._init)
        return jax.jit(self._init, out_shardings=self.state_shardings)

    @functools.cached_property
    def step(self):
        if self.mesh is None:
            return jax.jit(self._step, donate_argnums=0)
        shardings = (self.state_shardings, parallel.batch_sharding(self.mesh))
        return jax.jit(self._step, in_shardings=shardings, out_shardings=(self.state_shardings, None), donate_argnums=0)

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """The global batch on the devices: this process's rows, batch-sharded (or as is on one device)."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, batch)
        return parallel.shard_batch(self.mesh, local_rows(batch))
