"""Token redundancy where it happens: per grid position (a map over the token grid) and per class, each with a
95 % bootstrap interval over samples. Reduced chunk by chunk (only per-sample sums over steps leave dask), so a
recording larger than memory works. Change is 1 - cosine of a position's feature with its previous step's."""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.figure import Figure

from lazymar.stats import ratio_intervals

from .chunked import compute_small
from .figures import subplots
from .phenomena import AnalysisError, statistic_values

CHANGE_LABEL = r"mean change $1-\cos(h_s, h_{s-1})$"


def _per_sample_change(ds: xr.Dataset, layer: str, kind: str, statuses: Optional[Iterable[str]]) -> xr.Dataset:
    """Per (sample, position): the sum of 1 - cosine over steps and the number of finite values."""
    layers = [str(x) for x in ds["layer"].values]
    if layer not in layers:
        raise AnalysisError(f"unknown layer {layer!r}; the recording has {', '.join(layers)}")
    change = 1.0 - statistic_values(ds, "token_cosine", kind, statuses).sel(layer=layer)
    return compute_small(xr.Dataset({"sum": change.sum("step", skipna=True), "count": change.count("step")}))


def change_by_position(ds: xr.Dataset, layer: str, kind: str = "output",
                       statuses: Optional[Iterable[str]] = ("known", "to_predict", "masked"),
                       resamples: int = 1000, seed: int = 0) -> xr.Dataset:
    """The mean change of each image token position as a (grid_row, grid_col) map: ``mean``, ``ci_low``,
    ``ci_high`` (95 %, samples resampled) and ``count`` (values behind each mean); ``n_samples`` in attrs.
    The buffer's class positions have no place on the grid and are left out."""
    sums = _per_sample_change(ds, layer, kind, statuses)
    on_grid = ds["grid_row"].values >= 0
    rows, cols = ds["grid_row"].values[on_grid], ds["grid_col"].values[on_grid]
    total = sums["sum"].transpose("position", "sample").values[on_grid]
    count = sums["count"].transpose("position", "sample").values[on_grid]
    low, high = ratio_intervals(total, count, resamples, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total.sum(1) / count.sum(1)
    shape = (int(rows.max()) + 1, int(cols.max()) + 1)
    out = {}
    for name, values in (("mean", mean), ("ci_low", low), ("ci_high", high), ("count", count.sum(1))):
        grid = np.full(shape, np.nan)
        grid[rows, cols] = values
        out[name] = (("grid_row", "grid_col"), grid)
    return xr.Dataset(out, attrs={"layer": layer, "kind": kind, "n_samples": int(ds.sizes["sample"])})


def change_by_class(ds: xr.Dataset, layer: str, kind: str = "output",
                    statuses: Optional[Iterable[str]] = ("known", "to_predict", "masked"),
                    resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per class label: the mean change over its samples' steps and positions, its 95 % interval (the class's
    samples resampled) and ``n_samples``. A class with one sample has no interval (NaN)."""
    sums = _per_sample_change(ds, layer, kind, statuses)
    total = sums["sum"].sum("position").values
    count = sums["count"].sum("position").values
    labels = np.asarray(ds["label"].values)
    rows = []
    for label in np.unique(labels):
        mine = labels == label
        low, high = ratio_intervals(total[mine], count[mine], resamples, seed) if mine.sum() > 1 else (np.nan,) * 2
        rows.append({"label": int(label), "mean": total[mine].sum() / count[mine].sum(), "ci_low": float(low),
                     "ci_high": float(high), "n_samples": int(mine.sum())})
    return pd.DataFrame(rows).set_index("label")


def plot_change_by_position(found: xr.Dataset) -> Figure:
    """The map of mean change and the width of its interval, side by side, on one grid."""
    fig, (left, right) = subplots(1, 2, figsize=(8.4, 3.6))
    for ax, values, title, cmap in ((left, found["mean"], "mean change", "viridis"),
                                    (right, found["ci_high"] - found["ci_low"], "width of the 95 % interval",
                                     "magma")):
        shown = ax.imshow(values.values, cmap=cmap, interpolation="nearest")
        fig.colorbar(shown, ax=ax, shrink=0.85, label=CHANGE_LABEL if ax is left else "interval width")
        ax.set_xlabel("token grid column")
        ax.set_ylabel("token grid row")
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"{found.attrs['layer']} ({found.attrs['kind']}): change per position, "
                 f"n = {found.attrs['n_samples']} samples", fontsize=10)
    return fig


def plot_change_by_class(found: pd.DataFrame, layer: str) -> Figure:
    """The mean change per class with its 95 % interval and the class's sample count."""
    fig, ax = subplots(figsize=(6.0, 3.2))
    err = np.vstack([found["mean"] - found["ci_low"], found["ci_high"] - found["mean"]])
    ax.errorbar(found.index, found["mean"], yerr=np.nan_to_num(err), fmt="o", capsize=3)
    for label, row in found.iterrows():
        ax.annotate(f"n={int(row['n_samples'])}", (label, row["mean"]), textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize=7)
    ax.set_xticks(list(found.index))
    ax.set_xlabel("class label")
    ax.set_ylabel(CHANGE_LABEL)
    ax.set_title(f"{layer}: change per class (95 % intervals over samples)", fontsize=9)
    return fig
