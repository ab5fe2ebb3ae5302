"""Reductions of lazy (dask-backed) recordings chunk by chunk; numpy-backed data goes through the same calls."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import xarray as xr


def is_lazy(da: xr.DataArray) -> bool:
    return hasattr(da.data, "map_blocks")


def per_layer(da: xr.DataArray, reduce: Callable[[xr.DataArray], xr.DataArray]) -> xr.DataArray:
    """``reduce`` applied to one layer at a time, in memory (for reductions such as the median that dask cannot
    do chunk by chunk); the whole array at once when it is already in memory."""
    if not is_lazy(da):
        return reduce(da)
    return xr.concat([reduce(da.sel(layer=layer).load()) for layer in da["layer"].values], dim="layer")


def compute_all(results: list) -> list:
    """Lazy results computed together (one pass over the chunks they share); numpy results as they are."""
    import dask
    return list(dask.compute(*results))


def compute_small(obj: Any) -> Any:
    """A small xarray result in memory (computed if lazy)."""
    return obj.compute() if hasattr(obj, "compute") else obj


def _block_counts(values: np.ndarray, codes: np.ndarray, code_values: Sequence[int], bins: np.ndarray) -> np.ndarray:
    """(values.shape[0], len(code_values), len(bins) - 1) counts of one block; NaN is not counted."""
    finite = np.isfinite(values)
    out = np.zeros((values.shape[0], len(code_values), len(bins) - 1), np.int64)
    for i in range(values.shape[0]):
        for j, code in enumerate(code_values):
            out[i, j] = np.histogram(values[i][finite[i] & (codes[i] == code)], bins=bins)[0]
    return out


def histograms_by_code(values: xr.DataArray, codes: xr.DataArray, code_values: Sequence[int], bins: np.ndarray,
                       by: str) -> Any:
    """Counts of the finite ``values`` in ``bins`` where ``codes`` (broadcast against ``values``) equals each of
    ``code_values``, separately along the dim ``by``: an array (values.sizes[by], len(code_values), len(bins)-1).
    Lazy data gives a lazy result reduced block by block: each task holds one chunk and its small count array,
    the counts are summed pairwise (compute with :func:`compute_all`)."""
    values, codes = xr.broadcast(values, codes)
    values, codes = values.transpose(by, ...), codes.transpose(by, ...)
    if not is_lazy(values) and not is_lazy(codes):
        return _block_counts(values.values, codes.values, code_values, bins)
    import dask
    import dask.array
    data = dask.array.asarray(values.data)
    if data.chunks[0] != (data.shape[0],):
        data = data.rechunk({0: -1})
    status = dask.array.asarray(codes.data).rechunk(data.chunks)
    parts = [dask.delayed(_block_counts)(v, c, list(code_values), bins)
             for v, c in zip(data.to_delayed().ravel(), status.to_delayed().ravel())]
    while len(parts) > 1:  # a tree of sums: no task holds more than two count arrays
        parts = [dask.delayed(np.add)(*parts[i:i + 2]) if i + 1 < len(parts) else parts[i]
                 for i in range(0, len(parts), 2)]
    return parts[0]
