"""Recordings as Zarr stores: chunked along ``sample``, created once for every sample and filled batch by batch.

The store holds the recording layout of :mod:`lazymar.recording.dataset` for all ``num_samples`` samples from the
start (rank 0 creates it from the first batch, in a temporary folder renamed into place, so it appears whole or
not at all). Batch k owns the samples [k * batch_size, (k + 1) * batch_size), which is exactly one chunk along
``sample``, so ranks of a torchrun job write disjoint chunks of the one store and never touch its metadata.

Writing a batch is crash-safe without locks:

- its statistics are written as a region, one file per chunk; zarr's LocalStore writes each chunk to a temporary
  ``CHUNK.<random>.partial`` file and renames it into place, so a chunk file is always whole;
- then, last, its entries of the boolean variable ``recorded`` (one chunk per batch, so one atomic file) are set.
  ``recorded`` alone says which batches are done: a writer killed (even by SIGKILL) anywhere in a batch leaves
  that batch unmarked, readers (:func:`open_store`) skip it, and ``--resume`` (:func:`done_batches`) redoes it.

Temporaries are cleaned only when no process can be writing them: :func:`clean_stale` runs at the start of a run,
in the one process that starts it (rank 0, before the barrier that lets the other ranks write), and when a store
is created or replaced. A write never cleans, since zarr's temporary names do not say whose they are and another
rank's temporary may be about to be renamed; whatever a killed writer left is a dead run's, removed when the next
run (``--resume``) starts. Our own temporaries beside the store carry the writer's pid (``.NAME.creating<pid>``).
Two runs writing one store at the same time are not supported.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import dask.array
import numpy as np
import xarray as xr

from .dataset import RecordingError, apply_keep_bits, parse_keep_bits

RECORDED = "recorded"
# largest chunk of a statistic, uncompressed: big variables are also cut along ``step``
CHUNK_BYTES = 16 * 2**20


def is_store(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "zarr.json").is_file()


def clean_stale(path: str | Path) -> list[Path]:
    """Remove what killed writes leave: zarr's ``*.partial`` files inside the store, and half-created stores or
    NetCDF temporaries (``.NAME.creating*``, ``.NAME.tmp*``, ``.NAME.old*``) beside it. Returns what was removed.

    Call it only while no process writes to ``path`` (at the start of a run, before other ranks may write): it
    removes every temporary, a live writer's too."""
    path = Path(path)
    removed = []
    if path.is_dir():
        removed += list(path.rglob("*.partial"))
        for p in removed:
            p.unlink(missing_ok=True)
    if path.parent.is_dir():
        for pattern in (f".{path.name}.creating*", f".{path.name}.tmp*", f".{path.name}.old*"):
            for p in path.parent.glob(pattern):
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def chunk_sizes(batch: xr.Dataset, sample_chunk: int) -> dict[str, int]:
    """Chunks of every variable: ``sample_chunk`` samples, whole along other dims except ``step``, which is cut
    (the same way for every variable, so that the Dataset has one chunking) to keep the largest variable's chunks
    under CHUNK_BYTES."""
    chunks = {"sample": sample_chunk}
    largest = max((v for v in batch.data_vars.values() if "step" in v.dims), key=lambda v: v.nbytes, default=None)
    if largest is not None:
        per_step = largest.dtype.itemsize * int(np.prod([n for d, n in largest.sizes.items()
                                                          if d not in ("step", "sample")])) * sample_chunk
        chunks["step"] = int(max(1, min(largest.sizes["step"], CHUNK_BYTES // max(per_step, 1))))
    return chunks


def _template(batch: xr.Dataset, labels: np.ndarray, samples: np.ndarray, batch_size: int,
              attrs: dict[str, Any]) -> tuple[xr.Dataset, dict]:
    """The whole recording's Dataset, lazy (nothing computed) for every per-sample variable, from one batch."""
    n = len(labels)
    data_vars, encoding = {}, {}
    cut = chunk_sizes(batch, batch_size)
    for name, var in batch.data_vars.items():
        shape = tuple(n if d == "sample" else s for d, s in var.sizes.items())
        chunks = tuple(cut.get(d, s) for d, s in zip(var.dims, shape))
        data = dask.array.zeros(shape, dtype=var.dtype, chunks=chunks)
        data_vars[name] = xr.Variable(var.dims, data, attrs=var.attrs)
        encoding[name] = {"chunks": chunks}
    data_vars[RECORDED] = xr.Variable(("sample",), np.zeros(n, dtype=bool),
                                      attrs={"description": "the sample's batch is written completely"})
    for name in (RECORDED, "label", "batch"):
        encoding[name] = {"chunks": (batch_size,)}
    coords = {name: c.variable.astype(object) if c.dtype.kind == "U" else c.variable  # variable-length text
              for name, c in batch.coords.items() if "sample" not in c.dims}
    coords.update(sample=("sample", np.asarray(samples, np.int64)), label=("sample", np.asarray(labels, np.int64)),
                  batch=("sample", np.arange(n, dtype=np.int64) // batch_size))
    return xr.Dataset(data_vars, coords=coords, attrs=attrs), encoding


def create_store(path: str | Path, batch: xr.Dataset, labels: np.ndarray, batch_size: int,
                 keep_bits: Optional[str | int | dict] = None, samples: Optional[np.ndarray] = None) -> Path:
    """Create the store for all samples (labels given; sample indices 0..n-1 unless ``samples``) from one
    recorded batch, replacing any store at ``path``. Only metadata, coordinates and ``recorded`` (all False)
    are written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    bits = parse_keep_bits(keep_bits)
    attrs = {k: v for k, v in batch.attrs.items() if k not in ("rank",)}
    attrs.update(num_samples=len(labels), batch_size=int(batch_size))
    if bits is not None:
        attrs["keep_bits"] = json.dumps(bits, sort_keys=True)
    samples = np.arange(len(labels)) if samples is None else np.asarray(samples)
    template, encoding = _template(batch, labels, samples, batch_size, attrs)
    tmp = path.with_name(f".{path.name}.creating{os.getpid()}")
    try:
        template.to_zarr(tmp, mode="w", compute=False, encoding=encoding, consolidated=False, zarr_format=3)
        if path.exists():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def write_batch(path: str | Path, batch: xr.Dataset, keep_bits: Optional[str | int | dict] = None,
                start: Optional[int] = None) -> None:
    """Write one batch into its region of the store (from position ``start``, default: its first sample index,
    samples consecutive), then mark its samples recorded. It never cleans temporaries (see the module's docstring):
    ranks write at the same time."""
    path = Path(path)
    samples = batch["sample"].values
    if start is None:
        start = int(samples[0])
        if not np.array_equal(samples, np.arange(start, start + len(samples))):
            raise RecordingError(f"a batch must hold consecutive samples, got {samples.tolist()}")
    stop = start + len(samples)
    region = {"sample": slice(start, stop)}
    batch = apply_keep_bits(batch, parse_keep_bits(keep_bits))
    data = batch.drop_vars([n for n, v in batch.variables.items() if "sample" not in v.dims])
    data = data.drop_vars(["label", "batch"], errors="ignore")  # written at creation
    data.attrs = {}
    data.to_zarr(path, region=region, mode="r+", consolidated=False)
    done = xr.Dataset({RECORDED: ("sample", np.ones(stop - start, dtype=bool))},
                      coords={"sample": ("sample", samples)})
    done.to_zarr(path, region=region, mode="r+", consolidated=False)


def open_store(path: str | Path, all_samples: bool = False) -> xr.Dataset:
    """The store lazily (dask arrays, one chunk per stored chunk), restricted to the recorded samples unless
    ``all_samples``. Raises RecordingError if it is not a readable Zarr store."""
    path = Path(path)
    try:
        ds = xr.open_zarr(path, consolidated=False, chunks={})
    except Exception as err:  # zarr raises many types for a folder that is not a store
        raise RecordingError(f"{path} is not a Zarr store ({type(err).__name__}: {err})") from None
    if RECORDED not in ds or ds[RECORDED].dims != ("sample",):
        raise RecordingError(f"{path} is a Zarr store without the {RECORDED!r} variable of a lazymar recording")
    # coordinates along other dims are small: in memory, so that their chunks never disagree with the data's
    ds = ds.assign_coords({name: c.load() for name, c in ds.coords.items() if "sample" not in c.dims})
    if all_samples:
        return ds
    recorded = np.asarray(ds[RECORDED].values, dtype=bool)
    return ds.isel(sample=np.flatnonzero(recorded)).drop_vars(RECORDED)


def done_batches(path: str | Path) -> set[int]:
    """The batch indices whose samples are all recorded in the store."""
    ds = open_store(path, all_samples=True)
    recorded = np.asarray(ds[RECORDED].values, dtype=bool)
    batch = np.asarray(ds["batch"].values)
    return {int(b) for b in np.unique(batch) if recorded[batch == b].all()}


def save_store(ds: xr.Dataset, path: str | Path, keep_bits: Optional[str | int | dict] = None,
               batch_size: Optional[int] = None) -> Path:
    """Write a whole recording (e.g. imported from NetCDF) as a store, ``batch_size`` samples at a time (default:
    the recording's own batch size, else 64); its batch coordinate becomes the position // batch_size."""
    n = ds.sizes["sample"]
    size = int(batch_size or ds.attrs.get("batch_size", 0) or 64)
    ds = ds.drop_vars(RECORDED, errors="ignore")
    create_store(path, ds.isel(sample=slice(0, size)).load(), ds["label"].values, size, keep_bits,
                 samples=ds["sample"].values)
    for start in range(0, n, size):
        write_batch(path, ds.isel(sample=slice(start, start + size)).load(), keep_bits, start=start)
    return Path(path)
