"""Figures of the workbook's schedules, trade-offs and ablations, and :func:`save_figure`, which writes any figure
as PNG and PDF (under data/figures/ by default). Every function takes computed tables (analysis.measure, the
sweep, lazymar.schedules.schedule_matrix) and returns a matplotlib Figure with labelled axes. The redundancy
figures of notebooks 01 and 02 are in analysis.redundancy_plots.
"""
from __future__ import annotations

import io
import re
import threading
from pathlib import Path
from typing import Mapping, Optional, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lazymar import tables

from .phenomena import AnalysisError

FIGURES_DIR = Path(__file__).resolve().parents[1] / "data" / "figures"
STEP_LABEL = "MAR sampling step s"
# Rendering shares matplotlib's caches (fonts, mathtext); one figure at a time, whichever thread draws it.
RENDER_LOCK = threading.RLock()


# --- figures without pyplot --------------------------------------------------------------------------------
def subplots(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6.0, 4.0), **kwargs):
    """(figure, axes) like ``pyplot.subplots`` with constrained layout, but a plain :class:`Figure` that pyplot
    never sees: no global "current figure", so callbacks of widgets (which ipykernel 7 runs in several threads)
    and a notebook's cells cannot draw into each other's figures, and nothing needs closing."""
    kwargs.pop("constrained_layout", None)  # always constrained
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (tight bounding box), rendered under :data:`RENDER_LOCK`."""
    buffer = io.BytesIO()
    with RENDER_LOCK:
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def show(fig: Figure, dpi: int = 100) -> Figure:
    """Display the figure in a notebook as a PNG (works for figures pyplot does not know); returns it."""
    from IPython.display import Image, display
    display(Image(data=figure_png(fig, dpi), format="png"))
    return fig


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
        with RENDER_LOCK:
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

    return tables.markdown_table(frame.columns, [[cell(v) for v in row]
                                                 for row in frame.itertuples(index=False)]) + "\n"


# --- schedules, trade-offs, ablations ---------------------------------------------------------------------
COMPUTED_ROWS = {  # lazymar.schedules.schedule_matrix column -> (row label, value as "share computed afresh")
    "refresh": ("full refresh", lambda v: v),
    "keep_fraction": ("decoder positions after selection layer", lambda v: v),
    "condition_cache": ("unconditional branch", lambda v: 1.0 - v),
    "head_cache": ("diffusion head without cache", lambda v: 1.0 - v),
}


def computed_share(matrix: pd.DataFrame) -> pd.DataFrame:
    """A step x component schedule matrix (lazymar.schedules.schedule_matrix: refresh, keep_fraction,
    condition_cache, head_cache) as (component, step) shares computed afresh: 1 = computed, 0 = reused.
    refresh and keep_fraction already are; the two cache flags are inverted (cache on = reused)."""
    unknown = [c for c in matrix.columns if c not in COMPUTED_ROWS]
    if unknown:
        raise AnalysisError(f"unknown schedule component {unknown[0]!r}; known: {', '.join(COMPUTED_ROWS)}")
    rows = {COMPUTED_ROWS[c][0]: COMPUTED_ROWS[c][1](matrix[c].to_numpy(dtype=float)) for c in matrix.columns}
    return pd.DataFrame(rows, index=matrix.index).T


def plot_schedule(matrix: pd.DataFrame | np.ndarray, components: Optional[Sequence[str]] = None,
                  title: str = "", ax: Optional[Axes] = None) -> Figure:
    """A schedule as a (component, step) heat map of the share of each component computed afresh at each step
    (1 = computed, 0 = reused from a cache). A step x component matrix from lazymar.schedules.schedule_matrix
    is converted with :func:`computed_share`."""
    if isinstance(matrix, pd.DataFrame):
        if matrix.index.name == "step":  # lazymar.schedules.schedule_matrix is step x component
            matrix = computed_share(matrix)
        components = [str(c) for c in matrix.index]
        values = matrix.to_numpy(dtype=float)
    else:
        values = np.asarray(matrix, dtype=float)
        if components is None or len(components) != values.shape[0]:
            raise AnalysisError("a schedule array needs one component name per row")
    if ax is None:
        fig, ax = subplots(figsize=(8, 0.35 * len(components) + 1.3), constrained_layout=True)
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
                  ax: Optional[Axes] = None) -> Figure:
    """Speed/quality points (one per schedule), the Pareto front as a line, and an optional highlighted point
    (e.g. the schedule being tuned; ``highlight`` has the x and y keys and optionally "label"). Names are placed
    where they overlap no other name; the legend sits outside the axes, right of them."""
    if ax is None:
        fig, ax = subplots(figsize=(9, 5.2))
    else:
        fig = ax.figure
    for column in (x, y):
        if column not in points:
            raise AnalysisError(f"the table has no column {column!r}; it has {', '.join(map(str, points.columns))}")
    finite = points[np.isfinite(points[x].astype(float)) & np.isfinite(points[y].astype(float))]
    if "family" in finite:  # a sweep: one colour per family (derived, lazymar, baselines)
        colors = matplotlib.colormaps["tab10"]
        for i, (family, group) in enumerate(finite.groupby("family", sort=True)):
            ax.scatter(group[x], group[y], s=22, color=colors(i % 10), alpha=0.85, label=str(family))
    else:
        ax.scatter(finite[x], finite[y], s=22, color="#7f7f7f", alpha=0.7, label="measured schedules")
    if front is not None and len(front):
        front = front[np.isfinite(front[x].astype(float)) & np.isfinite(front[y].astype(float))]
    named = []
    if label and label in finite:
        # name the presets, the saved schedules and the front; grid points and baselines go by colour
        on_front = set(front[label].astype(str)) if front is not None and label in front else set()
        for _, row in finite.iterrows():
            name, family = str(row[label]), str(row.get("family", "derived"))
            saved = family in ("lazymar", "derived") and not name.startswith("derived-")
            if name in ("none", "lazymar", "lazymar-released", "marche", "gtr") or saved or name in on_front:
                named.append((name, float(row[x]), float(row[y])))
    if front is not None and len(front):
        ordered = front.sort_values(x)
        ax.plot(ordered[x], ordered[y], "-o", color="#222222", markersize=3, linewidth=1, label="Pareto front")
    if highlight is not None:
        ax.scatter([highlight[x]], [highlight[y]], s=110, marker="*", color="#1f77b4", zorder=5,
                   label=str(highlight.get("label", "current")))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("Speed / fidelity trade-off", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    place_labels(ax, named, fontsize=8)
    return fig


# offsets (points) tried in turn for a point's name: right-above, right-below, left-above, left-below, ...
LABEL_OFFSETS = [(4, 4), (4, -11), (-4, 4), (-4, -11), (4, 14), (-4, 14), (4, -21), (-4, -21), (12, -4), (-12, -4)]


def place_labels(ax: Axes, points: Sequence[tuple[str, float, float]], fontsize: float = 8) -> list:
    """Annotate each (name, x, y) at the first offset of :data:`LABEL_OFFSETS` whose text box overlaps no
    name placed before it (nor leaves the axes); a name that fits nowhere keeps the first offset, drawn thin."""
    fig = ax.figure
    fig.draw_without_rendering()  # final layout (constrained): text boxes are measured where they will be
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed, texts = [], []
    for name, px, py in sorted(points, key=lambda p: (p[1], p[2])):
        chosen = None
        for dx, dy in LABEL_OFFSETS:
            text = ax.annotate(name, (px, py), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                               ha="left" if dx >= 0 else "right")
            box = text.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(other) for other in placed):
                chosen = text
                break
            text.remove()
        if chosen is None:
            dx, dy = LABEL_OFFSETS[0]
            chosen = ax.annotate(name, (px, py), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize - 1,
                                 alpha=0.6)
        placed.append(chosen.get_window_extent(renderer))
        texts.append(chosen)
    return texts


def plot_ablation(table: pd.DataFrame, metrics: Sequence[tuple[str, str]] = (
        ("flops_ratio", "FLOPs ratio (uncached / cached)"), ("psnr", "PSNR vs uncached (dB)")),
                  title: str = "") -> Figure:
    """One bar panel per metric, one bar per configuration (the table's index)."""
    names = [str(i) for i in table.index]
    fig, axes = subplots(1, len(metrics), figsize=(3.6 * len(metrics) + 0.5, 3.4), constrained_layout=True,
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
    fig, axes = subplots(1, len(metrics), figsize=(3.6 * len(metrics) + 0.5, 3.2), constrained_layout=True,
                             squeeze=False)
    for ax, (column, label) in zip(axes[0], metrics):
        ax.plot(table[x], pd.to_numeric(table[column], errors="coerce"), "-o", color="#4c72b0")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
    fig.suptitle(title, fontsize=10)
    return fig


# the frame of every image of plot_sample_comparison: a colour no digit or label uses, so that a test can count the
# images a browser shows (tests/browser/pixels.py)
SAMPLE_FRAME_COLOR = "#e41a1c"


def plot_sample_comparison(images: Mapping[str, "np.ndarray"], labels: Optional[Sequence[int]] = None,
                           max_images: int = 8) -> Figure:
    """Rows of images in [-1, 1] (N, C, H, W) side by side, one row per run (e.g. uncached, cached), the same
    samples in the same columns; each image framed in :data:`SAMPLE_FRAME_COLOR`."""
    names = list(images)
    if not names:
        raise AnalysisError("no images to show")
    arrays = {k: np.asarray(v.detach().cpu() if hasattr(v, "detach") else v, dtype=float) for k, v in images.items()}
    n = min(max_images, min(a.shape[0] for a in arrays.values()))
    fig, axes = subplots(len(names), n, figsize=(0.9 * n + 1.2, 1.0 * len(names) + 0.4), squeeze=False)
    for r, name in enumerate(names):
        for c in range(n):
            ax = axes[r, c]
            pic = (np.clip(arrays[name][c], -1, 1) + 1) / 2
            pic = pic[0] if pic.shape[0] == 1 else np.transpose(pic[:3], (1, 2, 0))
            ax.imshow(pic, cmap="gray_r" if pic.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color(SAMPLE_FRAME_COLOR)
                spine.set_linewidth(1.5)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 0 and labels is not None:
                ax.set_title(f"class {labels[c]}", fontsize=7)
    return fig
