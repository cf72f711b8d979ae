"""Dots of gathered table rows with token rows: s[t, k] = table[indices[t, k]] . x[t] (the score half of the
atomic experts, alone: the hidden-dimension expert layout sums these partial dots across devices)."""

from pallas_kernels.row_dots.api import row_dots
from pallas_kernels.row_dots.reference import row_dots_reference

__all__ = ["row_dots", "row_dots_reference"]
