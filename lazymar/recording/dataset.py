"""The layout of a redundancy recording (an xarray Dataset), and saving, loading, validating and merging it.

Dimensions: sample, step, layer ("encoder.i", "decoder.i", "z"), kind (output, k, v), position (buffer first,
then the tokens in raster order), head_step (the head's sampling steps in execution order), head_part ("eps_cfg",
"res_block.i"), token and channel (the generated tokens). Statistics are float32 with NaN where a position or
layer was not computed at the step or at the step before. Files are NetCDF4 (netCDF4 engine), written atomically.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import xarray as xr

from .. import __version__
from ..errors import LazymarError

FORMAT = "lazymar.redundancy"
FORMAT_VERSION = 1
ENGINE = "netcdf4"

STATUS_NAMES = ("buffer", "known", "new", "to_predict", "masked")
STATUS_CODES = {name: code for code, name in enumerate(STATUS_NAMES)}
FEATURE_KINDS = ("output", "k", "v")
CFG_STATS = ("residual_cosine", "residual_change", "cond_change", "uncond_change")

VARIABLES: dict[str, tuple[str, ...]] = {
    "status": ("sample", "step", "position"),
    "token_cosine": ("sample", "step", "layer", "kind", "position"),
    **{f"cfg_{name}": ("sample", "step", "layer", "position") for name in CFG_STATS},
    "head_change": ("sample", "step", "head_step", "head_part"),
    "tokens": ("sample", "token", "channel"),
}
COORDS: dict[str, tuple[str, ...]] = {
    "sample": ("sample",), "label": ("sample",), "batch": ("sample",),
    "step": ("step",), "mask_ratio": ("step",), "cfg_scale": ("step",),
    "layer": ("layer",), "kind": ("kind",), "position": ("position",), "grid_row": ("position",),
    "grid_col": ("position",), "head_step": ("head_step",), "head_timestep": ("head_step",),
    "head_part": ("head_part",),
}
REQUIRED_ATTRS = ("format", "format_version", "lazymar_version", "model", "config", "num_iter", "cfg", "temperature",
                  "cfg_schedule", "seed", "schedule", "buffer_size", "seq_len")
# attributes that may differ between shards of one recording
SHARD_ATTRS = ("rank", "world_size")

DESCRIPTIONS = {
    "status": "position status at the step: " + ", ".join(f"{c}={n}" for n, c in STATUS_CODES.items()),
    "token_cosine": "cosine similarity of a position's features at step s and s-1 (cond branch); k and v: mean "
                    "over heads of the per-head cosine",
    "cfg_residual_cosine": "cosine(r_s, r_{s-1}) with r = h_cond - h_uncond",
    "cfg_residual_change": "||r_s - r_{s-1}|| / ||r_{s-1}|| with r = h_cond - h_uncond",
    "cfg_cond_change": "||c_s - c_{s-1}|| / ||c_{s-1}|| of the cond branch h_cond",
    "cfg_uncond_change": "||u_s - u_{s-1}|| / ||u_{s-1}|| of the uncond branch h_uncond",
    "head_change": "relative change between consecutive head sampling steps of the eps CFG difference "
                   "(cond eps - uncond eps) or of a res-block's residual update (output - input, cond rows); "
                   "mean over the tokens the sample decodes at the MAR step",
    "tokens": "the generated tokens",
}


class RecordingError(LazymarError):
    """A recording that cannot be made, read or merged; the message names the cause in one line."""


# --- building -------------------------------------------------------------------------------------------
def make_dataset(variables: dict[str, np.ndarray], samples: np.ndarray, labels: np.ndarray, batch: np.ndarray,
                 mask_ratio: np.ndarray, cfg_scale: np.ndarray, layers: Sequence[str], head_parts: Sequence[str],
                 buffer_size: int, grid_size: int, attrs: dict[str, Any]) -> xr.Dataset:
    """One batch of recorded arrays (names and dims of :data:`VARIABLES`) as a Dataset of the recording layout."""
    S = variables["status"].shape[1]
    P = variables["status"].shape[2]
    T = variables["head_change"].shape[2]
    position = np.arange(P)
    token_index = position - buffer_size
    data_vars = {}
    for name, dims in VARIABLES.items():
        data_vars[name] = xr.Variable(dims, variables[name], attrs={"description": DESCRIPTIONS[name]})
    data_vars["status"].attrs.update(flag_values=np.arange(len(STATUS_NAMES), dtype=np.int8),
                                     flag_meanings=" ".join(STATUS_NAMES))
    coords = {
        "sample": ("sample", np.asarray(samples, dtype=np.int64)),
        "label": ("sample", np.asarray(labels, dtype=np.int64)),
        "batch": ("sample", np.asarray(batch, dtype=np.int64)),
        "step": ("step", np.arange(S)),
        "mask_ratio": ("step", np.asarray(mask_ratio, dtype=np.float32)),
        "cfg_scale": ("step", np.asarray(cfg_scale, dtype=np.float32)),
        "layer": ("layer", np.asarray(layers, dtype=object)),
        "kind": ("kind", np.asarray(FEATURE_KINDS, dtype=object)),
        "position": ("position", position),
        "grid_row": ("position", np.where(token_index >= 0, token_index // grid_size, -1)),
        "grid_col": ("position", np.where(token_index >= 0, token_index % grid_size, -1)),
        "head_step": ("head_step", np.arange(T)),
        "head_timestep": ("head_step", np.arange(T)[::-1].copy()),
        "head_part": ("head_part", np.asarray(head_parts, dtype=object)),
    }
    all_attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "lazymar_version": __version__,
                 "buffer_size": int(buffer_size), "seq_len": int(P - buffer_size), **attrs}
    return xr.Dataset(data_vars, coords=coords, attrs=_netcdf_attrs(all_attrs))


def _netcdf_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """NetCDF attributes cannot be None, bool or nested: turn those into ints and JSON strings."""
    out = {}
    for key, value in attrs.items():
        if isinstance(value, bool):
            value = int(value)
        elif value is None:
            value = "none"
        elif isinstance(value, (dict, list, tuple)):
            value = json.dumps(value, sort_keys=True)
        out[key] = value
    return out


def concat_batches(batches: Sequence[xr.Dataset]) -> xr.Dataset:
    """Batches (or shards) of one recording concatenated along ``sample``, sorted by sample index."""
    if len(batches) == 1:
        return batches[0]
    ds = xr.concat(list(batches), dim="sample", data_vars="minimal", coords="minimal", compat="override",
                   join="exact", combine_attrs="override")
    return ds.sortby("sample")


# --- saving ---------------------------------------------------------------------------------------------
def round_mantissa(values: np.ndarray, keep_bits: int) -> np.ndarray:
    """float32 values rounded (to nearest, ties to even) to ``keep_bits`` mantissa bits; NaN/inf unchanged.

    Lossy, for compact files: the relative error is at most 2**-(keep_bits+1), and zlib compresses the
    zeroed bits away."""
    if not 0 < keep_bits < 23:
        raise RecordingError(f"keep_bits must be in 1..22, got {keep_bits}")
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    drop = 23 - keep_bits
    half = np.uint32((1 << (drop - 1)) - 1)
    rounded = (bits + half + ((bits >> np.uint32(drop)) & np.uint32(1))) & np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
    finite = np.isfinite(values)
    return np.where(finite, rounded.view(np.float32), values).astype(np.float32)


# Compact files: cosines keep 14 mantissa bits (absolute error < 3.1e-5 for values in [0.5, 1)), relative changes
# 9 bits (relative error < 1e-3); about 40% of the size of exact float32 after compression.
COMPACT_BITS = {"token_cosine": 14, "cfg_residual_cosine": 14, "cfg_residual_change": 9, "cfg_cond_change": 9,
                "cfg_uncond_change": 9, "head_change": 9}


def parse_keep_bits(value: Optional[str | int | dict]) -> Optional[dict[str, int]]:
    """None (exact), an int for every statistic, "compact" (:data:`COMPACT_BITS`) or a {variable: bits} map."""
    if value is None or value == "exact":
        return None
    if value == "compact":
        return dict(COMPACT_BITS)
    if isinstance(value, dict):
        unknown = set(value) - set(COMPACT_BITS)
        if unknown:
            raise RecordingError(f"keep_bits names unknown statistics: {', '.join(sorted(unknown))}")
        return {k: int(v) for k, v in value.items()}
    try:
        bits = int(value)
    except (TypeError, ValueError):
        raise RecordingError(f"keep_bits must be an integer, 'compact' or 'exact', got {value!r}") from None
    return {name: bits for name in COMPACT_BITS}


def save_stats(ds: xr.Dataset, path: str | Path, keep_bits: Optional[str | int | dict] = None) -> Path:
    """Write ``ds`` to ``path`` atomically (a temporary file in the same folder, then os.replace), compressed.

    ``keep_bits`` rounds float statistics to that many mantissa bits (see :func:`parse_keep_bits`; lossy, for
    smaller files; None keeps float32 exactly). The attribute ``keep_bits`` records what was applied."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bits = parse_keep_bits(keep_bits)
    if bits is not None:
        ds = ds.copy()
        for name, b in bits.items():
            if name in ds:
                ds[name] = ds[name].copy(data=round_mantissa(ds[name].values, b))
        ds.attrs["keep_bits"] = json.dumps(bits, sort_keys=True)
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


# --- loading and validating -----------------------------------------------------------------------------
def validate(ds: xr.Dataset, source: str = "dataset") -> xr.Dataset:
    """Check that ``ds`` has the recording layout; raise RecordingError naming the first problem."""
    if ds.attrs.get("format") != FORMAT:
        raise RecordingError(f"{source} is not a lazymar redundancy recording (attribute 'format' is "
                             f"{ds.attrs.get('format', 'missing')!r}, expected {FORMAT!r})")
    if int(ds.attrs.get("format_version", -1)) > FORMAT_VERSION:
        raise RecordingError(f"{source} has format version {ds.attrs['format_version']}, newer than this "
                             f"lazymar reads ({FORMAT_VERSION})")
    missing = [a for a in REQUIRED_ATTRS if a not in ds.attrs]
    if missing:
        raise RecordingError(f"{source} lacks attribute(s): {', '.join(missing)}")
    for name, dims in {**VARIABLES, **COORDS}.items():
        if name not in ds.variables:
            raise RecordingError(f"{source} lacks variable {name!r} {dims}")
        if ds[name].dims != dims:
            raise RecordingError(f"{source}: variable {name!r} has dims {ds[name].dims}, expected {dims}")
    if ds.sizes["step"] != int(ds.attrs["num_iter"]):
        raise RecordingError(f"{source} has {ds.sizes['step']} steps but num_iter = {ds.attrs['num_iter']}")
    if ds.sizes["position"] != int(ds.attrs["buffer_size"]) + int(ds.attrs["seq_len"]):
        raise RecordingError(f"{source} has {ds.sizes['position']} positions, not buffer_size + seq_len")
    status = ds["status"].values
    if status.size and (status.min() < 0 or status.max() >= len(STATUS_NAMES)):
        raise RecordingError(f"{source}: status codes outside 0..{len(STATUS_NAMES) - 1}")
    if len(np.unique(ds["sample"].values)) != ds.sizes["sample"]:
        raise RecordingError(f"{source} has repeated sample indices")
    return ds


def load_stats(path: str | Path, lazy: bool = False) -> xr.Dataset:
    """Load and validate a recording. By default it is read into memory and the file closed; ``lazy=True``
    leaves the statistics on disk until used (for recordings larger than memory; close the dataset after)."""
    path = Path(path)
    if not path.is_file():
        raise RecordingError(f"recording not found: {path}")
    try:
        opened = xr.open_dataset(path, engine=ENGINE)
    except Exception as err:  # the netCDF/HDF5 libraries raise many types for a file that is not NetCDF4
        raise RecordingError(f"{path} is not a NetCDF4 file ({type(err).__name__}: {err})") from None
    if lazy:
        try:
            return validate(opened, str(path))
        except RecordingError:
            opened.close()
            raise
    with opened:
        ds = opened.load()
    return validate(ds, str(path))


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


class StatsWriter:
    """Appends recorded batches to a file, rewriting it atomically after each, so an interrupted run keeps
    the completed batches. ``resume=True`` starts from the batches already in the file."""

    def __init__(self, path: str | Path, keep_bits: Optional[str | int | dict] = None, resume: bool = False):
        self.path = Path(path)
        self.keep_bits = keep_bits
        self.batches: list[xr.Dataset] = [load_stats(self.path)] if resume and self.path.exists() else []

    @property
    def done_batches(self) -> set[int]:
        return {int(b) for ds in self.batches for b in np.unique(ds["batch"].values)}

    @property
    def num_samples(self) -> int:
        return sum(ds.sizes["sample"] for ds in self.batches)

    def append(self, batches: Sequence[xr.Dataset]) -> None:
        if not batches:
            return
        self.batches.extend(batches)
        self.batches = [concat_batches(self.batches)]
        save_stats(self.batches[0], self.path, self.keep_bits)

    def dataset(self) -> xr.Dataset:
        if not self.batches:
            raise RecordingError(f"nothing written to {self.path}")
        return self.batches[0]
