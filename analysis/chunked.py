"""Reductions of lazy (dask-backed) recordings chunk by chunk; numpy-backed data goes through the same calls."""
from __future__ import annotations

from typing import Any, Callable

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


def histogram(da: xr.DataArray, bins: np.ndarray) -> Any:
    """Counts of the finite values of ``da`` in ``bins`` (lazy for dask data)."""
    data = da.data
    if is_lazy(da):
        import dask.array
        return dask.array.histogram(data[dask.array.isfinite(data)], bins=bins)[0]
    return np.histogram(data[np.isfinite(data)], bins=bins)[0]


def compute_all(results: list) -> list:
    """Lazy results computed together (one pass over the chunks they share); numpy results as they are."""
    import dask
    return list(dask.compute(*results))


def compute_small(obj: Any) -> Any:
    """A small xarray result in memory (computed if lazy)."""
    return obj.compute() if hasattr(obj, "compute") else obj
