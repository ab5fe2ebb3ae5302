"""The redundancy phenomena as numbers: tables computed from a recording (lazymar.recording layout). A live
capture of per-step features, for what a recording does not keep, is in :mod:`analysis.live_features`.

Conventions: NaN marks a value that was not computed (a position absent at s or s-1) and is excluded from every
count; "fraction above t" is (#values > t) / (#finite values); statuses are the recording's (buffer, known, new,
to_predict, masked).

Recordings larger than memory: ``load_stats`` opens a Zarr store lazily (dask), and the tables here reduce it
chunk by chunk (xarray reductions on dask arrays, histograms per chunk; only the small results are computed),
except the median of :func:`step_layer_matrix`, :func:`branch_vs_residual`, :func:`head_change_profile` and
:func:`values_by_status` (medians need every value), which hold the values of one variable of one layer (or head part) in
memory at a time: at MAR-H shapes (1,000 samples x 64 steps x 320 positions, float32) about 82 MB, well under the
4 GB analysis target. :func:`ecdf_by_status`, :func:`histograms_by_status` and :func:`mean_by_status` are the
chunk-wise alternatives to looking at every value.
"""
from __future__ import annotations

import warnings
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from lazymar.recording import STATUS_CODES, STATUS_NAMES
from lazymar.errors import LazymarError

from .chunked import compute_all, compute_small, histograms_by_code, per_layer

COSINE_VARIABLES = ("token_cosine", "cfg_residual_cosine")
CHANGE_VARIABLES = ("cfg_residual_change", "cfg_cond_change", "cfg_uncond_change")
STATISTICS = ("mean", "median", "above", "log10_change")


class AnalysisError(LazymarError):
    """A request the recording or the inputs cannot answer; the message names the problem."""


def resolution(ds: xr.Dataset, variable: str = "token_cosine") -> float:
    """The smallest nonzero 1 - cosine the recording can hold: a compact recording (attribute keep_bits) rounded
    cosines to b mantissa bits, so values just below 1 are spaced 2**-(b+1); exact float32: 2**-24."""
    import json
    bits = None
    try:
        bits = int(json.loads(ds.attrs.get("keep_bits", "{}")).get(variable))
    except (TypeError, ValueError, AttributeError):
        bits = None
    return 2.0 ** -(bits + 1) if bits else 2.0 ** -24


def sampling_settings(attrs: dict):
    """The SamplingSettings a recording was made with (from its attributes), to rerun that setting live."""
    from lazymar.sampling import SamplingSettings
    try:
        return SamplingSettings(num_iter=int(attrs["num_iter"]), cfg=float(attrs["cfg"]),
                                cfg_schedule=str(attrs.get("cfg_schedule", "linear")),
                                temperature=float(attrs.get("temperature", 1.0)))
    except KeyError as err:
        raise AnalysisError(f"the recording's attributes lack {err.args[0]!r}") from None


# --- selecting values -------------------------------------------------------------------------------------
def layer_group(layer: str) -> str:
    """"encoder", "decoder" or "z" for a recorded layer name ("encoder.3", "decoder.0", "z")."""
    group = str(layer).split(".")[0]
    if group not in ("encoder", "decoder", "z"):
        raise AnalysisError(f"unknown layer {layer!r}: expected encoder.i, decoder.i or z")
    return group


def _names(given: Optional[str | Iterable[str]], known: Sequence[str], what: str) -> Optional[list[str]]:
    """``given`` (one name or several) as a list, each checked against ``known``; None stays None."""
    if given is None:
        return None
    names = [given] if isinstance(given, str) else list(given)
    unknown = [x for x in names if x not in known]
    if unknown:
        raise AnalysisError(f"unknown {what} {unknown[0]!r}, not in the recording; it has {', '.join(known)}")
    return names


def _check_layers(ds: xr.Dataset, layers: Optional[Sequence[str]]) -> list[str]:
    known = [str(x) for x in ds["layer"].values]
    return known if layers is None else _names(layers, known, "layer")


def _status_codes(statuses: Optional[Iterable[str]]) -> Optional[list[int]]:
    names = _names(statuses, list(STATUS_NAMES), "status")
    return None if names is None else [STATUS_CODES[s] for s in names]


def statistic_values(ds: xr.Dataset, variable: str = "token_cosine", kind: str = "output",
                     statuses: Optional[Iterable[str]] = None) -> xr.DataArray:
    """The per-position statistic (sample, step, layer, position), NaN outside ``statuses`` (None: all)."""
    if variable not in ds:
        raise AnalysisError(f"the recording has no variable {variable!r}")
    da = ds[variable]
    if "kind" in da.dims:
        kinds = [str(k) for k in ds["kind"].values]
        if kind not in kinds:
            raise AnalysisError(f"unknown feature kind {kind!r}; the recording has {', '.join(kinds)}")
        da = da.sel(kind=kind, drop=True)
    codes = _status_codes(statuses)
    if codes is not None:
        da = da.where(ds["status"].isin(codes))
    return da


def values_by_status(ds: xr.Dataset, layer: str, variable: str = "token_cosine", kind: str = "output",
                     steps: Optional[Sequence[int]] = None) -> dict[str, np.ndarray]:
    """The finite values of one layer, flattened, per status (statuses without values are left out)."""
    _check_layers(ds, [layer])
    da = statistic_values(ds, variable, kind).sel(layer=layer)
    status = ds["status"]
    if steps is not None:
        da, status = da.sel(step=list(steps)), status.sel(step=list(steps))
    values, codes = da.values, status.values
    out = {}
    for name, code in STATUS_CODES.items():
        v = values[(codes == code) & np.isfinite(values)]
        if v.size:
            out[name] = v
    return out


# --- token redundancy -------------------------------------------------------------------------------------
def fraction_above(ds: xr.Dataset, thresholds: Sequence[float] = (0.95, 0.99), layers: Optional[Sequence[str]] = None,
                   variable: str = "token_cosine", kind: str = "output",
                   statuses: Optional[Iterable[str]] = None, intervals: bool = False,
                   resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per (layer, step): the number of finite values (``count``) and the fraction above each threshold
    (``above_<t>``), over samples and positions. Steps where a layer has no value are dropped.

    ``intervals``: also ``above_<t>_ci_low`` / ``_ci_high``, 95 % bootstrap intervals over samples (the samples
    resampled, their positions kept together: lazymar.stats.ratio_intervals), and ``n_samples``. The per-sample
    counts are reduced chunk by chunk (only positions are summed), so the recording stays out of core."""
    layers = _check_layers(ds, layers)
    da = statistic_values(ds, variable, kind, statuses).sel(layer=layers)
    over = ("position",) if intervals else ("sample", "position")
    columns = {"count": da.count(over)}
    for t in thresholds:
        columns[f"above_{t:g}"] = (da > t).sum(over)
    table = compute_small(xr.Dataset(columns))
    if intervals:
        per_sample = table.transpose("layer", "step", "sample")
        table = per_sample.sum("sample")
    table = table.transpose("layer", "step")
    count = table["count"].values
    df = pd.DataFrame({"count": count.ravel().astype(int)},
                      index=pd.MultiIndex.from_product([layers, table["step"].values], names=["layer", "step"]))
    with np.errstate(invalid="ignore", divide="ignore"):
        for t in thresholds:
            df[f"above_{t:g}"] = (table[f"above_{t:g}"].values / count).ravel()
    if intervals:
        from lazymar.stats import ratio_intervals
        for t in thresholds:
            low, high = ratio_intervals(per_sample[f"above_{t:g}"].values, per_sample["count"].values,
                                        resamples, seed)
            df[f"above_{t:g}_ci_low"], df[f"above_{t:g}_ci_high"] = low.ravel(), high.ravel()
        df["n_samples"] = int(ds.sizes["sample"])
    return df[df["count"] > 0]


def _edges(ds: xr.Dataset, variable: str, edges: Optional[Sequence[float]]) -> np.ndarray:
    if edges is None:
        edges = np.geomspace(resolution(ds, variable) / 2, 2.0, 200)
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise AnalysisError("edges must be at least two increasing numbers")
    return edges


def histograms_by_status(ds: xr.Dataset, layers: Sequence[str], variable: str = "token_cosine", kind: str = "output",
                         edges: Optional[Sequence[float]] = None) -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]]]:
    """Histograms of 1 - value per layer and status, computed chunk by chunk in one pass over the variable:
    (edges, {layer: {status: counts}}), statuses without values left out; distances outside the edges count in
    the first or last bin. Default edges: 200 log-spaced from half the recording's resolution to 2."""
    layers = _check_layers(ds, layers)
    edges = _edges(ds, variable, edges)
    distance = (1.0 - statistic_values(ds, variable, kind).sel(layer=layers)).clip(edges[0], edges[-1])
    counts = compute_all([histograms_by_code(distance, ds["status"], list(STATUS_CODES.values()), edges, "layer")])[0]
    return edges, {layer: {name: counts[i, j] for j, name in enumerate(STATUS_CODES) if counts[i, j].sum()}
                   for i, layer in enumerate(layers)}


def ecdfs_by_status(ds: xr.Dataset, layers: Sequence[str], variable: str = "token_cosine", kind: str = "output",
                    edges: Optional[Sequence[float]] = None) -> dict[str, pd.DataFrame]:
    """:func:`ecdf_by_status` of several layers in one pass over the recording: {layer: table}."""
    edges, counts = histograms_by_status(ds, layers, variable, kind, edges)
    tables = {}
    for layer, by_status in counts.items():
        df = pd.DataFrame({name: np.cumsum(hist) / hist.sum() for name, hist in by_status.items()},
                          index=pd.Index(edges[1:], name="distance"))
        df.attrs["count"] = {name: int(hist.sum()) for name, hist in by_status.items()}
        tables[layer] = df
    return tables


def ecdf_by_status(ds: xr.Dataset, layer: str, variable: str = "token_cosine", kind: str = "output",
                   edges: Optional[Sequence[float]] = None) -> pd.DataFrame:
    """The ECDF of 1 - value of one layer per status, from histograms computed chunk by chunk: rows are the
    bin edges (``distance``; distances below the first edge count at it), columns the statuses with values, each
    the fraction of that status's finite values with 1 - value <= distance. ``count`` per status is in
    ``df.attrs["count"]``. Default edges: 200 log-spaced from half the recording's resolution to 2."""
    return ecdfs_by_status(ds, [layer], variable, kind, edges)[layer]


def mean_by_status(ds: xr.Dataset, layer: str, variable: str = "token_cosine", kind: str = "output") -> pd.DataFrame:
    """Per status with values (rows): the number of finite values of one layer (``count``) and their ``mean``,
    over samples, steps and positions (chunk by chunk)."""
    _check_layers(ds, [layer])
    da = statistic_values(ds, variable, kind).sel(layer=layer)
    masked = {name: da.where(ds["status"] == code) for name, code in STATUS_CODES.items()}
    totals = compute_all([(v.count(), v.sum(skipna=True)) for v in masked.values()])
    rows = {name: {"count": int(count), "mean": float(total) / int(count)}
            for name, (count, total) in zip(masked, totals) if int(count)}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("status")


def step_layer_matrix(ds: xr.Dataset, statistic: str = "mean", variable: str = "token_cosine", kind: str = "output",
                      threshold: Optional[float] = None, statuses: Optional[Iterable[str]] = None,
                      layers: Optional[Sequence[str]] = None, floor: Optional[float] = None) -> xr.DataArray:
    """(layer, step) matrix of a statistic over samples and positions: "mean", "median", "above" (the
    fraction of values above ``threshold``) or "log10_change" (the mean of log10(max(1 - value, floor)), a
    geometric mean of the change; floor defaults to half the recording's :func:`resolution`). NaN where a
    layer has no value at a step."""
    if statistic not in STATISTICS:
        raise AnalysisError(f"unknown statistic {statistic!r}; known: {', '.join(STATISTICS)}")
    if statistic == "above" and threshold is None:
        raise AnalysisError("statistic 'above' needs a threshold")
    layers = _check_layers(ds, layers)
    da = statistic_values(ds, variable, kind, statuses).sel(layer=layers)
    over = ("sample", "position")
    with warnings.catch_warnings():  # all-NaN cells are NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        if statistic == "mean":
            out = da.mean(over, skipna=True)
        elif statistic == "median":
            out = per_layer(da, lambda x: x.median(over, skipna=True))
        elif statistic == "log10_change":
            floor = floor if floor is not None else resolution(ds, variable) / 2
            out = np.log10(np.maximum(1.0 - da, floor)).mean(over, skipna=True)
        else:
            count = da.count(over)
            out = (da > threshold).where(da.notnull()).sum(over) / count.where(count > 0)
    out = compute_small(out).transpose("layer", "step")
    out.name = f"{variable}_{statistic}" + (f"_{threshold:g}" if statistic == "above" else "")
    out.attrs.update(variable=variable, statistic=statistic, kind=kind if variable == "token_cosine" else "")
    return out


def encoder_vs_decoder(ds: xr.Dataset, kind: str = "output",
                       statuses: Optional[Iterable[str]] = ("buffer", "known"), intervals: bool = False,
                       resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per step: the mean cosine of the encoder layers and of the decoder layers over the same positions
    (by default the buffer and the known tokens, which both see at s and s-1), and 1 - mean (the change).
    ``intervals``: also ``<group>_cosine_ci_low/high`` and ``<group>_change_ci_low/high``, 95 % bootstrap
    intervals over samples (per-sample sums reduced chunk by chunk), and ``n_samples``."""
    da = statistic_values(ds, "token_cosine", kind, statuses)
    layers = [str(x) for x in ds["layer"].values]
    rows, bands = {}, {}
    for group in ("encoder", "decoder"):
        members = [x for x in layers if layer_group(x) == group]
        if not members:
            raise AnalysisError(f"the recording has no {group} layers")
        part = da.sel(layer=members)
        if intervals:
            sums = compute_small(xr.Dataset({"sum": part.sum(("layer", "position"), skipna=True),
                                             "count": part.count(("layer", "position"))})).transpose("step", "sample")
            from lazymar.stats import ratio_intervals
            with np.errstate(invalid="ignore", divide="ignore"):
                rows[f"{group}_cosine"] = sums["sum"].values.sum(1) / sums["count"].values.sum(1)
            bands[group] = ratio_intervals(sums["sum"].values, sums["count"].values, resamples, seed)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            rows[f"{group}_cosine"] = compute_small(part.mean(("sample", "layer", "position"), skipna=True)).values
    df = pd.DataFrame(rows, index=pd.Index(ds["step"].values, name="step"))
    for group, (low, high) in bands.items():
        df[f"{group}_cosine_ci_low"], df[f"{group}_cosine_ci_high"] = low, high
    df = df.dropna(how="all", subset=[f"{g}_cosine" for g in ("encoder", "decoder")])
    for group in ("encoder", "decoder"):
        df[f"{group}_change"] = 1.0 - df[f"{group}_cosine"]
        if group in bands:
            df[f"{group}_change_ci_low"] = 1.0 - df[f"{group}_cosine_ci_high"]
            df[f"{group}_change_ci_high"] = 1.0 - df[f"{group}_cosine_ci_low"]
    if intervals:
        df["n_samples"] = int(ds.sizes["sample"])
    return df


def group_summary(ds: xr.Dataset, thresholds: Sequence[float] = (0.95, 0.99), kind: str = "output",
                  statuses: Optional[Iterable[str]] = None) -> pd.DataFrame:
    """Per layer group (encoder, decoder, z): mean cosine and fraction above each threshold over all finite
    values of its layers (every sample, step and position)."""
    da = statistic_values(ds, "token_cosine", kind, statuses)
    groups = {}
    for group in ("encoder", "decoder", "z"):
        members = [str(x) for x in ds["layer"].values if layer_group(str(x)) == group]
        if members:
            v = da.sel(layer=members)
            groups[group] = {"count": v.count(), "sum": v.sum(skipna=True),
                             **{f"above_{t:g}": (v > t).sum() for t in thresholds}}
    rows = []
    for group, totals in zip(groups, compute_all([groups[g] for g in groups])):
        count = int(totals["count"])
        if count:
            rows.append({"group": group, "count": count, "mean_cosine": float(totals["sum"]) / count,
                         **{f"above_{t:g}": int(totals[f"above_{t:g}"]) / count for t in thresholds}})
    return pd.DataFrame(rows).set_index("group")


# --- condition redundancy ---------------------------------------------------------------------------------
def _reduce(values: np.ndarray, statistic: str) -> float:
    v = values[np.isfinite(values)]
    if not v.size:
        return float("nan")
    if statistic == "mean":
        return float(v.mean())
    if statistic == "median":
        return float(np.median(v))
    raise AnalysisError(f"unknown statistic {statistic!r}; use 'mean' or 'median'")


def branch_vs_residual(ds: xr.Dataset, statistic: str = "median", by: str = "layer",
                       layers: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """The relative step-to-step change of each CFG branch against that of their residual r = cond - uncond.

    Per layer (``by="layer"``) or per (layer, step) (``by="step"``): ``statistic`` over the finite values of
    cfg_cond_change, cfg_uncond_change and cfg_residual_change, and the ratios cond/residual and uncond/residual
    (how many times more a branch changes than the residual). Ratios > 1 mean the residual is the stabler one."""
    if by not in ("layer", "step"):
        raise AnalysisError(f"by must be 'layer' or 'step', got {by!r}")
    layers = _check_layers(ds, layers)
    steps = [int(s) for s in ds["step"].values]
    rows = {}
    for layer in layers:
        for name in CHANGE_VARIABLES:  # one variable of one layer in memory at a time
            arr = ds[name].sel(layer=layer).transpose("step", "sample", "position").values
            cells = [((layer,), slice(None))] if by == "layer" else [((layer, s), j) for j, s in enumerate(steps)]
            for key, j in cells:
                rows.setdefault(key, {})[name.removeprefix("cfg_")] = _reduce(arr[j], statistic)
    names = ["layer"] if by == "layer" else ["layer", "step"]
    df = pd.DataFrame([{**dict(zip(names, key)), **row} for key, row in rows.items()])
    with np.errstate(divide="ignore", invalid="ignore"):
        df["cond_over_residual"] = df["cond_change"] / df["residual_change"]
        df["uncond_over_residual"] = df["uncond_change"] / df["residual_change"]
    df = df.set_index(["layer"] if by == "layer" else ["layer", "step"])
    return df.dropna(subset=["residual_change"])


def head_change_profile(ds: xr.Dataset, statistic: str = "mean") -> pd.DataFrame:
    """Per head step (rows, in execution order, t = T-1 first) and head part (columns): the relative change
    between consecutive head steps, ``statistic`` over samples and MAR steps."""
    if "head_change" not in ds:
        raise AnalysisError("the recording has no head statistics")
    parts = [str(p) for p in ds["head_part"].values]
    data = {}
    for part in parts:  # one head part in memory at a time
        arr = ds["head_change"].sel(head_part=part).transpose("head_step", "sample", "step").values
        data[part] = [_reduce(arr[h], statistic) for h in range(arr.shape[0])]
    df = pd.DataFrame(data, index=pd.Index(ds["head_step"].values, name="head_step"))
    df.columns.name = "head_part"
    return df.dropna(how="all")

