"""Figures of the workbook: every function takes computed tables (analysis.phenomena, analysis.measure, the
derivation) or a recording and returns a matplotlib Figure with labelled axes; :func:`save_figure` writes it as
PNG and PDF under data/figures/.

Cosines of adjacent steps sit very close to 1, so distributions are drawn as 1 - cosine on a log axis; values
at or below ``floor`` (exact repeats, or the rounding of a compact recording) are drawn at the floor.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.figure import Figure

from lazymar.recording import STATUS_NAMES

from .phenomena import AnalysisError, resolution, values_by_status

FIGURES_DIR = Path(__file__).resolve().parents[1] / "data" / "figures"
STATUS_COLORS = {"buffer": "#7f7f7f", "known": "#1f77b4", "new": "#d62728", "to_predict": "#ff7f0e",
                 "masked": "#2ca02c"}
BRANCH_COLORS = {"cond_change": "#1f77b4", "uncond_change": "#ff7f0e", "residual_change": "#2ca02c"}
FLOOR = 1e-6
STEP_LABEL = "MAR sampling step s"


# --- saving -----------------------------------------------------------------------------------------------
def save_figure(fig: Figure, name: str, directory: Optional[str | Path] = None,
                formats: Sequence[str] = ("png", "pdf"), dpi: int = 150) -> list[Path]:
    """Write ``fig`` as ``<directory>/<name>.png`` and ``.pdf`` (default directory: the repository's
    data/figures). Files carry no creation date, so an unchanged figure rewrites identical bytes."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name or "") or name.endswith((".png", ".pdf")):
        raise ValueError(f"figure name must be a plain file stem without extension, got {name!r}")
    unknown = [f for f in formats if f not in ("png", "pdf", "svg")]
    if unknown:
        raise ValueError(f"unknown figure format {unknown[0]!r}; use png, pdf or svg")
    folder = Path(directory) if directory is not None else FIGURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = folder / f"{name}.{fmt}"
        metadata = {"CreationDate": None} if fmt == "pdf" else ({"Date": None} if fmt == "svg" else None)
        fig.savefig(path, format=fmt, dpi=dpi, bbox_inches="tight", metadata=metadata)
        paths.append(path)
    return paths


def markdown_table(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """A DataFrame (index included) as a GitHub Markdown table; floats with ``floatfmt``, inf as "inf"."""
    frame = df.reset_index() if any(name is not None for name in df.index.names) else df

    def cell(value) -> str:
        if isinstance(value, (float, np.floating)):
            if np.isnan(value):
                return ""
            return ("inf" if value > 0 else "-inf") if np.isinf(value) else format(float(value), floatfmt)
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _grid(n: int, ncols: int = 3, size: tuple[float, float] = (3.4, 2.6)) -> tuple[Figure, np.ndarray]:
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False,
                             constrained_layout=True)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()[:n]


def _distance(values: np.ndarray, floor: float) -> np.ndarray:
    return np.maximum(1.0 - values, floor)


# --- token redundancy -------------------------------------------------------------------------------------
def plot_cosine_ecdf(ds: xr.Dataset, layers: Optional[Sequence[str]] = None, kind: str = "output",
                     statuses: Optional[Sequence[str]] = None, floor: Optional[float] = None, ncols: int = 3) -> Figure:
    """One panel per layer: the ECDF of 1 - cos(h_s, h_{s-1}) over all samples, steps and positions, one curve
    per position status. Values identical at the recording's precision are drawn at ``floor`` (default: half
    the recording's resolution)."""
    floor = floor if floor is not None else resolution(ds) / 2
    layers = list(layers) if layers is not None else [str(x) for x in ds["layer"].values]
    statuses = list(statuses) if statuses is not None else list(STATUS_NAMES)
    fig, axes = _grid(len(layers), ncols)
    for ax, layer in zip(axes, layers):
        groups = values_by_status(ds, layer, kind=kind)
        if not any(status in groups for status in statuses):
            ax.text(0.5, 0.5, f"no {kind} values recorded", ha="center", va="center", transform=ax.transAxes)
        for status in statuses:
            if status not in groups:
                continue
            x = np.sort(_distance(groups[status], floor))
            ax.step(x, np.arange(1, x.size + 1) / x.size, where="post", color=STATUS_COLORS[status],
                    label=f"{status} (n={x.size})")
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


def plot_cosine_violin(ds: xr.Dataset, layers: Optional[Sequence[str]] = None, kind: str = "output",
                       statuses: Sequence[str] = ("known", "new", "to_predict", "masked"), max_points: int = 3000,
                       floor: Optional[float] = None, seed: int = 0) -> Figure:
    """Violins of log10(1 - cosine) per layer, split by status; at most ``max_points`` values per violin
    (a fixed random subsample, for speed). Floor as in :func:`plot_cosine_ecdf`."""
    import seaborn as sns

    floor = floor if floor is not None else resolution(ds) / 2
    layers = list(layers) if layers is not None else [str(x) for x in ds["layer"].values]
    rng = np.random.default_rng(seed)
    frames = []
    for layer in layers:
        for status, values in values_by_status(ds, layer, kind=kind).items():
            if status not in statuses:
                continue
            if values.size > max_points:
                values = rng.choice(values, max_points, replace=False)
            frames.append(pd.DataFrame({"layer": layer, "status": status,
                                        "log10_distance": np.log10(_distance(values, floor))}))
    if not frames:
        raise AnalysisError("no values to draw for these layers and statuses")
    df = pd.concat(frames, ignore_index=True)
    order = [s for s in statuses if s in set(df["status"])]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(layers) + 2), 3.6), constrained_layout=True)
    sns.violinplot(data=df, x="layer", y="log10_distance", hue="status", hue_order=order, order=layers,
                   palette=STATUS_COLORS, density_norm="width", cut=0, linewidth=0.6, inner=None, ax=ax)
    ax.set_xlabel("layer")
    ax.set_ylabel("log10(1 − cosine to step s−1)")
    ax.set_title(f"Token feature change per layer and status ({kind}; floor {floor:.1e})", fontsize=10)
    ax.legend(fontsize=7, ncols=len(order), loc="upper left")
    return fig


def plot_step_layer_heatmap(matrix: xr.DataArray, title: str = "", colorbar_label: str = "",
                            cmap: str = "viridis", vmin: Optional[float] = None, vmax: Optional[float] = None,
                            ax: Optional[plt.Axes] = None) -> Figure:
    """A (layer, step) matrix as a heat map: layers as rows (first layer on top), steps as columns."""
    if tuple(matrix.dims) != ("layer", "step"):
        raise AnalysisError(f"expected a (layer, step) matrix, got dims {matrix.dims}")
    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 0.32 * matrix.sizes["layer"] + 1.4), constrained_layout=True)
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


def plot_fraction_above(fractions: pd.DataFrame, layers: Optional[Sequence[str]] = None) -> Figure:
    """Fraction of positions whose cosine to the previous step exceeds each threshold, per step, for the given
    layers (``fractions`` from analysis.phenomena.fraction_above)."""
    layers = list(layers) if layers is not None else list(dict.fromkeys(fractions.index.get_level_values("layer")))
    thresholds = [c for c in fractions.columns if c.startswith("above_")]
    fig, ax = plt.subplots(figsize=(7, 3.4), constrained_layout=True)
    styles = ["-", "--", ":", "-."]
    colors = plt.get_cmap("tab10")
    for i, layer in enumerate(layers):
        part = fractions.xs(layer, level="layer")
        for j, column in enumerate(thresholds):
            ax.plot(part.index, part[column], styles[j % len(styles)], color=colors(i % 10),
                    label=f"{layer}, cos > {column.removeprefix('above_')}")
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel("fraction of positions")
    ax.set_title("Positions nearly unchanged since the previous step", fontsize=10)
    ax.legend(fontsize=7, ncols=2)
    return fig


def plot_encoder_vs_decoder(df: pd.DataFrame, floor: float = FLOOR) -> Figure:
    """1 - mean cosine per step of the encoder and decoder layers (from phenomena.encoder_vs_decoder)."""
    fig, ax = plt.subplots(figsize=(7, 3.2), constrained_layout=True)
    for group, color in (("encoder", "#9467bd"), ("decoder", "#8c564b")):
        ax.plot(df.index, np.maximum(df[f"{group}_change"], floor), color=color, label=group)
    ax.set_yscale("log")
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel("1 − mean cosine to step s−1")
    ax.set_title("Encoder vs decoder on the same positions (buffer + known tokens)", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def plot_step_similarity(matrix: np.ndarray, layer: str, vmin: Optional[float] = None) -> Figure:
    """The (S, S) step x step mean cosine similarity of one layer's features."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise AnalysisError(f"expected a square step x step matrix, got shape {matrix.shape}")
    fig, ax = plt.subplots(figsize=(4.8, 4.0), constrained_layout=True)
    image = ax.imshow(matrix, cmap="magma", vmin=vmin, vmax=1.0, origin="upper", interpolation="nearest")
    ax.set_xlabel("MAR step j")
    ax.set_ylabel("MAR step i")
    ax.set_title(f"cos(h_i, h_j) of {layer}, mean over samples and positions", fontsize=9)
    fig.colorbar(image, ax=ax, label="mean cosine similarity")
    return fig


# --- condition redundancy ---------------------------------------------------------------------------------
def plot_branch_vs_residual(per_step: pd.DataFrame, title: str = "", ylabel: str = "relative change to step s−1",
                            log: bool = True) -> Figure:
    """Per step: the change of the cond branch, the uncond branch and their residual r = cond - uncond
    (columns cond_change, uncond_change, residual_change; from phenomena.branch_vs_residual(by="step") for one
    layer, or phenomena.absolute_change)."""
    index = per_step.index.get_level_values("step") if "step" in per_step.index.names else per_step.index
    fig, ax = plt.subplots(figsize=(7, 3.2), constrained_layout=True)
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
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(layers) + 1.5), 3.2), constrained_layout=True)
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
    fig, ax = plt.subplots(figsize=(7, 3.2), constrained_layout=True)
    for part in profile.columns:
        ax.plot(profile.index, profile[part], label=str(part))
    ax.set_yscale("log")
    ax.set_xlabel("diffusion-head step (execution order, t = T−1 first)")
    ax.set_ylabel("relative change to previous head step")
    ax.set_title("Diffusion head: eps CFG difference and res-block updates", fontsize=10)
    ax.legend(fontsize=8)
    return fig


# --- schedules, trade-offs, ablations ---------------------------------------------------------------------
COMPUTED_ROWS = {  # analysis.derive.schedule_matrix column -> (row label, value as "share computed afresh")
    "refresh": ("full refresh", lambda v: v),
    "keep_fraction": ("decoder positions after selection layer", lambda v: v),
    "condition_cache": ("unconditional branch", lambda v: 1.0 - v),
    "head_cache": ("diffusion head without cache", lambda v: 1.0 - v),
}


def computed_share(matrix: pd.DataFrame) -> pd.DataFrame:
    """A step x component schedule matrix (analysis.derive.schedule_matrix: refresh, keep_fraction,
    condition_cache, head_cache) as (component, step) shares computed afresh: 1 = computed, 0 = reused.
    refresh and keep_fraction already are; the two cache flags are inverted (cache on = reused)."""
    unknown = [c for c in matrix.columns if c not in COMPUTED_ROWS]
    if unknown:
        raise AnalysisError(f"unknown schedule component {unknown[0]!r}; known: {', '.join(COMPUTED_ROWS)}")
    rows = {COMPUTED_ROWS[c][0]: COMPUTED_ROWS[c][1](matrix[c].to_numpy(dtype=float)) for c in matrix.columns}
    return pd.DataFrame(rows, index=matrix.index).T


def plot_schedule(matrix: pd.DataFrame | np.ndarray, components: Optional[Sequence[str]] = None,
                  title: str = "", ax: Optional[plt.Axes] = None) -> Figure:
    """A schedule as a (component, step) heat map of the share of each component computed afresh at each step
    (1 = computed, 0 = reused from a cache). A step x component matrix from analysis.derive.schedule_matrix
    is converted with :func:`computed_share`."""
    if isinstance(matrix, pd.DataFrame):
        if matrix.index.name == "step":  # analysis.derive.schedule_matrix is step x component
            matrix = computed_share(matrix)
        components = [str(c) for c in matrix.index]
        values = matrix.to_numpy(dtype=float)
    else:
        values = np.asarray(matrix, dtype=float)
        if components is None or len(components) != values.shape[0]:
            raise AnalysisError("a schedule array needs one component name per row")
    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(components) + 1.3), constrained_layout=True)
    else:
        fig = ax.figure
    image = ax.imshow(values, aspect="auto", cmap="cividis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(len(components)), components, fontsize=8)
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel("component")
    ax.set_title(title or "Cache schedule", fontsize=10)
    fig.colorbar(image, ax=ax, label="computed (1) / reused (0)", pad=0.01)
    return fig


def plot_tradeoff(points: pd.DataFrame, x: str = "flops_ratio", y: str = "psnr", label: Optional[str] = "schedule",
                  front: Optional[pd.DataFrame] = None, highlight: Optional[Mapping[str, float]] = None,
                  xlabel: str = "FLOPs ratio (uncached / cached)", ylabel: str = "PSNR vs uncached (dB)",
                  ax: Optional[plt.Axes] = None) -> Figure:
    """Speed/quality points (one per schedule), the Pareto front as a line, and an optional highlighted point
    (e.g. the schedule being tuned; ``highlight`` has the x and y keys and optionally "label")."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.8), constrained_layout=True)
    else:
        fig = ax.figure
    for column in (x, y):
        if column not in points:
            raise AnalysisError(f"the table has no column {column!r}; it has {', '.join(map(str, points.columns))}")
    finite = points[np.isfinite(points[x].astype(float)) & np.isfinite(points[y].astype(float))]
    if "family" in finite:  # a sweep: one colour per family (derived, lazymar, baselines)
        colors = plt.get_cmap("tab10")
        for i, (family, group) in enumerate(finite.groupby("family", sort=True)):
            ax.scatter(group[x], group[y], s=16, color=colors(i % 10), alpha=0.8, label=str(family))
    else:
        ax.scatter(finite[x], finite[y], s=16, color="#7f7f7f", alpha=0.7, label="measured schedules")
    if front is not None and len(front):
        front = front[np.isfinite(front[x].astype(float)) & np.isfinite(front[y].astype(float))]
    if label and label in finite:
        # name the presets, the saved schedules and the front; grid points and baselines go by colour
        on_front = set(front[label].astype(str)) if front is not None and label in front else set()
        for _, row in finite.iterrows():
            name, family = str(row[label]), str(row.get("family", "derived"))
            named = family in ("lazymar", "derived") and not name.startswith("derived-")
            if name in ("none", "lazymar", "lazymar-released") or named or name in on_front:
                ax.annotate(name, (row[x], row[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if front is not None and len(front):
        ordered = front.sort_values(x)
        ax.plot(ordered[x], ordered[y], "-o", color="#222222", markersize=3, linewidth=1, label="Pareto front")
    if highlight is not None:
        ax.scatter([highlight[x]], [highlight[y]], s=90, marker="*", color="#1f77b4", zorder=5,
                   label=str(highlight.get("label", "current")))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("Speed / fidelity trade-off", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def plot_ablation(table: pd.DataFrame, metrics: Sequence[tuple[str, str]] = (
        ("flops_ratio", "FLOPs ratio (uncached / cached)"), ("psnr", "PSNR vs uncached (dB)")),
                  title: str = "") -> Figure:
    """One bar panel per metric, one bar per configuration (the table's index)."""
    names = [str(i) for i in table.index]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics) + 0.5, 3.4), constrained_layout=True,
                             squeeze=False)
    for ax, (column, label) in zip(axes[0], metrics):
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)
        shown = np.where(np.isfinite(values), values, 0.0)
        ax.bar(range(len(names)), shown, color="#4c72b0")
        for i, v in enumerate(values):
            ax.annotate("∞" if np.isinf(v) else f"{v:.2f}", (i, shown[i]), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("configuration")
        ax.set_ylabel(label)
    fig.suptitle(title or "Ablation", fontsize=10)
    return fig


def plot_metric_lines(table: pd.DataFrame, x: str, metrics: Sequence[tuple[str, str]], xlabel: str,
                      title: str = "") -> Figure:
    """One line panel per metric against ``x`` (e.g. the refresh interval)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics) + 0.5, 3.2), constrained_layout=True,
                             squeeze=False)
    for ax, (column, label) in zip(axes[0], metrics):
        ax.plot(table[x], pd.to_numeric(table[column], errors="coerce"), "-o", color="#4c72b0")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_sample_comparison(images: Mapping[str, "np.ndarray"], labels: Optional[Sequence[int]] = None,
                           max_images: int = 8) -> Figure:
    """Rows of images in [-1, 1] (N, C, H, W) side by side, one row per run (e.g. uncached, cached), the same
    samples in the same columns."""
    names = list(images)
    if not names:
        raise AnalysisError("no images to show")
    arrays = {k: np.asarray(v.detach().cpu() if hasattr(v, "detach") else v, dtype=float) for k, v in images.items()}
    n = min(max_images, min(a.shape[0] for a in arrays.values()))
    fig, axes = plt.subplots(len(names), n, figsize=(0.9 * n + 1.2, 1.0 * len(names) + 0.4), squeeze=False,
                             constrained_layout=True)
    for r, name in enumerate(names):
        for c in range(n):
            ax = axes[r, c]
            pic = (np.clip(arrays[name][c], -1, 1) + 1) / 2
            pic = pic[0] if pic.shape[0] == 1 else np.transpose(pic[:3], (1, 2, 0))
            ax.imshow(pic, cmap="gray_r" if pic.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 0 and labels is not None:
                ax.set_title(f"class {labels[c]}", fontsize=7)
    return fig
