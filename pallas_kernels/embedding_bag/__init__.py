"""Weighted bags of table rows: y[t] = sum_k weights[t,k] table[indices[t,k]] (PKM's value read)."""

from pallas_kernels.embedding_bag.api import embedding_bag
from pallas_kernels.embedding_bag.reference import embedding_bag_reference

__all__ = ["embedding_bag", "embedding_bag_reference"]
