"""The layout of a redundancy recording (an xarray Dataset): building and validating it, and the lossy rounding of
its statistics (keep bits) that compact files use.

Dimensions: sample, step, layer ("encoder.i", "decoder.i", "z"), kind (output, k, v), position (buffer first,
then the tokens in raster order), head_step (the head's sampling steps in execution order), head_part ("eps_cfg",
"res_block.i"), token and channel (the generated tokens). Statistics are float32 with NaN where a position or
layer was not computed at the step or at the step before. On disk a recording is a Zarr store written batch by
batch (:mod:`lazymar.recording.store`) or a NetCDF4 file (:mod:`lazymar.recording.netcdf`); :mod:`lazymar.recording.files`
saves, loads and merges either by its path.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import xarray as xr

from ..version import __version__
from ..errors import LazymarError

FORMAT = "lazymar.redundancy"
FORMAT_VERSION = 1

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
# recorded since issue 21; recordings made before lack them (they load, without them)
OPTIONAL_VARIABLES: dict[str, tuple[str, ...]] = {"token_norm": ("sample", "step", "layer", "position")}
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
    "token_norm": "||h_s|| of a position's block output at step s (cond branch): with token_cosine and the norm at "
                  "s-1 it gives the absolute change, ||h_s - h_{s-1}||^2 = ||h_s||^2 + ||h_{s-1}||^2 - "
                  "2 ||h_s|| ||h_{s-1}|| cos",
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
    for name, dims in OPTIONAL_VARIABLES.items():
        if name in variables:
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
                "cfg_uncond_change": 9, "head_change": 9, "token_norm": 14}


class KeepBits:
    """A --keep-bits value parsed once: its ``text`` and the mantissa ``bits`` kept per statistic (None: exact).
    RecordingError on a bad value."""

    def __init__(self, value: "str | int | dict | KeepBits | None") -> None:
        self.text = str(value if value is not None else "exact")
        self.bits = parse_keep_bits(value)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"KeepBits({self.text!r})"


def parse_keep_bits(value: "Optional[str | int | dict | KeepBits]") -> Optional[dict[str, int]]:
    """None (exact), an int for every statistic, "compact" (:data:`COMPACT_BITS`) or a {variable: bits} map;
    a :class:`KeepBits` gives its bits, parsed already. Every count lies in 1..22 (float32 has 23 mantissa bits)."""
    if isinstance(value, KeepBits):
        return value.bits
    bits = _keep_bits(value)
    if bits and not all(0 < b < 23 for b in bits.values()):
        raise RecordingError(f"keep_bits: mantissa bits must lie in 1..22, got {value}")
    return bits


def _keep_bits(value: Optional[str | int | dict]) -> Optional[dict[str, int]]:
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


def apply_keep_bits(ds: xr.Dataset, bits: Optional[dict[str, int]]) -> xr.Dataset:
    """``ds`` with its float statistics rounded to ``bits`` mantissa bits (chunk by chunk for dask arrays) and
    the attribute ``keep_bits`` set; ``ds`` itself when ``bits`` is None."""
    if bits is None:
        return ds
    ds = ds.copy()
    for name, b in bits.items():
        if name in ds:
            data = ds[name].data
            rounded = (data.map_blocks(round_mantissa, b, dtype=np.float32) if hasattr(data, "map_blocks")
                       else round_mantissa(data, b))
            ds[name] = ds[name].copy(data=rounded)
    ds.attrs["keep_bits"] = json.dumps(bits, sort_keys=True)
    return ds


# --- validating ------------------------------------------------------------------------------------------
def validate(ds: xr.Dataset, source: str = "dataset") -> xr.Dataset:
    """Check that ``ds`` has the recording layout; raise RecordingError naming the first problem.
    Works on lazy datasets: only the status codes are read (their min and max, chunk by chunk)."""
    if ds.attrs.get("format") != FORMAT:
        raise RecordingError(f"{source} is not a lazymar redundancy recording (attribute 'format' is "
                             f"{ds.attrs.get('format', 'missing')!r}, expected {FORMAT!r})")
    missing = [a for a in REQUIRED_ATTRS if a not in ds.attrs]
    if missing:
        raise RecordingError(f"{source} lacks attribute(s): {', '.join(missing)}")
    ints = {key: _int_attr(ds, key, source) for key in ("format_version", "num_iter", "buffer_size", "seq_len")}
    if ints["format_version"] > FORMAT_VERSION:
        raise RecordingError(f"{source} has format version {ints['format_version']}, newer than this "
                             f"lazymar reads ({FORMAT_VERSION})")
    for key in ("cfg", "temperature"):
        try:
            float(ds.attrs[key])
        except (TypeError, ValueError):
            raise RecordingError(f"{source}: attribute {key!r} is not a number: {ds.attrs[key]!r}") from None
    try:
        if not isinstance(json.loads(ds.attrs["config"]), dict):
            raise ValueError("not an object")
    except (TypeError, ValueError) as err:
        raise RecordingError(f"{source}: attribute 'config' is not a JSON model configuration ({err})") from None
    optional = {name: dims for name, dims in OPTIONAL_VARIABLES.items() if name in ds.variables}
    for name, dims in {**VARIABLES, **optional, **COORDS}.items():
        if name not in ds.variables:
            raise RecordingError(f"{source} lacks variable {name!r} {dims}")
        if ds[name].dims != dims:
            raise RecordingError(f"{source}: variable {name!r} has dims {ds[name].dims}, expected {dims}")
        kind = ds[name].dtype.kind
        expected = "f" if (name in VARIABLES or name in optional) and name != "status" else _COORD_KINDS.get(name, "iu")
        if name == "status":
            expected = "iu"
        if kind not in expected:
            raise RecordingError(f"{source}: variable {name!r} has dtype {ds[name].dtype}, expected "
                                 f"{'float' if expected == 'f' else 'integer' if expected == 'iu' else 'text'}")
    if ds.sizes["step"] != ints["num_iter"]:
        raise RecordingError(f"{source} has {ds.sizes['step']} steps but num_iter = {ints['num_iter']}")
    if ds.sizes["position"] != ints["buffer_size"] + ints["seq_len"]:
        raise RecordingError(f"{source} has {ds.sizes['position']} positions, not buffer_size + seq_len")
    status = ds["status"]
    if status.size and (int(status.min()) < 0 or int(status.max()) >= len(STATUS_NAMES)):
        raise RecordingError(f"{source}: status codes outside 0..{len(STATUS_NAMES) - 1}")
    if len(np.unique(ds["sample"].values)) != ds.sizes["sample"]:
        raise RecordingError(f"{source} has repeated sample indices")
    return ds


def as_recording_error(err: Exception, path) -> RecordingError:
    """``err`` (raised while reading ``path``) as the RecordingError naming the file."""
    return err if isinstance(err, RecordingError) else RecordingError(f"{path}: {type(err).__name__}: {err}")


# dtype kinds of the coordinates (numpy kind letters); others are integers
_COORD_KINDS = {"mask_ratio": "f", "cfg_scale": "f", "layer": "OUST", "kind": "OUST", "head_part": "OUST"}


def _int_attr(ds: xr.Dataset, key: str, source: str) -> int:
    value = ds.attrs[key] if key in ds.attrs else -1
    try:
        number = int(value)
        if number != float(value):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise RecordingError(f"{source}: attribute {key!r} is not an integer: {value!r}") from None
    return number


@contextlib.contextmanager
def reading(path: str | Path) -> Iterator[None]:
    """Turn whatever reading a damaged recording raises (zarr, numcodecs, dask and json raise many types for bad
    metadata, truncated or garbled chunks, missing arrays) into one RecordingError naming ``path``. Wrap the
    reads of a lazy recording's chunks too: a damaged chunk surfaces only when it is read."""
    try:
        yield
    except LazymarError:
        raise
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 (the libraries' error types for damaged files are not enumerable)
        first = " ".join(str(err).split())[:300]
        raise RecordingError(f"{path} is damaged or not a lazymar recording ({type(err).__name__}: {first})") \
            from None
