"""The pure pieces of training: TrainState, the optimizer, and the jitted train and eval steps.

`train_step(state, batch) -> (state, metrics)` and `eval_step(state, batch) -> sums` are pure functions of
their arguments (model and optimizer are closed over), built by `make_train_step` / `make_eval_step`;
`build_steps` jits them (state donated), on one device or, given a Mesh, with the TrainState's shardings on
it (`train.mesh`). `train.loop.run` drives them; nothing else holds device state.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from omnimoe_jax import ffn_registry, parallel
from omnimoe_jax._model import TransformerLM
from train import data as data_lib
from train import divergence
from train import mesh as mesh_lib
from train.config import TrainConfig
from train.metrics import dispatch_dropped_pairs, sown_statistics, train_fields


@struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (checkpointed whole).

    Attributes:
      step: [] int32, optimizer steps taken.
      params: the model's "params" collection (param_dtype, f32 by default).
      batch_stats: the BatchNorm running statistics of OmniMoE's routers, FlashMoE's inputs, PEER's and PKM's queries
        ("batch_stats"; {} for the other FFNs).
      opt_state: the optax state (AdamW moments in the params' dtype).
      nonfinite_step: [] int32, -1, or the first step whose loss, gradient norm or updated parameters
        were not finite: that update and every later one were skipped, so the rest of the state is the
        last finite one (`train_step`). A run stops at the next point it reads the state (`run`), and
        never saves a state where this is set.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    nonfinite_step: jax.Array


# With a TrainConfig table field set the expert tables form the optimizer's "table" group (`make_optimizer`).
TABLE_GROUP, OTHER_GROUP = "table", "other"


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate, then cosine decay to learning_rate * min_lr_ratio at `steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.steps,
        end_value=config.learning_rate * config.min_lr_ratio,
    )


def table_learning_rate_multiplier(config: TrainConfig) -> optax.Schedule:
    """table_learning_rate_multiplier throughout, or with table_lr_decay_to_one a linear decay from it at
    step 0 to 1 at the last update, step `steps - 1` (a one-step run keeps the multiplier)."""
    if not config.table_lr_decay_to_one:
        return optax.constant_schedule(config.table_learning_rate_multiplier)
    return optax.linear_schedule(config.table_learning_rate_multiplier, 1.0, transition_steps=config.steps - 1)


def table_learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """The expert tables' learning rate: the base schedule times `table_learning_rate_multiplier`."""
    base, multiplier = learning_rate_schedule(config), table_learning_rate_multiplier(config)
    return lambda step: base(step) * multiplier(step)


def table_labels(params: Any) -> Any:
    """`params` with each leaf replaced by its optimizer group: TABLE_GROUP for the expert tables (a leaf named
    in `ffn_registry.table_parameter_names()`, the kinds' `table_parameters`), OTHER_GROUP for every other.

    ValueError if no leaf is a table. TrainConfig refuses a table field for an FFN kind without tables, so
    this is only reached if a kind's `table_parameters` names parameters its module does not have: the table
    settings would then silently change nothing."""
    names = ffn_registry.table_parameter_names()

    def label(path, leaf) -> str:
        del leaf
        last = path[-1]
        return TABLE_GROUP if getattr(last, "key", None) in names else OTHER_GROUP

    labels = jax.tree_util.tree_map_with_path(label, params)
    if TABLE_GROUP not in jax.tree.leaves(labels):
        raise ValueError(
            f"the table optimizer group is empty: no parameter is named one of {sorted(names)}, the FFN kinds' "
            "table_parameters (a kind declares tables its module does not have)"
        )
    return labels


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping (over all parameters), then AdamW; weight decay on parameters of rank >= 2 (not
    norm scales).

    With a table field of `config` set (`TrainConfig.has_table_group`) the AdamW is an `optax.partition`
    into two AdamWs with the same betas and epsilon: the expert tables (`table_labels`) at
    `table_learning_rate_schedule` with table_weight_decay (None: weight_decay), the other parameters as
    before. Otherwise it is the single AdamW, so the optimizer state keeps the structure checkpoints of
    such runs hold.
    """

    def adamw(learning_rate: optax.Schedule, weight_decay: float) -> optax.GradientTransformation:
        return optax.adamw(
            learning_rate,
            b1=config.beta1,
            b2=config.beta2,
            eps=config.adam_eps,
            weight_decay=weight_decay,
            mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
        )

    base = adamw(learning_rate_schedule(config), config.weight_decay)
    if config.has_table_group:
        table_decay = config.weight_decay if config.table_weight_decay is None else config.table_weight_decay
        groups = {TABLE_GROUP: adamw(table_learning_rate_schedule(config), table_decay), OTHER_GROUP: base}
        base = optax.partition(groups, table_labels)
    if config.grad_clip == 0:
        return base
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), base)


def make_init_state(model: nn.Module, optimizer: optax.GradientTransformation, config: TrainConfig) -> Callable:
    """init_state(key) -> TrainState at step 0 (pure: jit or eval_shape it)."""

    def init_state(key: jax.Array) -> TrainState:
        tokens = jnp.zeros((1, config.model.context_length), jnp.int32)  # [1, L]
        variables = model.init(key, tokens)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=optimizer.init(params),
            nonfinite_step=jnp.full((), -1, jnp.int32),
        )

    return init_state


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Nats per position: logits [B, L, V] f32, targets [B, L] int -> [B, L] f32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, config: TrainConfig) -> Callable:
    """train_step(state, batch) -> (state, metrics), batch [grad_accum, micro_batch, L + 1] int32.

    Gradients of the micro-batches are averaged (a scan, so memory holds one micro-batch of activations);
    the BatchNorm statistics are updated by each micro-batch in turn, as separate steps would. The gradient
    is that of cross-entropy + aux_loss_coefficient * the sown auxiliary losses.
    metrics: {name: [] array} of the run's `train.metrics.train_fields`, each computed from the step's
    `train.metrics.StepValues`. No "metrics" collection: routing health is measured in eval.
    """
    fields = train_fields(config)
    schedule, table_schedule = learning_rate_schedule(config), table_learning_rate_schedule(config)

    def loss_fn(params, batch_stats, tokens):
        # tokens: [b, L + 1]; predict tokens[:, 1:] from tokens[:, :-1]
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            tokens[:, :-1],
            train=True,
            mutable=["batch_stats", "intermediates", "losses"],
        )  # [b, L, V]
        loss = jnp.mean(cross_entropy(logits, tokens[:, 1:]))
        aux = sum(jax.tree.leaves(updates.get("losses", {})), jnp.zeros((), jnp.float32))  # one per sparse layer
        objective = loss + config.aux_loss_coefficient * aux
        return objective, (loss, aux, updates.get("batch_stats", batch_stats), dispatch_dropped_pairs(updates))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        def micro_step(carry, tokens):
            grad_sum, loss_sum, aux_sum, batch_stats, dropped_sum = carry
            (_, (loss, aux, batch_stats, dropped)), grads = grad_fn(state.params, batch_stats, tokens)
            carry = (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss, aux_sum + aux, batch_stats)
            return (*carry, dropped_sum + dropped), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        scalar = jnp.zeros((), jnp.float32)
        carry = (zeros, scalar, scalar, state.batch_stats, jnp.zeros((), jnp.int32))
        (grad_sum, loss_sum, aux_sum, batch_stats, dropped), _ = jax.lax.scan(micro_step, carry, batch)
        micro_batches = batch.shape[0]
        grads = jax.tree.map(lambda g: g / micro_batches, grad_sum)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        candidate = TrainState(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            nonfinite_step=state.nonfinite_step,
        )
        finite = divergence.all_finite(loss_sum, aux_sum, grad_norm, params)
        new_state = divergence.guard(state, candidate, finite=finite)  # the old state if not finite
        values = {
            "loss": loss_sum / micro_batches,
            "aux_loss": aux_sum / micro_batches,
            "dropped_pairs": dropped,
            "grads": grads,
            "grad_norm": grad_norm,
            "updates": updates,
            "params": state.params,
            "new_params": params,
            "learning_rate": schedule(state.step),
            "table_learning_rate": table_schedule(state.step),
            "step": state.step,
        }
        return new_state, {name: field.value(values) for name, field in fields.items()}

    return train_step


def make_eval_step(model: nn.Module, config: TrainConfig) -> Callable:
    """eval_step(state, batch [B, L + 1]) -> sums over the batch, in eval mode (running BatchNorm stats).

    Sums: nll and tokens (all targets), byte_nll and bytes (targets < 256), dispatch_dropped_pairs
    (expert-parallel dispatch drops, `train.metrics.dispatch_dropped_pairs`), and what the M sparse layers sow
    into "metrics" under the names of `train.metrics.ROUTING_STATISTICS` (`train.metrics.sown_statistics`):
    expert_counts [M, N] and, where the kind has them, router_entropy [M] (OmniMoE, FlashMoE), dropped_pairs [M]
    and balance_loss [M] (the baseline MoEs).
    """

    def eval_step(state: TrainState, batch: jax.Array) -> dict[str, jax.Array]:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        logits, collections = model.apply(
            variables, batch[:, :-1], mutable=["intermediates", "metrics"]
        )  # [B, L, V]; the expert-parallel drops and every sparse layer's routing statistics
        targets = batch[:, 1:]  # [B, L]
        nll = cross_entropy(logits, targets)  # [B, L]
        is_byte = targets < data_lib.BOS  # [B, L]
        sums = {
            "nll": jnp.sum(nll),
            "tokens": jnp.asarray(nll.size, jnp.float32),
            "byte_nll": jnp.sum(jnp.where(is_byte, nll, 0.0)),
            "bytes": jnp.sum(is_byte).astype(jnp.float32),
            "dispatch_dropped_pairs": dispatch_dropped_pairs(collections),
        }
        if collections.get("metrics"):
            sums.update(sown_statistics(collections["metrics"], config.model.sparse_layers))
        return sums

    return eval_step


@dataclasses.dataclass(frozen=True)
class Steps:
    """A config's model, optimizer and jitted functions (cached per config, so runs reuse compilations)."""

    model: TransformerLM
    optimizer: optax.GradientTransformation
    init_state: Callable[[jax.Array], TrainState]
    train_step: Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]
    eval_step: Callable[[TrainState, jax.Array], dict[str, jax.Array]]


# TrainConfig fields that steer only the loop around the steps: what it feeds them, and what it records and
# when it stops. A resumed run may change the second kind (and `steps`): train.cli's --resume.
_DATA_FIELDS = ("data", "tokenizer", "val_fraction", "token_dtype", "seed")
RECORDING_FIELDS = (
    "eval_every",
    "eval_batches",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "time_limit_minutes",
)
_LOOP_FIELDS = _DATA_FIELDS + RECORDING_FIELDS
# Overrides of the model that change only how its parameters are laid out on a mesh, not what it computes:
# a resumed run may change them too (train.cli's --resume; the checkpoint restores into the new layout).
RESUMABLE_LAYOUT_FIELDS = ("ffn.expert_parallel_layout",)


def build_steps(config: TrainConfig, mesh: Mesh | None = None) -> Steps:
    """The model, optimizer and jitted functions of `config`, shared by configs that differ only in loop
    fields (so a resumed run or another corpus in the same process reuses the compilations).

    With a `mesh` the OmniMoE layers are expert-parallel and the functions are jitted with the TrainState's
    shardings (`train.mesh`); trace and call them under `jax.set_mesh(mesh)`.
    """
    defaults = TrainConfig(model=config.model)
    return _build_steps(dataclasses.replace(config, **{f: getattr(defaults, f) for f in _LOOP_FIELDS}), mesh)


@functools.lru_cache(maxsize=4)
def _build_steps(config: TrainConfig, mesh: Mesh | None) -> Steps:
    optimizer = make_optimizer(config)
    # The parameters do not depend on the layout, so the plain model initialises them: its dummy batch
    # [1, L] need not split over the devices as the expert-parallel layers' tokens must.
    init_state = make_init_state(TransformerLM(config.model), optimizer, config)
    if mesh is not None:
        rules = mesh_lib.partition_rules(config, mesh)
        config = mesh_lib.with_expert_axis(config, mesh)
    model = TransformerLM(config.model)
    train_step, eval_step = make_train_step(model, optimizer, config), make_eval_step(model, config)
    if mesh is None:
        jitted = jax.jit(init_state), jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)
    else:
        jitted = mesh_lib.jit_steps(mesh, rules, init_state, train_step, eval_step)
    init_jit, train_jit, eval_jit = jitted
    return Steps(model=model, optimizer=optimizer, init_state=init_jit, train_step=train_jit, eval_step=eval_jit)


@functools.lru_cache(maxsize=8)
def compiled_train_step(steps: Steps, batch_shape: tuple[int, int, int]) -> Callable:
    """`steps.train_step` compiled ahead of time for batches [accum, micro, L + 1] (cached: a resumed run
    in the same process, or a test, does not compile again)."""
    state = jax.eval_shape(steps.init_state, jax.random.key(0))
    return steps.train_step.lower(state, jax.ShapeDtypeStruct(batch_shape, jnp.int32)).compile()


def abstract_state(config: TrainConfig, mesh: Mesh | None = None) -> TrainState:
    """The TrainState's shapes, dtypes and shardings (on `mesh`, or the first device) without allocating:
    what a checkpoint restores into, whatever mesh it was saved from."""
    shapes = jax.eval_shape(build_steps(config, mesh).init_state, jax.random.key(config.seed))
    rules = parallel.DEFAULT_RULES if mesh is None else mesh_lib.partition_rules(config, mesh)
    return mesh_lib.restore_target(shapes, mesh, rules)
