"""The speed/quality trade-off sweep: schedules and baselines run on one fixed set of seeds, and the Pareto front.

Every point is compared with the uncached sampler at the model's defaults on the same labels and seeds (batch i
uses seed + i): ``flops_ratio`` (uncached FLOPs / the point's, flops-module accounting of what ran), ``wall_ratio``
(uncached seconds / the point's, same process, one timed run each: on a shared CPU it is indicative only), ``psnr``
and ``token_mse`` of the images against the uncached images, and ``accuracy`` and ``fid`` (digits classifier and
digits-FID; FID on ~100 samples is noisy: compare points of one sweep, not with other sample sizes).

Families: ``none`` (the reference itself), ``lazymar`` (the preset), ``derived`` (analysis.derive), and the
baselines ``fewer_steps`` (no cache, fewer MAR steps at about the same FLOPs), ``fixed_interval`` (refresh every k
steps; the steps between reuse everything except the always-kept positions after decoder block 0, and the
condition cache), ``random`` (a schedule's keep fractions with random instead of similarity selection).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from lazymar.cache.bench import run_schedule
from lazymar.cache.schedule import CacheSchedule, HeadCachePolicy, none_schedule
from lazymar.model import MAR
from lazymar.sampling import SamplingSettings
from lazymar.errors import LazymarError

COLUMNS = ("name", "family", "params", "flops_ratio", "wall_ratio", "psnr", "token_mse", "accuracy", "fid",
           "pareto")
FAMILIES = ("none", "lazymar", "derived", "fewer_steps", "fixed_interval", "random")


class SweepError(LazymarError):
    """A sweep file or table that cannot be used; the message names the problem."""


# --- reading and the front -------------------------------------------------------------------------------------
def pareto_front(df: pd.DataFrame, x: str = "flops_ratio", y: str = "psnr") -> pd.DataFrame:
    """The rows not dominated in (higher ``x``, higher ``y``), sorted by ``x``. A row is dominated when another
    has x and y at least as high and one of them strictly higher. Rows with NaN in x or y are left out;
    infinite y (identical to the reference) counts as the highest."""
    for col in (x, y):
        if col not in df.columns:
            raise SweepError(f"the table has no column {col!r}")
    data = df[np.isfinite(df[x].astype(float)) & ~df[y].astype(float).isna()]
    order = data.sort_values([x, y], ascending=[False, False], kind="stable")
    keep, best_y = [], -math.inf
    for index, row in order.iterrows():
        value = float(row[y])
        if value > best_y:
            keep.append(index)
            best_y = value
    # equal x: only the best y survives (the sort put it first); equal (x, y) duplicates: the first kept
    return df.loc[keep].sort_values(x, kind="stable")


def mark_pareto(df: pd.DataFrame, x: str = "flops_ratio", y: str = "psnr") -> pd.DataFrame:
    """A copy of ``df`` with a boolean ``pareto`` column (membership of :func:`pareto_front`)."""
    out = df.copy()
    out["pareto"] = out.index.isin(pareto_front(df, x, y).index)
    return out


def load_sweep(path: str | Path) -> pd.DataFrame:
    """A sweep CSV (see :data:`COLUMNS`); ``params`` stays a JSON string (``json.loads`` it per row), numbers are
    floats ("inf" PSNR for the reference), ``pareto`` bool."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise SweepError(f"{path} is not a sweep CSV ({err})") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise SweepError(f"{path} lacks the column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}")
    for col in ("flops_ratio", "wall_ratio", "psnr", "token_mse", "accuracy", "fid"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    df["pareto"] = df["pareto"].astype(str).str.lower().isin(("true", "1"))
    return df


def front_markdown(df: pd.DataFrame, columns: Sequence[str] = ("name", "family", "flops_ratio", "wall_ratio",
                                                               "psnr", "accuracy", "fid")) -> str:
    """Rows as a markdown table (numbers rounded)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in df.iterrows():
        cells = []
        for c in columns:
            v = row[c]
            if isinstance(v, (float, np.floating)):
                cells.append("inf" if math.isinf(v) else f"{v:.3f}" if c in ("accuracy", "token_mse") else f"{v:.2f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- running points --------------------------------------------------------------------------------------------
@dataclass
class SweepPoint:
    """One thing to run: a schedule under sampling settings (num_iter may differ from the reference's)."""

    name: str
    family: str
    schedule: CacheSchedule
    settings: Optional[SamplingSettings] = None  # None: the reference settings
    params: dict = field(default_factory=dict)


class Reference:
    """The uncached run on fixed labels and seeds, and fidelity against it. ``psnr(schedule)`` is the measure
    that :func:`analysis.derive.search_budget` expects."""

    def __init__(self, model: MAR, labels: Sequence[int], settings: SamplingSettings, seed: int = 0,
                 batch_size: int = 100):
        self.model, self.labels, self.settings = model, list(labels), settings
        self.seed, self.batch_size = seed, batch_size
        self.schedule = none_schedule(settings.num_iter)
        start = time.perf_counter()
        self.tokens, self.flops = run_schedule(model, self.labels, settings, self.schedule, seed, batch_size)
        self.seconds = time.perf_counter() - start
        self.images = self.to_images(self.tokens)

    def to_images(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.unpatchify(tokens).detach().cpu().float()

    def run(self, schedule: CacheSchedule, settings: Optional[SamplingSettings] = None) -> dict:
        """Run ``schedule`` on the reference labels and seeds: tokens, images, FLOPs, seconds, fidelity."""
        from lazymar.metrics import psnr, token_mse
        settings = settings or self.settings
        start = time.perf_counter()
        tokens, ledger = run_schedule(self.model, self.labels, settings, schedule, self.seed, self.batch_size)
        seconds = time.perf_counter() - start
        images = self.to_images(tokens)
        return {"tokens": tokens, "images": images, "flops": ledger.total, "seconds": seconds,
                "flops_ratio": self.flops.total / ledger.total, "wall_ratio": self.seconds / seconds,
                "psnr": psnr(images, self.images, data_range=2.0),
                "token_mse": token_mse(tokens.cpu(), self.tokens.cpu())}

    def psnr(self, schedule: CacheSchedule) -> float:
        return float(self.run(schedule)["psnr"])


def evaluate_images(images: torch.Tensor, labels: Sequence[int]) -> dict:
    """Accuracy and digits-FID (lazymar.metrics)."""
    from lazymar.metrics import evaluate_digits
    out = evaluate_digits(images, torch.tensor(list(labels)))
    return {"accuracy": out["accuracy"], "fid": out["fid"], "fid_floor": out["fid_floor"]}


def run_sweep(reference: Reference, points: Iterable[SweepPoint], quality: bool = True,
              progress: bool = True) -> pd.DataFrame:
    """One row per point (plus the reference, family "none"), the Pareto column in (flops_ratio, psnr)."""
    points = list(points)
    rows = []
    base = {"name": "none", "family": "none", "params": json.dumps({"num_iter": reference.settings.num_iter}),
            "flops_ratio": 1.0, "wall_ratio": 1.0, "psnr": math.inf, "token_mse": 0.0,
            "seconds": reference.seconds, "num_samples": len(reference.labels)}
    if quality:
        base.update(evaluate_images(reference.images, reference.labels))
    rows.append(base)
    for point in tqdm(points, desc="sweep", unit="point", disable=not progress):
        result = reference.run(point.schedule, point.settings)
        row = {"name": point.name, "family": point.family, "params": json.dumps(point.params, sort_keys=True),
               **{k: result[k] for k in ("flops_ratio", "wall_ratio", "psnr", "token_mse", "seconds")},
               "num_samples": len(reference.labels)}
        if quality:
            row.update(evaluate_images(result["images"], reference.labels))
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in df.columns and col != "pareto":
            df[col] = np.nan
    df = mark_pareto(df)
    return df[list(COLUMNS) + [c for c in df.columns if c not in COLUMNS]]


def save_sweep(df: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False, float_format="%.6g")
    return path


# --- baselines -------------------------------------------------------------------------------------------------
def fewer_steps_point(reference_settings: SamplingSettings, config, target_ratio: float) -> SweepPoint:
    """No cache, the MAR step count whose FLOPs ratio against the reference is closest to ``target_ratio``. Its
    head hoists the invariants (exact, as every cached schedule here does), so the comparison is fair."""
    from .derive import predicted_flops
    use_cfg = reference_settings.cfg != 1.0
    full = reference_settings.num_iter

    def schedule(n: int) -> CacheSchedule:
        return none_schedule(n).with_changes(head_cache=[True] * n, head=HeadCachePolicy(hoist_invariants=True),
                                             name=f"steps-{n}")

    def ratio(n: int) -> float:
        base = predicted_flops(none_schedule(full), config, use_cfg)["total"]
        return base / predicted_flops(schedule(n), config, use_cfg)["total"]

    best = min(range(1, full + 1), key=lambda n: abs(ratio(n) - target_ratio))
    return SweepPoint(name=f"steps-{best}", family="fewer_steps", schedule=schedule(best),
                      settings=replace(reference_settings, num_iter=best), params={"num_iter": best})


def fixed_interval_point(num_iter: int, interval: int) -> SweepPoint:
    """Refresh every ``interval`` steps; steps between recompute only the always-kept positions after block 0
    and use the condition cache; the head runs exactly (invariants hoisted)."""
    refresh = [s % interval == 0 for s in range(num_iter)]
    schedule = CacheSchedule(num_iter=num_iter, refresh=refresh, keep_fraction=[1.0 if r else 0.0 for r in refresh],
                             condition_cache=[not r for r in refresh], head_cache=[True] * num_iter,
                             name=f"fixed-{interval}", selection="status", selection_layer=0,
                             head=HeadCachePolicy(hoist_invariants=True))
    return SweepPoint(name=schedule.name, family="fixed_interval", schedule=schedule, params={"interval": interval})


def random_point(point: SweepPoint, seed: int = 0) -> SweepPoint:
    """``point``'s schedule with random token selection (same keep fractions, so the same FLOPs)."""
    schedule = point.schedule.with_changes(selection="random", seed=seed, name=point.schedule.name + "-random")
    return SweepPoint(name=schedule.name, family="random", schedule=schedule,
                      params={**point.params, "selection": "random", "of": point.name})
