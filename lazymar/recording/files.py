"""A recording on disk, by its path: a NetCDF4 file for ``.nc`` paths (:mod:`lazymar.recording.netcdf`), else a
Zarr store (:mod:`lazymar.recording.store`). Saving, loading (validated) and merging recordings."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import xarray as xr

from .dataset import (SHARD_ATTRS, RecordingError, apply_keep_bits, as_recording_error, concat_batches, parse_keep_bits,
                      reading, validate)
from .netcdf import is_netcdf, read_netcdf, write_netcdf
from .store import clean_stale, open_store, save_store


def save_stats(ds: xr.Dataset, path: str | Path, keep_bits: Optional[str | int | dict] = None) -> Path:
    """Write ``ds`` to ``path``: a NetCDF file for ``.nc`` paths (small recordings; atomically, a temporary file
    in the same folder, then os.replace), else a Zarr store (see :mod:`lazymar.recording.store`).

    ``keep_bits`` rounds float statistics to that many mantissa bits (see :func:`parse_keep_bits`; lossy, for
    smaller files; None keeps float32 exactly). The attribute ``keep_bits`` records what was applied."""
    path = Path(path)
    if not is_netcdf(path):
        return save_store(ds, path, keep_bits)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    ds = apply_keep_bits(ds, parse_keep_bits(keep_bits))
    return write_netcdf(ds, path)


def load_stats(path: str | Path, lazy: Optional[bool] = None) -> xr.Dataset:
    """Load and validate a recording: a Zarr store opens lazily (dask arrays, read chunk by chunk as used; only
    the recorded samples), a NetCDF file is read into memory and closed. ``lazy=True`` opens a NetCDF file
    lazily too (one chunk per sample; close the dataset after), ``lazy=False`` loads a store into memory."""
    path = Path(path)
    if not path.exists():
        raise RecordingError(f"recording not found: {path}")
    if not is_netcdf(path):
        with reading(path):
            ds = open_store(path)
            try:
                validate(ds, str(path))
            except (KeyError, TypeError, ValueError) as err:
                raise as_recording_error(err, path) from None
            return ds.load() if lazy is False else ds
    return read_netcdf(path, lazy)


# --- merging --------------------------------------------------------------------------------------------
def merge_stats(sources: Iterable[str | Path | xr.Dataset]) -> xr.Dataset:
    """Concatenate recordings of one setting (e.g. torchrun shards) along ``sample``.

    They must agree on every attribute except the shard ones and on all coordinates other than sample's."""
    datasets, names = [], []
    for src in sources:
        if isinstance(src, xr.Dataset):
            datasets.append(validate(src)), names.append("dataset")
        else:
            datasets.append(load_stats(src)), names.append(str(src))
    if not datasets:
        raise RecordingError("nothing to merge: no input recordings")
    first, first_name = datasets[0], names[0]
    seen = {int(s): first_name for s in first["sample"].values}
    for ds, name in zip(datasets[1:], names[1:]):
        for key in set(first.attrs) | set(ds.attrs):
            if key in SHARD_ATTRS:
                continue
            a, b = first.attrs.get(key), ds.attrs.get(key)
            if not _same(a, b):
                raise RecordingError(f"cannot merge {name} with {first_name}: attribute {key!r} differs ({b!r} vs {a!r})")
        for coord in ("step", "layer", "kind", "position", "head_step", "head_part", "mask_ratio", "cfg_scale"):
            if not np.array_equal(first[coord].values, ds[coord].values):
                raise RecordingError(f"cannot merge {name} with {first_name}: coordinate {coord!r} differs")
        for s in ds["sample"].values:
            if int(s) in seen:
                raise RecordingError(f"sample {int(s)} is in both {seen[int(s)]} and {name}")
            seen[int(s)] = name
    merged = concat_batches(datasets)
    merged.attrs = {k: v for k, v in first.attrs.items() if k not in ("rank", "world_size")}
    merged.attrs["merged_from"] = len(datasets)
    return merged


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b
