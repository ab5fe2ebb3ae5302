"""Drawing figures without pyplot's global state, and writing the workbook's figures (PNG and PDF, under
data/figures/ by default) and tables (Markdown). The figure families live beside it: analysis.redundancy_plots
(notebooks 01 and 02), analysis.schedule_plots (schedules, trade-offs, ablations, samples) and
analysis.model_comparison (models side by side).
"""
from __future__ import annotations

import io
import re
import threading
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lazymar import tables

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
