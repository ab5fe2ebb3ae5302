"""Selection-layer study: which decoder block's similarity best ranks positions by how much they change.

The token cache decides at one decoder block (the selection layer) which positions the later blocks recompute: the
least similar to the previous step. The ideal ranking is by the change that matters, the change of the last decoder
block's output. For each decoder block l, per (sample, step) over the positions the cache may skip (all except the
always-kept ones: to predict now, decoded at the previous step):

- Spearman correlation between the block's dissimilarity (1 - cosine of V, or of another recorded kind) and the
  last block's output change (1 - cosine);
- AUROC of that dissimilarity for finding the top ``top_fraction`` (20%) most changing positions (probability that
  a top position outranks another; ties count half).

Both are averaged over (sample, step); the recording is read one chunk of samples at a time. A block earlier in the decoder saves more (the later blocks run on the kept
positions only), so the recommendation is the earliest block, among those that have later blocks, whose AUROC is
within ``tolerance`` of the best of them.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd
import xarray as xr
from scipy.stats import rankdata

from ..errors import LazymarError
from ..recording import STATUS_CODES
from ..tables import markdown_table
from .levels import sample_chunks

ALWAYS_KEPT = ("to_predict", "new")


class SelectionStudyError(LazymarError):
    """A recording the selection-layer study cannot use; the message names the problem."""


def _decoder_layers(ds: xr.Dataset) -> list[str]:
    layers = [str(l) for l in ds["layer"].values if str(l).startswith("decoder.")]
    return sorted(layers, key=lambda l: int(l.split(".")[1]))


def _scores(ranks_pred: np.ndarray, ranks_target: np.ndarray, top_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Spearman and AUROC per row of (rows, m) rank arrays (1 = smallest)."""
    m = ranks_pred.shape[1]
    a = ranks_pred - ranks_pred.mean(1, keepdims=True)
    b = ranks_target - ranks_target.mean(1, keepdims=True)
    denominator = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        spearman = np.where(denominator > 0, (a * b).sum(1) / denominator, np.nan)
    k = max(1, int(math.ceil(top_fraction * m)))
    if k >= m:
        return spearman, np.full(len(spearman), np.nan)
    # positives: the k most changing positions (ties at the boundary broken by position, deterministically)
    order = np.argsort(-ranks_target, axis=1, kind="stable")[:, :k]
    positive = np.zeros_like(ranks_pred, dtype=bool)
    np.put_along_axis(positive, order, True, axis=1)
    rank_sum = np.where(positive, ranks_pred, 0.0).sum(1)
    auroc = (rank_sum - k * (k + 1) / 2) / (k * (m - k))
    return spearman, auroc


def selection_study(ds: xr.Dataset, kind: str = "v", top_fraction: float = 0.2, tolerance: float = 0.02,
                    target_layer: Optional[str] = None) -> pd.DataFrame:
    """One row per decoder block: spearman, auroc (means over sample and step), their standard errors, the number
    of (sample, step) pairs, and ``recommended``. ``attrs["recommended"]`` is the recommended block's index."""
    if kind not in [str(k) for k in ds["kind"].values]:
        raise SelectionStudyError(f"unknown feature kind {kind!r}; the recording has {list(map(str, ds['kind'].values))}")
    if not 0 < top_fraction < 1:
        raise SelectionStudyError(f"top_fraction must lie in (0, 1), got {top_fraction}")
    layers = _decoder_layers(ds)
    if len(layers) < 2:
        raise SelectionStudyError("the selection-layer study needs a decoder with at least two blocks")
    target_layer = target_layer or layers[-1]
    skippable = ~ds["status"].isin([STATUS_CODES[name] for name in ALWAYS_KEPT])  # (n, S, P)
    counts = skippable.sum("position").values  # (n, S): small
    steps = [s for s in range(ds.sizes["step"]) if counts[0, s] >= 2 and (counts[:, s] == counts[0, s]).all()]
    cos = ds["token_cosine"]
    spearman: dict[str, list] = {layer: [] for layer in layers}
    auroc: dict[str, list] = {layer: [] for layer in layers}
    for chunk in sample_chunks(cos):  # pairs (sample, step) are scored independently: one chunk at a time
        keep_chunk = skippable.isel(sample=chunk).values
        target = 1.0 - cos.isel(sample=chunk).sel(layer=target_layer, kind="output").values  # (n_c, S, P)
        for layer in layers:
            pred = 1.0 - cos.isel(sample=chunk).sel(layer=layer, kind=kind).values
            for s in steps:
                keep, m = keep_chunk[:, s], int(counts[0, s])
                p = pred[:, s][keep].reshape(-1, m)
                t = target[:, s][keep].reshape(-1, m)
                valid = np.isfinite(p).all(1) & np.isfinite(t).all(1)
                if not valid.any():
                    continue
                sp, au = _scores(rankdata(p[valid], axis=1), rankdata(t[valid], axis=1), top_fraction)
                spearman[layer].append(sp)
                auroc[layer].append(au)
    rows = []
    for layer in layers:
        sp = np.concatenate(spearman[layer]) if spearman[layer] else np.array([np.nan])
        au = np.concatenate(auroc[layer]) if auroc[layer] else np.array([np.nan])
        rows.append({"layer": layer, "index": int(layer.split(".")[1]),
                     "spearman": float(np.nanmean(sp)) if np.isfinite(sp).any() else math.nan,
                     "spearman_se": _se(sp), "auroc": float(np.nanmean(au)) if np.isfinite(au).any() else math.nan,
                     "auroc_se": _se(au), "pairs": int(np.isfinite(au).sum())})
    table = pd.DataFrame(rows).set_index("layer")
    candidates = table.iloc[:-1]  # the last block has no later blocks to run on fewer positions
    scores = candidates["auroc"].fillna(-np.inf)
    best = scores.max()
    recommended = int(candidates.loc[scores >= best - tolerance, "index"].min()) if np.isfinite(best) \
        else int(candidates["index"].min())
    table["recommended"] = table["index"] == recommended
    table.attrs.update(recommended=recommended, kind=kind, target_layer=target_layer, top_fraction=top_fraction,
                       tolerance=tolerance)
    return table


def _se(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.std(ddof=1) / math.sqrt(len(finite))) if len(finite) > 1 else math.nan


def selection_markdown(table: pd.DataFrame) -> str:
    """The study as a markdown table."""
    return markdown_table(["layer", "Spearman", "AUROC (top 20%)", "recommended"],
                          [[layer, f"{r.spearman:.3f} ± {r.spearman_se:.3f}", f"{r.auroc:.3f} ± {r.auroc_se:.3f}",
                            "yes" if r.recommended else ""] for layer, r in table.iterrows()])
