"""Row caches: the cache mechanisms keep only the first rows of the network batch (the rows that cached steps
run: the cond half when every cached step uses the condition cache), stored in ``CACHE_DTYPE`` by default.

Half-precision storage halves the caches' memory; the values that cached steps reuse are then rounded to float16
(10 mantissa bits), while the rows a step computes afresh are used exactly (:func:`scatter_rows`). float32
storage reproduces the reference computations of every mechanism (the exactness tests use it).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

CACHE_DTYPE = torch.float16


def keep_rows(cache: Optional[Tensor], value: Tensor, rows: int, shape: Optional[tuple[int, ...]] = None,
              dtype: Optional[torch.dtype] = None) -> Tensor:
    """Copy the first ``rows`` rows of ``value`` into ``cache`` (at its leading corner: a cache may be longer
    than value along the other dims) and return the cache, allocated on first use as (rows, *shape) (default:
    value's shape) of ``dtype`` (default: value's)."""
    if cache is None:
        cache = value.new_empty((rows, *(shape or value.shape[1:])), dtype=dtype or value.dtype)
    n = min(rows, value.shape[0])
    cache[(slice(0, n), *(slice(0, d) for d in value.shape[1:]))].copy_(value[:n])
    return cache


def scatter_rows(cache: Tensor, dim: int, index: Tensor, fresh: Tensor) -> Tensor:
    """Write ``fresh`` into ``cache`` at ``index`` along ``dim`` (kept for later steps) and return the cache's
    contents in fresh's dtype with the fresh values exact: the cache itself when the dtypes agree, else a copy."""
    cache.scatter_(dim, index, fresh.to(cache.dtype))
    if cache.dtype == fresh.dtype:
        return cache
    return cache.to(fresh.dtype).scatter_(dim, index, fresh)


def write_slices(cache: Tensor, fresh: Tensor, slots: list[tuple[slice, slice]], end: int) -> Tensor:
    """Write the parts ``fresh[..., src, :]`` into ``cache[..., dst, :]`` (dim 2, for each (dst, src) of ``slots``)
    and return ``cache[:, :, :end]`` in fresh's dtype with the fresh values exact (a view when the dtypes agree)."""
    for dst, src in slots:
        cache[:, :, dst] = fresh[:, :, src]
    out = cache[:, :, :end]
    if out.dtype == fresh.dtype:
        return out
    out = out.to(fresh.dtype)
    for dst, src in slots:
        out[:, :, dst] = fresh[:, :, src]
    return out
