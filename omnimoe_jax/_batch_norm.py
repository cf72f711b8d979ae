"""The BatchNorm shared by the routers and the product-key baselines, with PyTorch's semantics."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def batch_moments_of(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, biased variance) over the token axis of [T, F] logits: [F] each."""
    mean = jnp.mean(logits, axis=0)  # [F]
    return mean, jnp.mean(jnp.square(logits - mean), axis=0)


class TorchBatchNorm(nn.Module):
    """Non-affine BatchNorm over tokens with PyTorch's `BatchNorm1d(affine=False)` semantics: the router norm
    of each axis's logits in OmniMoE, of the input tokens in FlashMoE, and the query norm of PEER and PKM.

    Training normalises with the batch mean and biased variance and moves the running statistics by
    `momentum` toward the batch mean and the *unbiased* variance (as torch does, so seed checkpoints keep
    their meaning; flax's `nn.BatchNorm` moves toward the biased one); eval uses the running statistics.
    Variables live in the "batch_stats" collection under torch's buffer names (`running_mean`,
    `running_var`, `num_batches_tracked`). Statistics are taken over the whole token axis: under `jax.jit`
    with a sharded batch that is the global batch.
    """

    num_features: int
    eps: float = 1e-5
    momentum: float = 0.1

    @nn.compact
    def __call__(self, logits: jax.Array, *, train: bool, batch_moments: tuple | None = None) -> jax.Array:
        # logits: [T, n] f32 (f64 in a float64 layer); statistics are stored in f32. batch_moments: this
        # batch's (mean, biased variance) [n] where the caller computed them (train only), as
        # `batch_moments_of` does: the router takes both axes' at once.
        running_mean = self.variable("batch_stats", "running_mean", jnp.zeros, (self.num_features,), jnp.float32)
        running_var = self.variable("batch_stats", "running_var", jnp.ones, (self.num_features,), jnp.float32)
        batches = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        # The stored f32 statistics are widened to the computation's dtype before any arithmetic: in a float64
        # layer `var + eps` and the momentum step then round once (at the store), as torch's float64 module.
        acc = jnp.promote_types(logits.dtype, jnp.float32)
        stored_mean, stored_var = running_mean.value.astype(acc), running_var.value.astype(acc)
        if not train:
            mean, var = stored_mean, stored_var
        else:
            tokens = logits.shape[0]
            if tokens < 2:
                raise ValueError(f"train=True needs at least 2 tokens for the router BatchNorm, got {tokens}")
            mean, var = batch_moments if batch_moments is not None else batch_moments_of(logits)
            if not self.is_initializing():
                unbiased = var * (tokens / (tokens - 1))
                new_mean = (1 - self.momentum) * stored_mean + self.momentum * mean
                new_var = (1 - self.momentum) * stored_var + self.momentum * unbiased
                running_mean.value = new_mean.astype(jnp.float32)
                running_var.value = new_var.astype(jnp.float32)
                batches.value = batches.value + 1
        return (logits - mean) * jax.lax.rsqrt(var + self.eps)


# Its name from when only the router used it, kept for code (and checkpoint converters) that import it. The
# variables are the same whichever name builds the module: callers name each instance.
RouterBatchNorm = TorchBatchNorm
