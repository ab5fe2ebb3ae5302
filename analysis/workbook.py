"""What every notebook of the workbook shares: a one-paragraph description of a recording and a writer that shows
figures and tables and, when the notebook's ``FIGURES`` parameter names a folder, also saves them there."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd
import xarray as xr

from . import phenomena, plots


def describe_recording(ds: xr.Dataset, source: str) -> str:
    """Markdown: model, samples, steps, sampling settings, positions and layers of a recording."""
    attrs = ds.attrs
    settings = phenomena.sampling_settings(attrs)
    return (f"Recording `{source}`: model **{attrs['model']}**, {ds.sizes['sample']} samples, {ds.sizes['step']} "
            f"MAR steps, CFG {settings.cfg:g} ({settings.cfg_schedule}), temperature {settings.temperature:g}, "
            f"{ds.sizes['position']} positions (buffer {int(attrs['buffer_size'])} + {int(attrs['seq_len'])} "
            f"tokens), layers {', '.join(map(str, ds.layer.values))}.")


class FigureWriter:
    """Saves figures (PNG and PDF) and tables (CSV and markdown) under ``folder``; with ``folder`` None it only
    passes them through for display. ``written`` lists every file saved."""

    def __init__(self, folder: Optional[str | Path]):
        self.folder = Path(folder) if folder else None
        self.written: list[Path] = []

    def figure(self, fig, name: str):
        if self.folder is not None:
            self.written.extend(plots.save_figure(fig, name, self.folder))
        return fig

    def table(self, df: pd.DataFrame, name: str) -> pd.DataFrame:
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / name
            df.to_csv(path.with_suffix(".csv"), float_format="%.6g")
            path.with_suffix(".md").write_text(plots.markdown_table(df))
            self.written.extend([path.with_suffix(".csv"), path.with_suffix(".md")])
        return df

    def summary(self) -> str:
        """Markdown list of the files saved so far."""
        return f"Wrote {len(self.written)} files to `{self.folder}`:\n\n" + "\n".join(
            f"- `{p.name}`" for p in self.written)
