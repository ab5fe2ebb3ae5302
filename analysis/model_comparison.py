"""Several models side by side (notebook 04's last section): how token and condition redundancy, the selection-layer
study and the best schedules change with the token grid (e.g. ``digits``: 8x8 tokens; ``digits16``: 16x16 tokens,
the official MAR-B/L/H layout).

Each table is tidy (one row per model and measurement, a ``model`` column first) and computed by the functions that
compute it for one model (:mod:`analysis.phenomena`, :func:`lazymar.schedules.selection_study`,
:func:`lazymar.sweep.pareto_front`); each figure draws one table with the models on shared axes. Recordings are
opened lazily (:func:`lazymar.recording.load_stats`: NetCDF or Zarr). :func:`open_models` skips a model whose
recording is missing and leaves out a sweep file that is missing, and says so in ``missing``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr
from matplotlib.figure import Figure

from lazymar.recording import STATUS_NAMES, load_stats
from lazymar.schedules import selection_study
from lazymar.schedules.selection import ALWAYS_KEPT
from lazymar.sweep import load_sweep, pareto_front

from . import phenomena
from .phenomena import AnalysisError
from .figures import STEP_LABEL, subplots

SKIPPABLE = tuple(s for s in STATUS_NAMES if s not in ALWAYS_KEPT)  # positions a token cache may reuse
UNKNOWN = ("to_predict", "masked")                                 # positions the CFG residual acts on
# V cosines of adjacent steps sit above 0.99 almost everywhere on the digits models: finer thresholds separate them
THRESHOLDS = (0.99, 0.999, 0.9999)
SUMMARY_COLUMNS = ("name", "flops_ratio", "wall_ratio", "psnr", "accuracy", "fid")


@dataclass
class Models:
    """The recordings (lazy) and sweeps of the models to compare, and what was missing (model -> message)."""

    recordings: dict[str, xr.Dataset]
    sweeps: dict[str, pd.DataFrame]
    missing: dict[str, list[str]] = field(default_factory=dict)

    def missing_markdown(self) -> str:
        """One Markdown line per model with something missing (empty when nothing is)."""
        return "\n".join(f"- **{model}**: {'; '.join(notes)}." for model, notes in self.missing.items())


def open_models(models: Mapping[str, tuple[str | Path, Optional[str | Path]] | str | Path]) -> Models:
    """``{name: (recording, sweep CSV or None)}`` (or ``{name: recording}``) opened lazily. A model whose
    recording does not exist is left out entirely, a sweep file that does not exist is left out; both are noted
    in ``missing``. A file that exists but cannot be read raises (RecordingError, SweepError)."""
    recordings, sweeps, missing = {}, {}, {}
    for name, paths in models.items():
        stats, sweep = (paths, None) if isinstance(paths, (str, Path)) else tuple(paths)
        if not Path(stats).exists():
            missing.setdefault(name, []).append(f"no recording at `{stats}`: model left out")
            continue
        recordings[name] = load_stats(stats)
        if sweep is None or str(sweep) == "none":
            missing.setdefault(name, []).append("no sweep given: left out of the schedule comparison")
        elif not Path(sweep).is_file():
            missing.setdefault(name, []).append(f"no sweep at `{sweep}`: left out of the schedule comparison")
        else:
            sweeps[name] = load_sweep(sweep)
    return Models(recordings, sweeps, missing)


def _first_last_decoder(ds: xr.Dataset) -> dict[str, str]:
    blocks = sorted((str(l) for l in ds["layer"].values if str(l).startswith("decoder.")),
                    key=lambda l: int(l.split(".")[1]))
    if not blocks:
        raise AnalysisError(f"the recording of {ds.attrs.get('model', '?')!r} has no decoder layers")
    return {"first decoder block": blocks[0], "last decoder block": blocks[-1]}


def _grid_label(ds: xr.Dataset) -> str:
    tokens = int(ds.attrs.get("seq_len", ds.sizes.get("token", 0)))
    return f"{tokens} tokens + {int(ds.attrs.get('buffer_size', 0))} buffer"


# --- token redundancy -------------------------------------------------------------------------------------------
def token_redundancy(recordings: Mapping[str, xr.Dataset], thresholds: Sequence[float] = THRESHOLDS,
                     kind: str = "v") -> pd.DataFrame:
    """Per model, decoder block (first and last), step and threshold: the fraction of the positions a token cache
    may reuse (all but those to predict now and those decoded at the previous step) whose ``kind`` feature has a
    cosine to the previous step above the threshold (:func:`analysis.phenomena.fraction_above`)."""
    frames = []
    for model, ds in recordings.items():
        roles = _first_last_decoder(ds)
        table = phenomena.fraction_above(ds, thresholds, layers=list(roles.values()), kind=kind, statuses=SKIPPABLE)
        by_layer = {layer: role for role, layer in roles.items()}
        long = table.reset_index().melt(id_vars=["layer", "step", "count"], var_name="threshold",
                                        value_name="fraction")
        long["threshold"] = long["threshold"].str.removeprefix("above_").astype(float)
        long.insert(0, "block", long["layer"].map(by_layer))
        long.insert(0, "model", model)
        frames.append(long)
    return pd.concat(frames, ignore_index=True)[["model", "block", "layer", "step", "threshold", "fraction", "count"]]


def plot_token_redundancy(table: pd.DataFrame, kind: str = "v") -> Figure:
    """One panel per decoder block (first, last), the models as colours and the thresholds as line styles."""
    blocks = list(dict.fromkeys(table["block"]))
    fig, axes = subplots(1, len(blocks), figsize=(5.2 * len(blocks), 3.6), sharex=True, sharey=True,
                             constrained_layout=True, squeeze=False)
    data = table.assign(threshold=table["threshold"].map(lambda t: f"cos > {t:g}"))
    for ax, block in zip(axes[0], blocks):
        sns.lineplot(data=data[data["block"] == block], x="step", y="fraction", hue="model", style="threshold",
                     ax=ax, legend=ax is axes[0, 0])
        ax.set_title(block, fontsize=10)
        ax.set_xlabel(STEP_LABEL)
        ax.set_ylabel("fraction of reusable positions")
        ax.set_ylim(-0.02, 1.02)
    fig.suptitle(f"Token redundancy ({kind.upper()} cosine to the previous step; positions not to predict and not "
                 f"just decoded)", fontsize=10)
    return fig


# --- condition redundancy ---------------------------------------------------------------------------------------
def condition_redundancy(recordings: Mapping[str, xr.Dataset], layers: Sequence[str] = ("z",)) -> pd.DataFrame:
    """Per model, layer and step: the mean cosine of the CFG residual r = cond - uncond to the previous step on the
    unknown positions (:func:`analysis.phenomena.step_layer_matrix`). Steps without a value are left out."""
    frames = []
    for model, ds in recordings.items():
        matrix = phenomena.step_layer_matrix(ds, "mean", variable="cfg_residual_cosine", statuses=UNKNOWN,
                                             layers=list(layers))
        frame = matrix.to_dataframe(name="residual_cosine").reset_index()[["layer", "step", "residual_cosine"]]
        frame.insert(0, "model", model)
        frames.append(frame.dropna(subset=["residual_cosine"]))
    return pd.concat(frames, ignore_index=True)


def plot_condition_redundancy(table: pd.DataFrame) -> Figure:
    """1 - mean residual cosine per step on a log axis (cosines sit near 1), one line per model and layer."""
    fig, ax = subplots(figsize=(7, 3.4), constrained_layout=True)
    data = table.assign(change=np.maximum(1.0 - table["residual_cosine"], 1e-7))
    several = data["layer"].nunique() > 1
    sns.lineplot(data=data, x="step", y="change", hue="model", style="layer" if several else None, ax=ax)
    ax.set_yscale("log")
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel("1 − mean cos(r_s, r_{s−1})")
    layers = ", ".join(dict.fromkeys(table["layer"]))
    ax.set_title(f"Condition redundancy: change of the CFG residual at {layers}, unknown positions", fontsize=10)
    return fig


# --- selection layer --------------------------------------------------------------------------------------------
def selection_layers(recordings: Mapping[str, xr.Dataset]) -> pd.DataFrame:
    """Per model and decoder block: the selection-layer study (lazymar.schedules.selection_study; the one
    RedundancyProfile.from_stats keeps as ``selection``): Spearman and AUROC with standard errors, and which
    block it recommends."""
    frames = []
    for model, ds in recordings.items():
        study = selection_study(ds).reset_index()
        study.insert(0, "grid", _grid_label(ds))
        study.insert(0, "model", model)
        frames.append(study)
    return pd.concat(frames, ignore_index=True).rename(columns={"index": "block"})


def plot_selection_layers(table: pd.DataFrame) -> Figure:
    """Grouped bars per decoder block (AUROC and Spearman panels), one colour per model, standard errors as
    error bars; the recommended block of each model is outlined."""
    models = list(dict.fromkeys(table["model"]))
    blocks = sorted(table["block"].unique())
    width = 0.8 / len(models)
    colors = sns.color_palette(n_colors=len(models))
    fig, axes = subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    for ax, (metric, label) in zip(axes, (("auroc", "AUROC (top 20% most changing)"),
                                          ("spearman", "Spearman vs last block's change"))):
        for j, model in enumerate(models):
            rows = table[table["model"] == model].set_index("block").reindex(blocks)
            x = np.arange(len(blocks)) - 0.4 + width * (j + 0.5)
            bars = ax.bar(x, rows[metric], width * 0.95, yerr=rows[f"{metric}_se"], color=colors[j], capsize=2,
                          label=model)
            for bar, chosen in zip(bars, rows["recommended"].fillna(False).astype(bool)):
                if chosen:
                    bar.set(edgecolor="black", linewidth=1.6)
        ax.set_xticks(range(len(blocks)), [f"decoder.{b}" for b in blocks])
        ax.set_xlabel("selection layer (decoder block)")
        ax.set_ylabel(label)
    axes[0].axhline(0.5, color="gray", linestyle="--", linewidth=0.8)
    axes[0].legend(fontsize=8, title="model (outlined: recommended)", title_fontsize=7)
    fig.suptitle("Selection-layer study: how well each block's V similarity ranks the positions that change",
                 fontsize=10)
    return fig


# --- best schedules ---------------------------------------------------------------------------------------------
def pareto_fronts(sweeps: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Each sweep's Pareto front in (FLOPs ratio, PSNR) (lazymar.sweep.pareto_front), a ``model`` column first."""
    frames = [pareto_front(sweep).assign(model=model) for model, sweep in sweeps.items()]
    if not frames:
        return pd.DataFrame(columns=["model", *SUMMARY_COLUMNS, "family"])
    table = pd.concat(frames, ignore_index=True)
    return table[["model"] + [c for c in table.columns if c != "model"]]


def best_schedules(sweeps: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per model: the lazymar preset's row and the best derived row of its sweep. The best derived row is the one
    with the highest FLOPs ratio among the derived rows whose PSNR and FID are no worse than the preset's
    (``no_worse_than_lazymar`` True); when none is, the derived row on the Pareto front with the highest FLOPs
    ratio (``no_worse_than_lazymar`` False). Rows: (model, row) with row "lazymar preset" or "best derived"."""
    rows = []
    for model, sweep in sweeps.items():
        preset = sweep[sweep["name"] == "lazymar"]
        preset = preset.iloc[0] if len(preset) else None
        derived = sweep[sweep["family"] == "derived"]
        if preset is not None:
            rows.append({"model": model, "row": "lazymar preset", **{c: preset.get(c) for c in SUMMARY_COLUMNS},
                         "no_worse_than_lazymar": True})
        if not len(derived):
            continue
        good = derived
        if preset is not None:
            fid_ok = derived["fid"].isna() | np.isnan(preset["fid"]) | (derived["fid"] <= preset["fid"])
            good = derived[(derived["psnr"] >= preset["psnr"]) & fid_ok]
        pool = good if len(good) else derived[derived.index.isin(pareto_front(sweep).index)]
        pool = pool if len(pool) else derived
        best = pool.sort_values(["flops_ratio", "psnr"], ascending=False, kind="stable").iloc[0]
        rows.append({"model": model, "row": "best derived", **{c: best.get(c) for c in SUMMARY_COLUMNS},
                     "no_worse_than_lazymar": bool(len(good))})
    columns = ["model", "row", *SUMMARY_COLUMNS, "no_worse_than_lazymar"]
    return pd.DataFrame(rows, columns=columns).set_index(["model", "row"])


def plot_tradeoffs(sweeps: Mapping[str, pd.DataFrame], best: Optional[pd.DataFrame] = None) -> Figure:
    """FLOPs ratio vs PSNR: every finite sweep point (faint), each model's Pareto front (line) and, with ``best``
    (from :func:`best_schedules`), its lazymar preset (square) and best derived row (star)."""
    fig, ax = subplots(figsize=(7, 4.2), constrained_layout=True)
    colors = dict(zip(sweeps, sns.color_palette(n_colors=max(1, len(sweeps)))))
    for model, sweep in sweeps.items():
        finite = sweep[np.isfinite(sweep["flops_ratio"]) & np.isfinite(sweep["psnr"])]
        ax.scatter(finite["flops_ratio"], finite["psnr"], s=10, color=colors[model], alpha=0.25)
        front = pareto_front(finite).sort_values("flops_ratio")
        ax.plot(front["flops_ratio"], front["psnr"], "-o", color=colors[model], markersize=3, linewidth=1.2,
                label=f"{model}: Pareto front")
        if best is not None and model in best.index.get_level_values("model"):
            for row, marker in (("lazymar preset", "s"), ("best derived", "*")):
                if (model, row) in best.index:
                    r = best.loc[(model, row)]
                    ax.scatter([r["flops_ratio"]], [r["psnr"]], marker=marker, s=90, color=colors[model],
                               edgecolor="black", zorder=5, label=f"{model}: {row} ({r['name']})")
    if not sweeps:
        ax.text(0.5, 0.5, "no sweep to compare", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("FLOPs ratio (uncached / cached)")
    ax.set_ylabel("PSNR vs uncached (dB)")
    ax.set_title("Best schedules per model: speed / fidelity", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return fig
