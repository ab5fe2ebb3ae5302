"""Tables from a recording: tidy long-format DataFrames (for seaborn) and per-(step, layer, status) summaries."""
from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from .dataset import STATUS_NAMES, RecordingError, VARIABLES

POSITION_STATS = [name for name, dims in VARIABLES.items() if dims[:2] == ("sample", "step") and "position" in dims
                  and name != "status"]


def _select(ds: xr.Dataset, variable: str, **selection: Any) -> xr.DataArray:
    if variable not in POSITION_STATS:
        raise RecordingError(f"unknown per-position statistic {variable!r}; known: {', '.join(POSITION_STATS)}")
    da = ds[variable]
    for dim, value in selection.items():
        if value is None:
            continue
        if dim not in da.dims:
            raise RecordingError(f"{variable} has no dimension {dim!r}")
        da = da.sel({dim: value})
    return da


def tidy(ds: xr.Dataset, variable: str = "token_cosine", dropna: bool = True, **selection: Any) -> pd.DataFrame:
    """One row per recorded value: sample, label, step, mask_ratio, cfg_scale, layer[, kind], position, status
    (category), grid_row, grid_col and the value (column named ``variable``). ``selection`` narrows dims first,
    e.g. ``tidy(ds, kind="v", layer=["decoder.3"])``; missing (NaN) values are dropped unless ``dropna=False``."""
    da = _select(ds, variable, **selection)
    status = ds["status"].sel({d: da[d] for d in ds["status"].dims if d in da.coords})
    frame = xr.Dataset({variable: da, "status": status})
    df = frame.to_dataframe().reset_index()
    if dropna:
        df = df.dropna(subset=[variable])
    df["status"] = pd.Categorical.from_codes(df["status"].astype(int), categories=list(STATUS_NAMES))
    return df.reset_index(drop=True)


def tidy_head(ds: xr.Dataset, dropna: bool = True) -> pd.DataFrame:
    """The head statistics in long format: sample, label, step, head_step, head_timestep, head_part, head_change."""
    df = ds["head_change"].to_dataframe().reset_index()
    return (df.dropna(subset=["head_change"]) if dropna else df).reset_index(drop=True)


def summarize(ds: xr.Dataset, variable: str = "token_cosine", kind: Optional[str] = "output",
              quantiles: Sequence[float] = (0.1, 0.5, 0.9), thresholds: Sequence[float] = (0.9, 0.95, 0.99),
              layers: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Per (step, layer, status): count, mean, quantiles and the fraction of values above each threshold,
    over samples and positions (NaN excluded). Rows with no values are dropped.

    Columns: count, mean, q<q> for each quantile, above_<t> for each threshold."""
    selection = {"kind": kind if variable == "token_cosine" else None, "layer": list(layers) if layers else None}
    da = _select(ds, variable, **selection)
    over = ("sample", "position")
    frames = []
    for code, name in enumerate(STATUS_NAMES):
        values = da.where(ds["status"] == code)
        count = values.count(over)
        columns = {"count": count, "mean": values.mean(over)}
        if quantiles:
            with warnings.catch_warnings():  # (step, layer) cells without this status are all-NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                q = values.quantile(list(quantiles), dim=over, skipna=True)
            for value in quantiles:
                columns[f"q{value:g}"] = q.sel(quantile=value, drop=True)
        for t in thresholds:
            columns[f"above_{t:g}"] = (values > t).sum(over) / count.where(count > 0)
        table = xr.Dataset(columns).to_dataframe()
        table = table[[c for c in columns]]
        table["status"] = name
        frames.append(table.reset_index())
    df = pd.concat(frames, ignore_index=True)
    df = df[df["count"] > 0]
    df["status"] = pd.Categorical(df["status"], categories=list(STATUS_NAMES))
    keep = ["step", "layer", "status", *columns.keys()]
    return df[keep].sort_values(["step", "layer", "status"]).set_index(["step", "layer", "status"])


def overview(ds: xr.Dataset, thresholds: Sequence[float] = (0.95, 0.99), median_samples: int = 64) -> dict[str, Any]:
    """A JSON-friendly digest: sizes, per-layer mean token cosine (output and V) and fraction above thresholds,
    per-layer median CFG residual change and branch changes (over the first ``median_samples`` samples, so
    that the digest of a large store stays cheap), and the mean head changes. Means and fractions are
    reductions chunk by chunk (dask arrays stay lazy until the small per-layer results are computed)."""
    import dask
    layers = [str(x) for x in ds["layer"].values]
    out: dict[str, Any] = {"samples": int(ds.sizes["sample"]), "steps": int(ds.sizes["step"]),
                           "layers": layers, "attrs": {k: _plain(v) for k, v in ds.attrs.items() if k != "config"}}
    over = ("sample", "step", "position")
    lazy = {}
    for kind in ("output", "v"):
        values = ds["token_cosine"].sel(kind=kind)
        lazy[f"{kind}_count"] = values.count(over)
        lazy[f"{kind}_cosine_mean"] = values.mean(over, skipna=True)
        for t in thresholds:
            lazy[f"{kind}_cosine_above_{t:g}"] = (values > t).sum(over)
    first = ds.isel(sample=slice(0, median_samples))
    with warnings.catch_warnings():  # all-NaN layers (no CFG) and parts give NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        for name in ("cfg_residual_change", "cfg_cond_change", "cfg_uncond_change"):
            lazy[f"{name}_median"] = first[name].load().median(over, skipna=True)
        lazy["head"] = ds["head_change"].mean(("sample", "step", "head_step"), skipna=True)
        (computed,) = dask.compute(lazy)
    per_layer = {}
    for i, layer in enumerate(layers):
        row: dict[str, Any] = {}
        for kind in ("output", "v"):
            count = int(computed[f"{kind}_count"].values[i])
            if count:
                row[f"{kind}_cosine_mean"] = float(computed[f"{kind}_cosine_mean"].values[i])
                for t in thresholds:
                    row[f"{kind}_cosine_above_{t:g}"] = float(computed[f"{kind}_cosine_above_{t:g}"].values[i]) / count
        for name in ("cfg_residual_change", "cfg_cond_change", "cfg_uncond_change"):
            value = float(computed[f"{name}_median"].values[i])
            if np.isfinite(value):
                row[f"{name}_median"] = value
        per_layer[layer] = row
    out["per_layer"] = per_layer
    out["head_change_mean"] = {str(p): _plain(v) for p, v in zip(ds["head_part"].values, computed["head"].values)}
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
