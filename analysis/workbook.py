"""What every notebook of the workbook shares: a one-paragraph description of a recording and a writer that shows
figures and tables and, when the notebook's ``FIGURES`` parameter names a folder, also saves them there."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd
import xarray as xr

from . import figures, phenomena


def describe_recording(ds: xr.Dataset, source: str) -> str:
    """Markdown: model, samples, steps, sampling settings, positions and layers of a recording."""
    attrs = ds.attrs
    settings = phenomena.sampling_settings(attrs)
    return (f"Recording `{source}`: model **{attrs['model']}**, {ds.sizes['sample']} samples, {ds.sizes['step']} "
            f"MAR steps, CFG {settings.cfg:g} ({settings.cfg_schedule}), temperature {settings.temperature:g}, "
            f"{ds.sizes['position']} positions (buffer {int(attrs['buffer_size'])} + {int(attrs['seq_len'])} "
            f"tokens), layers {', '.join(map(str, ds.layer.values))}.")


class FigureWriter:
    """Shows figures and saves them (PNG and PDF) and tables (CSV and markdown) under ``folder``; with ``folder``
    None it only shows them. ``written`` lists every file saved. Figures are plain matplotlib Figures (no pyplot
    state, see analysis.figures.subplots), shown as PNG images."""

    def __init__(self, folder: Optional[str | Path], display: bool = True):
        self.folder = Path(folder) if folder else None
        self.display = display
        self.written: list[Path] = []

    def figure(self, fig, name: str):
        if self.display:
            figures.show(fig)
        if self.folder is not None:
            self.written.extend(figures.save_figure(fig, name, self.folder))
        return fig

    def table(self, df: pd.DataFrame, name: str) -> pd.DataFrame:
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / name
            df.to_csv(path.with_suffix(".csv"), float_format="%.6g")
            path.with_suffix(".md").write_text(figures.markdown_table(df))
            self.written.extend([path.with_suffix(".csv"), path.with_suffix(".md")])
        return df

    def summary(self) -> str:
        """Markdown list of the files saved so far."""
        return f"Wrote {len(self.written)} files to `{self.folder}`:\n\n" + "\n".join(
            f"- `{p.name}`" for p in self.written)


def load_model(model: str, vae: Optional[str] = None, device: str = "cpu", arch: Optional[str] = None):
    """The notebooks' ``MODEL``, ``VAE``, ``DEVICE`` and ``ARCH`` parameters as (model, vae): ``model`` is
    "digits"/"digits16" or a path to an official MAR checkpoint (``arch`` names its architecture when the file
    does not), ``vae`` None or a path to the KL-16 VAE that turns its latent tokens into images."""
    from lazymar.checkpoint import load_model as load_mar
    from lazymar.vae import check_vae_fits, load_vae
    mar = load_mar(model, arch=arch, device=device)
    autoencoder = None
    if vae:
        autoencoder = load_vae(vae, device=device)
        check_vae_fits(mar, autoencoder)
    return mar, autoencoder


def model_label(model: str) -> str:
    """A short name of ``MODEL`` for file names: the embedded name, or a checkpoint file's stem."""
    return Path(str(model)).stem if any(sep in str(model) for sep in ("/", "\\")) or str(model).endswith(
        (".pth", ".pt", ".ckpt", ".safetensors")) else str(model)
