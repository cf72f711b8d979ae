"""Product-key retrieval (Lample et al. 2019, arXiv 1907.05242), shared by PEER and PKM.

A table of N = n*n slots is indexed by a row i and a column j (slot e = i*n + j). Each slot's key is the
concatenation of a row sub-key and a column sub-key, so a query's score for slot e splits into two dot
products, s_1[i] + s_2[j], and the exact top k over all N slots only ever needs the top min(k, n) of each
axis. That search is `pallas_kernels.omni_router`: it takes per-axis scores [tokens, n] and returns the exact
top-k of their sums with e = i*n + j. It was written for OmniMoE's per-axis log-probabilities, but nothing
in it assumes a sign or a normalisation (the tests check it against brute force on raw dot products here),
so PEER and PKM pass raw q.k scores, one router "token" per (token, head). `ProductKeyConfig` is what their
configs share: the checks and the retrieval they build.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnimoe_jax._batch_norm import TorchBatchNorm
from omnimoe_jax.baselines._config import IMPLEMENTATIONS, QUERY_NORMS, BaselineConfig
from pallas_kernels import omni_router


@dataclasses.dataclass(frozen=True)
class ProductKeyConfig(BaselineConfig):
    """Base of PEERConfig and PKMConfig: a table of N = n*n rows read by `num_heads` heads through product
    keys. No fields of its own: the checks the two share (each error naming the field), n, and the
    `ProductKeyRetrieval` a module builds from the config.

    A subclass has hidden_size, num_heads, key_dim, query_norm, query_norm_eps, query_norm_momentum,
    implementation, dtype and param_dtype, and N and k (rows per head) under the names `table_field` and
    `top_k_field` (PEER's experts, PKM's values).

    Class attributes:
      table_field, top_k_field: the names of the N and k fields.
      shared_keys: one pair of sub-key tables for all heads (PEER), or one pair per head (PKM).
    """

    table_field: ClassVar[str]
    top_k_field: ClassVar[str]
    shared_keys: ClassVar[bool]

    def __post_init__(self):
        self._check_positive_ints("hidden_size", self.table_field, "num_heads", self.top_k_field, "key_dim")
        self._check_square(self.table_field)
        self._check_at_most(self.top_k_field, self.table_field)
        if self.key_dim % 2:
            raise ValueError(f"key_dim={self.key_dim} must be even (each half scores one sub-key table)")
        self._check_choice("query_norm", QUERY_NORMS)
        self._check_positive_number("query_norm_eps")
        self._check_fraction("query_norm_momentum")
        self._check_choice("implementation", IMPLEMENTATIONS)
        super().__post_init__()

    @property
    def num_keys(self) -> int:
        """n: sub-keys per axis."""
        return math.isqrt(getattr(self, self.table_field))

    def retrieval(self) -> ProductKeyRetrieval:
        """This config's `ProductKeyRetrieval`, named "retrieval" (built inside the owning module's compact call)."""
        return ProductKeyRetrieval(
            num_heads=self.num_heads,
            num_keys=self.num_keys,
            top_k=getattr(self, self.top_k_field),
            key_dim=self.key_dim,
            shared_keys=self.shared_keys,
            query_norm=self.query_norm,
            query_norm_eps=self.query_norm_eps,
            query_norm_momentum=self.query_norm_momentum,
            implementation=self.implementation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="retrieval",
        )


class ProductKeyRetrieval(nn.Module):
    """Per head h: query q = norm(W_q x); scores of slot e = i*n + j: q[:c] . K_1[i] + q[c:] . K_2[j]
    (c = key_dim / 2); the top `top_k` slots by score; gates = softmax over those k scores.

    1. `query`: one bias-free Dense d -> heads * key_dim (the heads' query networks side by side).
    2. `query_norm`: non-affine BatchNorm of the queries over tokens ("batchnorm", PEER's query
       normalisation; batch statistics in training, running ones in eval; torch semantics) or "none".
    3. Sub-key scores [T, heads, 2, n]: `sub_keys` is [2, n, c] shared by all heads (PEER) or
       [heads, 2, n, c] with one pair of tables per head (PKM).
    4. Exact top-k of the n*n sums per (token, head) through `omni_router`; softmax over the k.

    Call `(tokens [T, d], *, train)` -> (gates [T, heads, k] f32 (f64 for f64 compute), indices
    [T, heads, k] int32 in [0, n*n)). The k slots of a (token, head) come in `omni_router`'s unsorted order
    on the kernel paths (by score on "xla"): the same set and gates, whatever the order.
    """

    num_heads: int
    num_keys: int  # n: sub-keys per axis; the table has n*n slots
    top_k: int
    key_dim: int
    shared_keys: bool
    query_norm: str
    query_norm_eps: float
    query_norm_momentum: float
    implementation: str
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
        num_tokens = tokens.shape[0]
        heads, n, half = self.num_heads, self.num_keys, self.key_dim // 2
        acc = jnp.promote_types(self.dtype, jnp.float32)  # normalise and score in f32 at least
        query = nn.Dense(
            heads * self.key_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="query"
        )(tokens).astype(acc)  # [T, heads * key_dim]
        if self.query_norm == "batchnorm":
            query = TorchBatchNorm(
                heads * self.key_dim, eps=self.query_norm_eps, momentum=self.query_norm_momentum, name="query_norm"
            )(query, train=train)
        query = query.reshape(num_tokens, heads, 2, half).astype(self.dtype)  # [T, heads, 2, c]
        key_shape = (2, n, half) if self.shared_keys else (heads, 2, n, half)
        # Sub-keys ~ N(0, 1/c): a unit-variance query half then scores O(1), a useful softmax temperature.
        sub_keys = self.param("sub_keys", nn.initializers.normal(half**-0.5), key_shape, self.param_dtype)
        sub_keys = sub_keys.astype(self.dtype)
        spec = "thpc,pnc->thpn" if self.shared_keys else "thpc,hpnc->thpn"
        scores = jnp.einsum(spec, query, sub_keys, preferred_element_type=acc)  # [T, heads, 2, n]
        scores = scores.reshape(num_tokens * heads, 2, n)  # [T * heads, 2, n]
        # Unsorted: the softmax and the sums over the k slots downstream do not depend on the slots' order,
        # so the kernels skip the sort of the [T * heads, k] result (the reference returns it sorted anyway).
        top_scores, indices = omni_router(
            scores[:, 0], scores[:, 1], self.top_k, implementation=self.implementation, sort_by_score=False
        )  # [T * heads, k] each
        gates = jax.nn.softmax(top_scores, axis=-1)  # [T * heads, k]
        return gates.reshape(num_tokens, heads, self.top_k), indices.reshape(num_tokens, heads, self.top_k)


def retrieval_counts(indices: jax.Array, num_slots: int) -> jax.Array:
    """[N] int32: how many (token, head, slot) retrievals each of the `num_slots` table rows received.

    The fraction of rows in use is `mean(counts > 0)`; counts (not that fraction) add up over batches."""
    return jnp.bincount(indices.reshape(-1), length=num_slots).astype(jnp.int32)  # [N]
