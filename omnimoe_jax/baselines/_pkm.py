"""PKM, product-key memory (Lample et al. 2019, arXiv 1907.05242): a softmax-weighted sum of value rows
retrieved by product keys, several heads reading one value table."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnimoe_jax._shapes import flatten_tokens
from omnimoe_jax.baselines._product_keys import ProductKeyConfig, retrieval_counts
from pallas_kernels import embedding_bag


@dataclasses.dataclass(frozen=True)
class PKMConfig(ProductKeyConfig):
    """Sizes and switches of one product-key memory layer.

    Attributes:
      hidden_size: d (the values are d-dimensional: the memory's output is the FFN's output).
      num_values: N = n*n value rows, n >= 2.
      num_heads: h memory heads; each has its own query network and its own two sub-key tables (as in
        Lample et al.), all read the same values.
      values_per_head: k rows retrieved per head (h * k per token), 1 <= k <= N.
      key_dim: query length per head, even; each half (key_dim / 2) scores one sub-key table.
      query_norm: "batchnorm" (non-affine query BatchNorm, torch semantics) or "none".
      query_norm_eps, query_norm_momentum: BatchNorm constants (torch defaults).
      implementation: "auto", "xla" or "pallas", passed to `omni_router` (the product-key top-k) and to
        `embedding_bag` (the value read).
      dtype, param_dtype: compute and storage dtypes.
    """

    hidden_size: int
    num_values: int
    num_heads: int
    values_per_head: int
    key_dim: int
    query_norm: str = "batchnorm"
    query_norm_eps: float = 1e-5
    query_norm_momentum: float = 0.1
    implementation: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    table_field: ClassVar[str] = "num_values"
    top_k_field: ClassVar[str] = "values_per_head"
    shared_keys: ClassVar[bool] = False
    table_parameters: ClassVar[frozenset[str]] = frozenset({"values"})  # the sub-keys are not read by row

    @classmethod
    def module_class(cls) -> type[nn.Module]:
        return PKM

    def active_parameters(self) -> int:
        h, c = self.num_heads, self.key_dim  # d h c (queries) + h n c (sub-keys) + d h k (values)
        return self.hidden_size * h * c + h * self.num_keys * c + self.hidden_size * h * self.values_per_head

    @classmethod
    def small_preset(cls, hidden_size: int, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> Self:
        d, n = hidden_size, hidden_size // 2  # N = (d/2)^2, 4 heads x 9d/4, key_dim d/2
        return cls(d, n * n, num_heads=4, values_per_head=9 * d // 4, key_dim=n, dtype=dtype, param_dtype=param_dtype)


class PKM(nn.Module):
    """y = sum over heads h, retrieved rows e of softmax_h(score)_e * values[e].

    1. Flatten the input's leading dims to tokens [T, d].
    2. `retrieval`: per head, a query (with BatchNorm) scores the N rows through the head's two sub-key
       tables; the exact top k; softmax over those k (`ProductKeyRetrieval`, one key pair per head).
    3. Sum the h*k value rows weighted by the gates (`pallas_kernels.embedding_bag`, f32 sums).

    Call `(x, *, train=False)`: x [..., d] -> [..., d]. Variables: "params" {retrieval: {query: {kernel
    [d, h*key_dim]}, sub_keys [h, 2, n, key_dim/2]}, values [N, d]}; with BatchNorm, "batch_stats"
    {retrieval: {query_norm: {...}}}. Sown outside `init`: "metrics"/"expert_counts", [N] int32, how many
    (token, head, slot) retrievals each value row received (the name every sparse FFN here uses for its load).
    """

    config: PKMConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        cfg = self.config
        tokens = flatten_tokens(x, cfg.hidden_size, cfg.dtype)  # [T, d]
        gates, indices = cfg.retrieval()(tokens, train=train)  # [T, h, k] each
        init = nn.initializers.normal(stddev=cfg.hidden_size**-0.5)
        values = self.param("values", init, (cfg.num_values, cfg.hidden_size), cfg.param_dtype).astype(cfg.dtype)
        num_tokens, heads, k = indices.shape
        # The h*k rows of each token read and summed in one gathered pass by the kernels (the "xla" path,
        # like XLA's own lowering of a gather and a sum, materialises [T, h*k, d]: 20 GiB at the paper's
        # setting, T = 4096, h*k = 2500, d = 1024).
        y = embedding_bag(
            values,
            gates.reshape(num_tokens, heads * k),
            indices.reshape(num_tokens, heads * k),
            implementation=cfg.implementation,
        )  # [T, d] in values' dtype, summed in f32
        if not self.is_initializing():
            self.sow("metrics", "expert_counts", retrieval_counts(indices, cfg.num_values))
        return y.astype(cfg.dtype).reshape(*x.shape[:-1], cfg.hidden_size)  # [..., d]
