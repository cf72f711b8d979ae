"""The divergence guard: a non-finite loss, gradient norm or update is never applied and never saved.

Inside the jitted train step (`guard`), in the manner of `optax.apply_if_finite` but over the whole train
state: a step whose numbers are not all finite keeps the previous state and records its step number in
`nonfinite_step`; from then on every update is skipped, so the state stays the last finite one. Nothing
waits for the device: the loop reads `nonfinite_step` (`first_nonfinite_step`) where it reads the state
anyway, at each logged step and before each checkpoint, and then stops without saving (reason
`REASON`), so no checkpoint, and no rotation, ever replaces the last finite one.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

REASON = "non-finite loss"


def all_finite(*trees: Any) -> jax.Array:
    """[] bool: whether every element of every leaf of `trees` is finite."""
    leaves = [leaf for tree in trees for leaf in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def guard(state: Any, candidate: Any, *, finite: jax.Array) -> Any:
    """`candidate` (the state after this step) if `finite` and no earlier step was non-finite, else `state`
    with `nonfinite_step` set to this step (state.step + 1) the first time.

    `state`, `candidate`: TrainStates (any flax struct with `step` and `nonfinite_step`) of equal structure.
    """
    clean = state.nonfinite_step < 0
    apply = finite & clean
    kept = jax.tree.map(lambda new, old: jnp.where(apply, new, old), candidate, state)
    first = jnp.where(clean & ~finite, state.step + 1, state.nonfinite_step)
    return kept.replace(nonfinite_step=first.astype(jnp.int32))


def first_nonfinite_step(state: Any) -> int | None:
    """The step at which training went non-finite, or None (waits for the state's last step)."""
    step = int(jax.device_get(state.nonfinite_step))
    return None if step < 0 else step


def message(step: int, last_checkpoint: int | None) -> str:
    kept = f"the last checkpoint, step {last_checkpoint}, is kept" if last_checkpoint is not None else "none was saved"
    return (
        f"stopped: step {step} had a non-finite loss, gradient norm or update (diverged; try a lower "
        f"--learning_rate or --grad_clip); it and later steps were not applied or saved, and {kept}"
    )
