"""Figures of the redundancy phenomena (notebooks 01 and 02): every function takes a recording or the tables of
analysis.phenomena and returns a matplotlib Figure with labelled axes (save it with ``figures.save_figure``).

Cosines of adjacent steps sit very close to 1, so distributions are drawn as 1 - cosine on a log axis; values
at or below ``floor`` (exact repeats, or the rounding of a compact recording) are drawn at the floor.
"""
from __future__ import annotations

from typing import Optional, Sequence

import matplotlib
import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from lazymar.recording import STATUS_NAMES

from .phenomena import AnalysisError, ecdfs_by_status, histograms_by_status, resolution
from .figures import STEP_LABEL, subplots

STATUS_COLORS = {"buffer": "#7f7f7f", "known": "#1f77b4", "new": "#d62728", "to_predict": "#ff7f0e",
                 "masked": "#2ca02c"}
BRANCH_COLORS = {"cond_change": "#1f77b4", "uncond_change": "#ff7f0e", "residual_change": "#2ca02c"}
FLOOR = 1e-6


def _grid(n: int, ncols: int = 3, size: tuple[float, float] = (3.4, 2.6)) -> tuple[Figure, np.ndarray]:
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False,
                             constrained_layout=True)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()[:n]


# --- token redundancy -------------------------------------------------------------------------------------
def plot_cosine_ecdf(ds: xr.Dataset, layers: Optional[Sequence[str]] = None, kind: str = "output",
                     statuses: Optional[Sequence[str]] = None, floor: Optional[float] = None, ncols: int = 3,
                     bins: int = 200) -> Figure:
    """One panel per layer: the ECDF of 1 - cos(h_s, h_{s-1}) over all samples, steps and positions, one curve
    per position status, from ``bins`` log-spaced histogram bins computed chunk by chunk (one pass over a lazy
    recording, see phenomena.ecdfs_by_status). Values identical at the recording's precision are drawn at
    ``floor`` (default: half the recording's resolution)."""
    floor = floor if floor is not None else resolution(ds) / 2
    layers = list(layers) if layers is not None else [str(x) for x in ds["layer"].values]
    statuses = list(statuses) if statuses is not None else list(STATUS_NAMES)
    ecdfs = ecdfs_by_status(ds, layers, kind=kind, edges=np.geomspace(floor, 2.0, bins + 1))
    fig, axes = _grid(len(layers), ncols)
    for ax, layer in zip(axes, layers):
        ecdf = ecdfs[layer]
        if not any(status in ecdf for status in statuses):
            ax.text(0.5, 0.5, f"no {kind} values recorded", ha="center", va="center", transform=ax.transAxes)
        for status in statuses:
            if status in ecdf:
                ax.plot(ecdf.index, ecdf[status], color=STATUS_COLORS[status],
                        label=f"{status} (n={ecdf.attrs['count'][status]})")
        ax.set_xscale("log")
        ax.set_xlim(floor / 2, 2.0)
        ax.set_ylim(0, 1.01)
        ax.set_title(f"{layer} ({kind})", fontsize=9)
        ax.set_xlabel("1 − cosine to step s−1")
        ax.set_ylabel("fraction of positions")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"Adjacent-step token similarity by position status (1 − cos below the recording's resolution "
                 f"drawn at {floor:.1e})", fontsize=10)
    return fig


def _histogram_violin(log_edges: np.ndarray, counts: np.ndarray, smooth: float = 1.5) -> dict:
    """matplotlib violin statistics of a histogram over log10 edges: the counts smoothed by a Gaussian of
    ``smooth`` bins (a kernel density estimate of the binned values), cut to the nonempty bins."""
    filled = np.flatnonzero(counts)
    first, last = filled[0], filled[-1] + 1
    offsets = np.arange(-int(3 * smooth) - 1, int(3 * smooth) + 2)
    density = np.convolve(counts, np.exp(-0.5 * (offsets / smooth) ** 2), mode="same") if smooth else counts
    centres = (log_edges[:-1] + log_edges[1:]) / 2
    cdf = np.cumsum(counts) / counts.sum()
    return {"coords": centres[first:last], "vals": density[first:last].astype(float),
            "mean": float(np.sum(centres * counts) / counts.sum()),
            "median": float(centres[np.searchsorted(cdf, 0.5)]),
            "min": float(log_edges[first]), "max": float(log_edges[last])}


def plot_cosine_violin(ds: xr.Dataset, layers: Optional[Sequence[str]] = None, kind: str = "output",
                       statuses: Sequence[str] = ("known", "new", "to_predict", "masked"), bins: int = 100,
                       floor: Optional[float] = None, smooth: float = 1.5) -> Figure:
    """Violins of log10(1 - cosine) per layer, split by status, drawn from histograms of every value (``bins``
    log-spaced bins, computed chunk by chunk in one pass, so a recording larger than memory works; no subsample),
    smoothed over ``smooth`` bins; the white tick is the median. Floor as in :func:`plot_cosine_ecdf`."""
    floor = floor if floor is not None else resolution(ds) / 2
    layers = list(layers) if layers is not None else [str(x) for x in ds["layer"].values]
    edges, counts = histograms_by_status(ds, layers, kind=kind, edges=np.geomspace(floor, 2.0, bins + 1))
    order = [s for s in statuses if any(s in counts[layer] for layer in layers)]
    if not order:
        raise AnalysisError("no values to draw for these layers and statuses")
    width = 0.8 / len(order)
    fig, ax = subplots(figsize=(max(6.0, 1.1 * len(layers) + 2), 3.6), constrained_layout=True)
    for j, status in enumerate(order):
        cells = [(i, counts[layer][status]) for i, layer in enumerate(layers) if status in counts[layer]]
        positions = [i - 0.4 + width * (j + 0.5) for i, _ in cells]
        parts = ax.violin([_histogram_violin(np.log10(edges), hist, smooth) for _, hist in cells], positions=positions,
                          widths=width * 0.95, showmeans=False, showextrema=False, showmedians=True)
        for body in parts["bodies"]:
            body.set(facecolor=STATUS_COLORS[status], edgecolor="black", linewidth=0.4, alpha=0.9)
        parts["cmedians"].set(color="white", linewidth=1.0)
    ax.set_xticks(range(len(layers)), layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("log10(1 − cosine to step s−1)")
    ax.set_title(f"Token feature change per layer and status ({kind}; every value; floor {floor:.1e})", fontsize=10)
    fig.legend(handles=[Patch(facecolor=STATUS_COLORS[s], label=s) for s in order], fontsize=7, ncols=len(order),
               loc="outside lower center")
    return fig


def plot_step_layer_heatmap(matrix: xr.DataArray, title: str = "", colorbar_label: str = "",
                            cmap: str = "viridis", vmin: Optional[float] = None, vmax: Optional[float] = None,
                            ax: Optional[Axes] = None) -> Figure:
    """A (layer, step) matrix as a heat map: layers as rows (first layer on top), steps as columns."""
    if tuple(matrix.dims) != ("layer", "step"):
        raise AnalysisError(f"expected a (layer, step) matrix, got dims {matrix.dims}")
    if ax is None:
        fig, ax = subplots(figsize=(8, 0.32 * matrix.sizes["layer"] + 1.4), constrained_layout=True)
    else:
        fig = ax.figure
    steps = matrix["step"].values
    image = ax.imshow(np.ma.masked_invalid(matrix.values), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax,
                      interpolation="nearest", extent=(steps[0] - 0.5, steps[-1] + 0.5, matrix.sizes["layer"] - 0.5,
                                                       -0.5))
    ax.set_yticks(range(matrix.sizes["layer"]), [str(x) for x in matrix["layer"].values], fontsize=7)
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel("layer")
    ax.set_title(title or str(matrix.name), fontsize=10)
    fig.colorbar(image, ax=ax, label=colorbar_label or str(matrix.name), pad=0.01)
    return fig


def _n_note(df: pd.DataFrame) -> str:
    """", n = N samples, 95 % bands" when the table carries intervals over its N samples."""
    if "n_samples" not in df.columns or df.empty:
        return ""
    return f" (n = {int(df['n_samples'].iloc[0])} samples, 95 % bands)"


def plot_fraction_above(fractions: pd.DataFrame, layers: Optional[Sequence[str]] = None) -> Figure:
    """Fraction of positions whose cosine to the previous step exceeds each threshold, per step, for the given
    layers (``fractions`` from analysis.phenomena.fraction_above); with its ``intervals`` columns, 95 % bands over
    samples and n in the title."""
    layers = list(layers) if layers is not None else list(dict.fromkeys(fractions.index.get_level_values("layer")))
    thresholds = [c for c in fractions.columns if c.startswith("above_") and not c.endswith(("_ci_low", "_ci_high"))]
    fig, ax = subplots(figsize=(7, 3.4), constrained_layout=True)
    styles = ["-", "--", ":", "-."]
    colors = matplotlib.colormaps["tab10"]
    for i, layer in enumerate(layers):
        part = fractions.xs(layer, level="layer")
        for j, column in enumerate(thresholds):
            ax.plot(part.index, part[column], styles[j % len(styles)], color=colors(i % 10),
                    label=f"{layer}, cos > {column.removeprefix('above_')}")
            if f"{column}_ci_low" in part.columns:
                ax.fill_between(part.index, part[f"{column}_ci_low"], part[f"{column}_ci_high"], color=colors(i % 10),
                                alpha=0.15, linewidth=0)
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel("fraction of positions")
    ax.set_title("Positions nearly unchanged since the previous step" + _n_note(fractions), fontsize=10)
    ax.legend(fontsize=7, ncols=2)
    return fig


def plot_encoder_vs_decoder(df: pd.DataFrame, floor: float = FLOOR) -> Figure:
    """1 - mean cosine per step of the encoder and decoder layers (from phenomena.encoder_vs_decoder)."""
    fig, ax = subplots(figsize=(7, 3.2), constrained_layout=True)
    for group, color in (("encoder", "#9467bd"), ("decoder", "#8c564b")):
        ax.plot(df.index, np.maximum(df[f"{group}_change"], floor), color=color, label=group)
        if f"{group}_change_ci_low" in df.columns:
            ax.fill_between(df.index, np.maximum(df[f"{group}_change_ci_low"], floor),
                            np.maximum(df[f"{group}_change_ci_high"], floor), color=color, alpha=0.2, linewidth=0)
    ax.set_yscale("log")
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel("1 − mean cosine to step s−1")
    ax.set_title("Encoder vs decoder on the same positions (buffer + known tokens)" + _n_note(df), fontsize=10)
    ax.legend(fontsize=8)
    return fig


def plot_step_similarity(matrix: np.ndarray, layer: str, vmin: Optional[float] = None) -> Figure:
    """The (S, S) step x step mean cosine similarity of one layer's features."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise AnalysisError(f"expected a square step x step matrix, got shape {matrix.shape}")
    fig, ax = subplots(figsize=(4.8, 4.0), constrained_layout=True)
    image = ax.imshow(matrix, cmap="magma", vmin=vmin, vmax=1.0, origin="upper", interpolation="nearest")
    ax.set_xlabel("MAR step j")
    ax.set_ylabel("MAR step i")
    ax.set_title(rf"$\cos(h_i, h_j)$ of {layer}, mean over samples and positions", fontsize=9)
    fig.colorbar(image, ax=ax, label="mean cosine similarity")
    return fig


# --- condition redundancy ---------------------------------------------------------------------------------
def plot_branch_vs_residual(per_step: pd.DataFrame, title: str = "", ylabel: str = "relative change to step s−1",
                            log: bool = True) -> Figure:
    """Per step: the change of the cond branch, the uncond branch and their residual r = cond - uncond
    (columns cond_change, uncond_change, residual_change; from phenomena.branch_vs_residual(by="step") for one
    layer, or live_features.absolute_change)."""
    index = per_step.index.get_level_values("step") if "step" in per_step.index.names else per_step.index
    fig, ax = subplots(figsize=(7, 3.2), constrained_layout=True)
    for column, color in BRANCH_COLORS.items():
        if column in per_step:
            ax.plot(index, per_step[column], color=color, label=column.replace("_change", ""))
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel(ylabel)
    ax.set_title(title or "Branch change vs residual change", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def plot_change_ratio(per_layer: pd.DataFrame, title: str = "", ylabel: str = "branch change / residual change") -> Figure:
    """Bars per layer of cond_over_residual and uncond_over_residual; the dashed line at 1 is equal change."""
    layers = list(per_layer.index)
    x = np.arange(len(layers))
    fig, ax = subplots(figsize=(max(5.0, 0.7 * len(layers) + 1.5), 3.2), constrained_layout=True)
    for offset, column, color in ((-0.2, "cond_over_residual", BRANCH_COLORS["cond_change"]),
                                  (0.2, "uncond_over_residual", BRANCH_COLORS["uncond_change"])):
        ax.bar(x + offset, per_layer[column], width=0.4, color=color, label=column.replace("_over_residual", ""))
    ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
    ax.set_xticks(x, layers, rotation=30, fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "How many times more each branch changes than the CFG residual", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def plot_head_change(profile: pd.DataFrame) -> Figure:
    """Relative change between consecutive head sampling steps per head part (phenomena.head_change_profile)."""
    fig, ax = subplots(figsize=(7, 3.2), constrained_layout=True)
    for part in profile.columns:
        ax.plot(profile.index, profile[part], label=str(part))
    ax.set_yscale("log")
    ax.set_xlabel("diffusion-head step (execution order, t = T−1 first)")
    ax.set_ylabel("relative change to previous head step")
    ax.set_title("Diffusion head: eps CFG difference and res-block updates", fontsize=10)
    ax.legend(fontsize=8)
    return fig
