"""The training loop: state, optimizer, the pure jitted train/eval steps, and `run`.

`train_step(state, batch) -> (state, metrics)` and `eval_step(state, batch) -> sums` are pure functions of
their arguments (model and optimizer are closed over), built by `make_train_step` / `make_eval_step`;
`run` jits them (state donated) and drives them, on one device or, given a Mesh, with the TrainState's
shardings on it (`train.mesh`): nothing else holds device state.

metrics.jsonl records, one JSON object per line, `kind` first:

- start: step (0, or the step resumed from), resumed, resumed_from (the checkpoint restored, or null),
  skipped_checkpoints (newer checkpoints that failed verification: [{step, reason, moved_to}]), config,
  parameters {total, active}, corpus {source, byte_level, train_tokens, validation_tokens,
  train_documents, validation_documents}, device, jax, compile_s, model_flops_per_token (`train.flops`),
  peak_flops_per_device (the datasheet bf16 peak of the device kind, null where unknown), mesh
  ({"data": D, "expert": E}, or null on one device), processes.
- train: step, loss (mean nats per target token over the step's batch), [aux_loss (the auxiliary loss term
  of the objective, before aux_loss_coefficient; GShard and DeepSeekMoE only)], grad_norm (before
  clipping), learning_rate (used by this step), dropped_pairs (routed (token, expert) pairs dropped for
  lack of expert-parallel dispatch capacity in all steps since the previous train record; 0 unless
  expert_capacity_factor is set and the run has a mesh), tokens_per_s (training time only, since the
  previous record), mfu (model FLOPs utilisation of that throughput against every device's datasheet bf16
  peak; null where the device kind is unknown, as on a CPU), tokens_seen, elapsed_s.
- eval: step, val_loss (mean nats per validation target token), bits_per_byte (nats / ln 2 over the byte
  targets, BOS/EOS excluded; with a tokenizer, val_loss * validation tokens / validation bytes / ln 2;
  null for pre-tokenised corpora), tokens, dropped_pairs (expert-parallel
  dispatch drops over the evaluation, as above), routing (mean over the sparse layers of experts_used,
  max_load, load_entropy, and router_entropy (OmniMoE, FlashMoE) or dropped_pairs, dropped_fraction (pairs over a
  capacity-bound MoE expert's capacity: GShard, DeepSeekMoE with dispatch="capacity") and balance_loss
  (MoEs): see `train.metrics`) and routing_per_layer (the same for each sparse layer, with its index). No
  routing fields for the dense FFN.
- checkpoint: step, seconds.
- end: step, reason ("done", "stop_at_step", "time limit", "SIGINT", "SIGTERM", "non-finite loss", or
  in a multi-process run "another process stopped"), dropped_pairs (in the steps after the last train
  record), elapsed_s; with "non-finite loss" also nonfinite_step (the first step not applied:
  `train.divergence`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from omnimoe_jax._model import TransformerLM, parameter_counts
from train import data as data_lib
from train import divergence
from train import mesh as mesh_lib
from train import progress as progress_lib
from train import tokenizer as tokenizer_lib
from train.checkpoint import Checkpoints
from train.config import TrainConfig
from train.flops import model_flops_per_token, peak_flops
from train.metrics import MetricsLog, dropped_pairs, routing_report, routing_statistics, sown_statistics
from train.prefetch import BatchPrefetcher
from train.run_directory import RunDirectoryError, RunLock


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


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate, then cosine decay to learning_rate * min_lr_ratio at `steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.steps,
        end_value=config.learning_rate * config.min_lr_ratio,
    )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW; weight decay on parameters of rank >= 2 (not norm scales)."""
    adamw = optax.adamw(
        learning_rate_schedule(config),
        b1=config.beta1,
        b2=config.beta2,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
    )
    if config.grad_clip == 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)


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
    metrics: loss (cross-entropy, mean over micro-batches), aux_loss (the sown auxiliary losses, mean over
    micro-batches; for the FFN kinds that sow one), grad_norm (before clipping), learning_rate (of this
    update), dropped_pairs (int32, expert-parallel dispatch drops summed over micro-batches and layers; see
    `train.metrics.dropped_pairs`).
    """
    schedule = learning_rate_schedule(config)

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
        return objective, (loss, aux, updates.get("batch_stats", batch_stats), dropped_pairs(updates))

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
        metrics = {"loss": loss_sum / micro_batches}
        if config.model.ffn.sows_aux_loss:
            metrics["aux_loss"] = aux_sum / micro_batches
        metrics.update(grad_norm=grad_norm, learning_rate=schedule(state.step), dropped_pairs=dropped)
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module, config: TrainConfig) -> Callable:
    """eval_step(state, batch [B, L + 1]) -> sums over the batch, in eval mode (running BatchNorm stats).

    Sums: nll and tokens (all targets), byte_nll and bytes (targets < 256), dispatch_dropped_pairs
    (expert-parallel dispatch drops), and per sparse layer (M of them) expert_counts [M, N] and router_entropy [M] for
    OmniMoE and FlashMoE (`train.metrics.routing_statistics`), or expert_counts [M, E] and, where sown,
    dropped_pairs [M] and balance_loss [M] for the baselines (`train.metrics.sown_statistics`).
    """
    num_experts = getattr(config.model.ffn, "num_experts", 0)  # the routed kinds' N

    def eval_step(state: TrainState, batch: jax.Array) -> dict[str, jax.Array]:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        (logits, routings), collections = model.apply(
            variables, batch[:, :-1], return_routing=True, mutable=["intermediates", "metrics"]
        )  # [B, L, V], M OmniMoE/FlashMoE results; the expert-parallel drops and the baselines' metrics
        targets = batch[:, 1:]  # [B, L]
        nll = cross_entropy(logits, targets)  # [B, L]
        is_byte = targets < data_lib.BOS  # [B, L]
        sums = {
            "nll": jnp.sum(nll),
            "tokens": jnp.asarray(nll.size, jnp.float32),
            "byte_nll": jnp.sum(jnp.where(is_byte, nll, 0.0)),
            "bytes": jnp.sum(is_byte).astype(jnp.float32),
            # Not "dropped_pairs": the capacity-bound baselines sow per-layer counts under that name.
            "dispatch_dropped_pairs": dropped_pairs(collections),
        }
        if routings:
            stats = [routing_statistics(r, num_experts) for r in routings]
            sums["expert_counts"] = jnp.stack([counts for counts, _ in stats])  # [M, N]
            sums["router_entropy"] = jnp.stack([entropy for _, entropy in stats])  # [M]
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
        config = mesh_lib.with_expert_axis(config)
    model = TransformerLM(config.model)
    train_step, eval_step = make_train_step(model, optimizer, config), make_eval_step(model, config)
    if mesh is None:
        jitted = jax.jit(init_state), jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)
    else:
        jitted = mesh_lib.jit_steps(mesh, init_state, train_step, eval_step)
    init_jit, train_jit, eval_jit = jitted
    return Steps(model=model, optimizer=optimizer, init_state=init_jit, train_step=train_jit, eval_step=eval_jit)


def load_config(run_dir: str | pathlib.Path) -> TrainConfig:
    """The TrainConfig a run stored in <run_dir>/config.json."""
    path = pathlib.Path(run_dir) / "config.json"
    if not path.is_file():
        raise RunDirectoryError(f"{str(path)!r} does not exist: {str(run_dir)!r} is not a run directory")
    return TrainConfig.from_dict(json.loads(path.read_text()))


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
    return mesh_lib.restore_target(shapes, mesh)


def evaluate(
    steps: Steps,
    state: TrainState,
    batches: list[np.ndarray],
    config: TrainConfig,
    *,
    byte_level: bool,
    tokens_per_byte: float | None = None,
):
    """The eval record's numbers over `batches` (see the module docstring). `tokens_per_byte`: a tokenised
    corpus's validation tokens per byte (`Corpus.tokens_per_byte`), which converts nats/token to bits/byte."""
    totals: dict[str, np.ndarray] = {}
    for batch in batches:
        sums = jax.device_get(steps.eval_step(state, batch))
        for name, value in sums.items():
            totals[name] = totals.get(name, 0) + np.asarray(value, np.float64)
    result: dict[str, Any] = {
        "val_loss": float(totals["nll"] / totals["tokens"]),
        "bits_per_byte": float(totals["byte_nll"] / totals["bytes"] / math.log(2)) if byte_level else None,
        "tokens": int(totals["tokens"]),
        "dropped_pairs": int(totals["dispatch_dropped_pairs"]),
    }
    if tokens_per_byte is not None:
        result["bits_per_byte"] = result["val_loss"] * tokens_per_byte / math.log(2)
    if "expert_counts" in totals:
        result.update(routing_report(totals, config.model.sparse_layers, num_batches=len(batches)))
    return result


class _StopFlag:
    """Set by SIGINT/SIGTERM (the loop then saves a checkpoint and exits); a second signal acts as usual."""

    def __init__(self):
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        self.reason = signal.Signals(signum).name
        print(f"\n{self.reason}: saving a checkpoint after this step (send it again to abort)", flush=True)
        self._restore()

    def _restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopFlag]:
        # Python delivers signals to the main thread only; elsewhere (a worker thread) run without handlers.
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            self._restore()


def run(
    config: TrainConfig,
    run_dir: str | pathlib.Path,
    *,
    resume: bool = False,
    stop_at_step: int | None = None,
    log: Callable[[str], None] | None = None,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """Train `config` in `run_dir` (new, or resumed from its latest checkpoint). Returns a summary dict.

    Resuming restores params, optimizer state, batch_stats, step and the data sampler's RNG, so the rest
    of the run is exactly what an uninterrupted run would have done. `stop_at_step` ends the run early
    (with a checkpoint) once that many steps are done, as a signal or the time limit would.

    `mesh`: train data + expert parallel on it (`train.mesh`; None = one device). A run may resume on
    another mesh, or none: the checkpoint is restored with the new layout. In a multi-process job every
    process calls `run` with the same arguments; process 0 alone writes config.json, metrics.jsonl and `log`
    lines, and all of them save and restore the checkpoints.
    """
    started = time.perf_counter()
    deadline = started + 60 * config.time_limit_minutes if config.time_limit_minutes else math.inf
    console = log is None and mesh_lib.is_primary()  # our own console: a progress bar if it is a terminal
    log = (log or functools.partial(print, flush=True)) if mesh_lib.is_primary() else (lambda line: None)
    run_dir = pathlib.Path(run_dir)
    if mesh is not None:
        mesh_lib.check_mesh(config, mesh)
    corpus, sampler, eval_batches = _prepare_data(config, log)  # fails before anything is compiled
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.tokenizer is not None and mesh_lib.is_primary():
        tokenizer_lib.store(config.tokenizer, run_dir)  # train.sample encodes and decodes with the copy
    metrics_log = MetricsLog(run_dir, enabled=mesh_lib.is_primary())
    steps = build_steps(config, mesh)
    with (
        RunLock(run_dir, enabled=mesh_lib.is_primary()),  # before anything in run_dir is written
        # Asynchronous: a save blocks the loop only while the state is copied off the device.
        Checkpoints(run_dir, keep=config.keep_checkpoints, asynchronous=True) as checkpoints,
        _StopFlag().installed() as stop,
        contextlib.ExitStack() as stack,
        progress_lib.Progress(config.steps, enabled=None if console else False) as progress,
        jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext(),
    ):
        if torn := metrics_log.repair():
            log(f"metrics.jsonl: removed a torn last line ({torn} bytes) left by an interrupted write")
        state, resumed = _initial_state(config, run_dir, steps, checkpoints, sampler, resume=resume, log=log, mesh=mesh)
        step = int(state.step)
        if stop_at_step is not None and not step <= stop_at_step <= config.steps:
            raise ValueError(f"stop_at_step={stop_at_step} must be in [{step}, steps={config.steps}]")
        shape = (config.grad_accum, config.micro_batch_size, config.model.context_length + 1)
        # Compile ahead so the first tokens/s figure measures training, not compilation.
        compile_start = time.perf_counter()
        train_step = compiled_train_step(steps, shape)
        _log_start(config, corpus, step, resumed, time.perf_counter() - compile_start, metrics_log, log, mesh)
        log = progress.start(step, log, metrics_log)  # after compiling; lines print above the bar from here on
        if mesh is not None:
            eval_batches = [mesh_lib.put_batch(mesh, batch, axis=0) for batch in eval_batches]

        # The sampler runs ahead of the step (train.prefetch); the state after the last batch used is saved.
        sampler_state = sampler.state()

        def put(batch: np.ndarray) -> jax.Array:
            batch = batch.reshape(shape)  # [accum, micro, L + 1], the global batch in every process
            if mesh is None:
                return jax.device_put(batch)
            return mesh_lib.put_batch(mesh, batch, axis=1)  # micro-batches split over the devices

        def save() -> None:
            save_start = time.perf_counter()
            checkpoints.save(step, state, {"sampler": sampler_state})
            metrics_log.write(
                {"kind": "checkpoint", "step": step, "seconds": round(time.perf_counter() - save_start, 2)}
            )

        prefetcher = stack.enter_context(BatchPrefetcher(sampler.next, put=put, state=sampler.state))
        reason, last_eval = "done", None
        window_start, window_steps = time.perf_counter(), 0  # tokens/s counts training time since the last record
        window_dropped = []  # each step's dropped pairs since the last train record, read when logging
        while step < config.steps:
            if step == stop_at_step:
                reason = "stop_at_step"
                break
            wanted = stop.reason or ("time limit" if time.perf_counter() > deadline else None)
            # Processes must stop after the same step: they agree at logged steps (train.mesh.agree_on_stop).
            if agreed := mesh_lib.agree_on_stop(wanted, at_agreement_point=step % config.log_every == 0):
                reason = agreed
                break
            batch, sampler_state = prefetcher.next()  # on the device already
            state, metrics = train_step(state, batch)  # dispatched asynchronously; read back only when logged
            window_dropped.append(metrics["dropped_pairs"])
            step, window_steps = step + 1, window_steps + 1
            progress.advance(step)  # no device read: shows the last logged metrics
            done = step == config.steps
            logged = step % config.log_every == 0 or done
            evaluated = step % config.eval_every == 0 or done
            saved = step % config.checkpoint_every == 0 or done
            if logged:
                metrics = {k: np.asarray(v).item() for k, v in jax.device_get(metrics).items()}  # waits for the step
                metrics["dropped_pairs"] = int(np.sum(jax.device_get(window_dropped)))
                window_dropped = []
                seconds = time.perf_counter() - window_start
                _log_train(
                    config, step, metrics, window_steps, seconds, time.perf_counter() - started, metrics_log, log
                )
            if (logged or saved) and (nonfinite := divergence.first_nonfinite_step(state)) is not None:
                reason = divergence.REASON  # before the save: a non-finite state is never written
                log(divergence.message(nonfinite, checkpoints.latest_step()))
                break
            if evaluated:
                last_eval = evaluate(
                    steps,
                    state,
                    eval_batches,
                    config,
                    byte_level=corpus.byte_level,
                    tokens_per_byte=corpus.tokens_per_byte,
                )
                metrics_log.write({"kind": "eval", "step": step, **last_eval})
                log(_eval_line(step, last_eval))
            if saved:
                save()
            if logged:
                checkpoints.poll()  # a background save that has finished gets its manifest now
            if logged or evaluated or saved:
                window_start, window_steps = time.perf_counter(), 0
        if reason != divergence.REASON and step not in checkpoints.all_steps():  # stopped early: keep what was done
            if (nonfinite := divergence.first_nonfinite_step(state)) is not None:  # since the last check
                reason = divergence.REASON
                log(divergence.message(nonfinite, checkpoints.latest_step()))
            else:
                save()
    elapsed = round(time.perf_counter() - started, 2)
    # Steps after the last train record (a run stopped between logged steps) report their drops here.
    unlogged_dropped = int(np.sum(jax.device_get(window_dropped)))
    end = {"kind": "end", "step": step, "reason": reason, "dropped_pairs": unlogged_dropped, "elapsed_s": elapsed}
    if reason == divergence.REASON:
        end["nonfinite_step"] = nonfinite
    metrics_log.write(end)
    log(f"{reason} at step {step} after {_duration(elapsed)}; checkpoints in {checkpoints.directory}")
    return {"step": step, "reason": reason, "last_eval": last_eval, "elapsed_s": elapsed, "run_dir": str(run_dir)}


def _log_start(config, corpus, step, resumed, compile_s, metrics_log, log, mesh) -> None:
    counts = parameter_counts(config.model)
    metrics_log.write(
        {
            "kind": "start",
            "step": step,
            **resumed,
            "config": config.to_dict(),
            "parameters": counts,
            "corpus": corpus.summary(),
            "device": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "compile_s": round(compile_s, 2),
            "model_flops_per_token": model_flops_per_token(config.model)["model_flops_per_token"],
            "peak_flops_per_device": peak_flops(jax.devices()[0].device_kind),
            "mesh": None if mesh is None else dict(mesh.shape),
            "processes": jax.process_count(),
        }
    )
    layout = "one device" if mesh is None else f"mesh {dict(mesh.shape)} over {jax.process_count()} process(es)"
    log(
        f"model: {counts['total']:,} parameters, {counts['active']:,} active per token; {layout}; "
        f"train step compiled in {compile_s:.1f} s; steps {step} -> {config.steps}"
    )


def _log_train(config, step, metrics, window_steps, seconds, elapsed, metrics_log, log) -> None:
    """The train record and progress line for the `window_steps` steps that took `seconds`."""
    tokens_per_s = window_steps * config.tokens_per_step / seconds
    utilisation = _mfu(config, tokens_per_s)
    metrics_log.write(
        {
            "kind": "train",
            "step": step,
            **metrics,
            "tokens_per_s": round(tokens_per_s, 1),
            "mfu": None if utilisation is None else round(utilisation, 4),
            "tokens_seen": step * config.tokens_per_step,
            "elapsed_s": round(elapsed, 2),
        }
    )
    eta = (config.steps - step) * seconds / window_steps
    aux = f" | aux {metrics['aux_loss']:.4f}" if "aux_loss" in metrics else ""
    dropped = f" | dropped pairs {metrics['dropped_pairs']:,}" if metrics["dropped_pairs"] else ""
    log(
        f"step {step:>6}/{config.steps} | loss {metrics['loss']:.4f}{aux} | lr {metrics['learning_rate']:.2e}"
        f" | grad norm {metrics['grad_norm']:.3f}{dropped} | {tokens_per_s:,.0f} tok/s"
        + ("" if utilisation is None else f" | mfu {utilisation:.1%}")
        + f" | eta {_duration(eta)}"
    )


def _mfu(config: TrainConfig, tokens_per_s: float) -> float | None:
    """Model FLOPs utilisation against the first device's datasheet bf16 peak, summed over the devices
    (None on a device kind `train.flops.PEAK_BF16_FLOPS` does not know, such as a CPU)."""
    peak = peak_flops(jax.devices()[0].device_kind)
    if peak is None:
        return None
    flops = model_flops_per_token(config.model)["model_flops_per_token"]
    return flops * tokens_per_s / (peak * jax.device_count())


def _prepare_data(config: TrainConfig, log: Callable[[str], None]):
    """(corpus, training batch sampler, fixed evaluation batches); CorpusError on a bad corpus."""
    corpus = data_lib.load_corpus(
        config.data,
        val_fraction=config.val_fraction,
        vocab_size=config.model.vocab_size,
        token_dtype=config.token_dtype,
        tokenizer=config.tokenizer,
    )
    window = config.model.context_length + 1
    data_lib.check_fits(corpus, window)
    sampler = data_lib.BatchSampler(corpus.train, window=window, batch_size=config.batch_size, seed=config.seed)
    eval_batches = data_lib.evaluation_batches(
        corpus.validation, window=window, batch_size=config.batch_size, num_batches=config.eval_batches
    )
    log(f"corpus {corpus.source}: {len(corpus.train):,} train / {len(corpus.validation):,} validation tokens")
    return corpus, sampler, eval_batches


def _initial_state(config, run_dir, steps, checkpoints, sampler, *, resume, log, mesh) -> tuple[TrainState, dict]:
    """(state, the start record's resumed, resumed_from and skipped_checkpoints).

    Resuming restores the newest checkpoint that verifies (`Checkpoints.restore_latest`: those that fail
    are moved aside and reported) with the sampler's state, laid out for `mesh`. A fresh state writes
    config.json; so does a run in a directory whose run never saved a checkpoint (it died compiling, or
    failed before its first save), which starts it again from step 0 if its config is the same but for
    what a resume may change. A directory with checkpoints, none of which verifies, is refused.
    """
    config_path = run_dir / "config.json"
    never_saved = not checkpoints.all_steps() and not checkpoints.moved_aside()
    if resume and not never_saved:
        target = abstract_state(config, mesh)
        latest, state, data_state, skipped = checkpoints.restore_latest(target, move_aside=mesh_lib.is_primary())
        for bad in skipped:
            where = f"moved to {bad.moved_to}" if bad.moved_to else "left in place"
            log(f"checkpoint {bad.step} skipped: {bad.reason} ({where})")
        if latest is None:
            moved = ", ".join(str(p) for p in checkpoints.moved_aside())
            raise RunDirectoryError(
                f"resume: no checkpoint of {str(run_dir)!r} verifies (moved aside: {moved}); "
                "nothing was trained or written"
            )
        sampler.restore(data_state["sampler"])
        log(f"resumed {run_dir} at step {latest}" + (" (the newest checkpoint that verifies)" if skipped else ""))
        _check_config(config, run_dir, log, after=latest)
        resumed = {"resumed": True, "resumed_from": latest, "skipped_checkpoints": [s.to_dict() for s in skipped]}
        return state, resumed
    if not never_saved:
        raise RunDirectoryError(f"run directory {str(run_dir)!r} already holds a run; resume it or choose another")
    if resume and not config_path.exists():
        load_config(run_dir)  # raises: not a run directory
    if config_path.exists():
        log(f"{run_dir} holds a run that never saved a checkpoint: starting it again from step 0")
        _check_config(config, run_dir, log, after=None)
    else:
        mesh_lib.sync("run directory checked")  # before process 0 writes the config the others would take for a run
        if mesh_lib.is_primary():
            config_path.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    resumed = {"resumed": False, "resumed_from": None, "skipped_checkpoints": []}
    return steps.init_state(jax.random.key(config.seed)), resumed


def _check_config(config: TrainConfig, run_dir: pathlib.Path, log: Callable[[str], None], *, after: int | None):
    """Rewrite config.json for a run continued with `config` (from checkpoint `after`, or from step 0), which
    may change `steps` and RECORDING_FIELDS only (train.cli checks this for --resume; a restarted run is
    checked here)."""
    stored = load_config(run_dir).to_dict()
    changed = {key: (stored[key], value) for key, value in config.to_dict().items() if stored[key] != value}
    fixed = sorted(set(changed) - {"steps", *RECORDING_FIELDS})
    if fixed:
        raise RunDirectoryError(
            f"run directory {str(run_dir)!r} holds a run with another config ({', '.join(fixed)} differ); "
            "resume it with its own config, or choose another directory"
        )
    if not changed:
        return
    log("changed on resume: " + ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items()))
    if "steps" in changed and after is not None:
        log(f"the learning-rate schedule now spans {config.steps} steps, from step {after} on")
    mesh_lib.sync("config read")
    if mesh_lib.is_primary():
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def _eval_line(step: int, result: dict[str, Any]) -> str:
    line = f"eval {step:>6} | val loss {result['val_loss']:.4f}"
    if result["bits_per_byte"] is not None:
        line += f" | bits/byte {result['bits_per_byte']:.3f}"
    if result["dropped_pairs"]:
        line += f" | dropped pairs {result['dropped_pairs']:,}"
    if "routing" in result:
        r = result["routing"]
        line += f" | experts used {r['experts_used']:.3f} | max load {r['max_load']:.2f}x"
        line += f" | load entropy {r['load_entropy']:.3f}"
        if "router_entropy" in r:
            line += f" | router entropy {r['router_entropy']:.3f}"
        if "dropped_fraction" in r:
            line += f" | dropped {r['dropped_fraction']:.2%}"
        if "balance_loss" in r:
            line += f" | balance {r['balance_loss']:.3f}"
    return line


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
