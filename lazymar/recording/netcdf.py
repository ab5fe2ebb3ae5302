"""Recordings as NetCDF4 files (``.nc`` paths, for small recordings): written atomically (a temporary file in the
same folder, then os.replace), read whole into memory or lazily, validated on reading."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import xarray as xr

from .dataset import RecordingError, as_recording_error, reading, validate

ENGINE = "netcdf4"


def is_netcdf(path: str | Path) -> bool:
    """NetCDF files end in .nc; every other path is a Zarr store (a folder, e.g. stats.zarr)."""
    return Path(path).suffix == ".nc"


def write_netcdf(ds: xr.Dataset, path: Path) -> Path:
    """Write ``ds`` to the NetCDF file ``path`` atomically, compressed, one chunk per sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    encoding = {}
    for name, var in ds.data_vars.items():
        chunks = tuple(1 if d == "sample" else n for d, n in zip(var.dims, var.shape))
        encoding[name] = {"zlib": True, "complevel": 4, "shuffle": True, "chunksizes": chunks}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        ds.to_netcdf(tmp, engine=ENGINE, encoding=encoding)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_netcdf(path: Path, lazy: Optional[bool] = None) -> xr.Dataset:
    """The validated recording in the NetCDF file ``path``: read into memory and closed, or with ``lazy`` opened
    lazily (one chunk per sample; close the dataset after)."""
    if not path.is_file():
        raise RecordingError(f"{path} is a folder, not a NetCDF4 file")
    try:
        opened = xr.open_dataset(path, engine=ENGINE, chunks={"sample": 1} if lazy else None)
    except Exception as err:  # the netCDF/HDF5 libraries raise many types for a file that is not NetCDF4
        raise RecordingError(f"{path} is not a NetCDF4 file ({type(err).__name__}: {err})") from None
    if lazy:
        try:
            return validate(opened, str(path))
        except (KeyError, TypeError, ValueError) as err:
            opened.close()
            raise as_recording_error(err, path) from None
    with opened, reading(path):
        ds = opened.load()
    try:
        return validate(ds, str(path))
    except (KeyError, TypeError, ValueError) as err:
        raise as_recording_error(err, path) from None

