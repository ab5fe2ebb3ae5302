"""Row caches: the cache mechanisms keep only the first rows of the network batch (the rows that cached steps
run: the cond half when every cached step uses the condition cache)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor


def keep_rows(cache: Optional[Tensor], value: Tensor, rows: int, shape: Optional[tuple[int, ...]] = None) -> Tensor:
    """Copy the first ``rows`` rows of ``value`` into ``cache`` (at its leading corner: a cache may be longer
    than value along the other dims) and return the cache, allocated on first use as (rows, *shape) (default:
    value's shape)."""
    if cache is None:
        cache = value.new_empty((rows, *(shape or value.shape[1:])))
    n = min(rows, value.shape[0])
    cache[(slice(0, n), *(slice(0, d) for d in value.shape[1:]))].copy_(value[:n])
    return cache
