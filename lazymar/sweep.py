"""The speed/quality trade-off sweep: schedules and baselines run on one fixed set of seeds, and the Pareto front.

Every point is compared with the uncached sampler at the model's defaults on the same plan (labels, batches and
seeds; lazymar.runs.Reference, which computes every metric): ``flops_ratio`` (uncached FLOPs / the point's,
flops-module accounting of what ran), ``wall_ratio`` (uncached seconds / the point's, same process, one timed run
each: on a shared CPU it is indicative only), ``psnr`` (image space, data range 2) and ``token_mse`` against the
uncached run, and ``accuracy`` and ``fid`` (digits classifier and digits-FID; FID on ~100 samples is noisy: compare
points of one sweep, not with other sample sizes), beside ``roughness`` and ``roughness_real`` and, for digits16,
``fid32`` (quality at the model's own resolution, lazymar.metrics). For a VAE model with ``--fid-stats`` the
quality columns are ImageNet ``fid``, ``inception_score`` and ``inception_score_std`` instead (lazymar.imagenet),
and PSNR is taken on the VAE-decoded images, decoded again chunk by chunk rather than kept.

Families: ``none`` (the reference itself), ``lazymar`` (the preset), ``derived`` (lazymar.schedules), and the
baselines ``fewer_steps`` (no cache, fewer MAR steps at about the same FLOPs), ``fixed_interval`` (refresh every k
steps; the steps between reuse everything except the always-kept positions after decoder block 0, and the
condition cache), ``random`` (a schedule's keep fractions with random instead of similarity selection).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .cache.schedule_file import CacheSchedule, HeadCachePolicy, ScheduleChoice, none_schedule
from .errors import LazymarError
from .runs import Reference
from .sampling import SamplingSettings
from .tables import markdown_table

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


NATIVE_QUALITY = ("fid32", "roughness", "roughness_real")  # quality at the model's own resolution, where measured


def front_markdown(df: pd.DataFrame, columns: Optional[Sequence[str]] = None) -> str:
    """Rows as a markdown table (numbers rounded; ``value [low, high]`` where the table has the column's
    ``_ci_low``/``_ci_high``: the 95 % interval). Default columns: name, family, FLOPs and wall ratios, PSNR,
    accuracy, FID, and those of :data:`NATIVE_QUALITY` the table has."""
    if columns is None:
        columns = ["name", "family", "flops_ratio", "wall_ratio", "psnr", "accuracy", "fid",
                   *[c for c in NATIVE_QUALITY if c in df.columns]]
    rows = []
    for _, row in df.iterrows():
        cells = []
        for c in columns:
            v = row[c]
            if f"{c}_ci_low" in row.index and isinstance(v, (float, np.floating)) and not np.isnan(v):
                from .runs.intervals import cell
                cells.append(cell(float(v), row[f"{c}_ci_low"], row[f"{c}_ci_high"],
                                  3 if c in ("accuracy", "token_mse", "roughness", "roughness_real") else 2))
            elif isinstance(v, (float, np.floating)):
                cells.append("inf" if math.isinf(v) else f"{v:.3f}" if c in ("accuracy", "token_mse", "roughness",
                                                                            "roughness_real") else f"{v:.2f}")
            else:
                cells.append(str(v))
        rows.append(cells)
    return markdown_table(columns, rows)


# --- running points --------------------------------------------------------------------------------------------
@dataclass
class SweepPoint:
    """One thing to run: a schedule under sampling settings (num_iter may differ from the reference's)."""

    name: str
    family: str
    schedule: CacheSchedule
    settings: Optional[SamplingSettings] = None  # None: the reference settings
    params: dict = field(default_factory=dict)


def run_sweep(reference: Reference, points: Iterable[SweepPoint], quality: bool = True,
              progress: bool = True, runs: Optional[dict] = None) -> pd.DataFrame:
    """One row per point (plus the reference, family "none"), the Pareto column in (flops_ratio, psnr).
    ``runs``: a dict that receives each row's finished run by name (for intervals, lazymar.runs.intervals)."""
    points = list(points)
    keys = ("flops_ratio", "wall_ratio", "psnr", "token_mse", "seconds")
    quality_keys = reference.evaluator.keys if quality and reference.evaluator is not None else ()
    base = reference.row(quality)
    if runs is not None:
        runs["none"] = reference.run
    rows = [{"name": "none", "family": "none", "params": json.dumps({"num_iter": reference.settings.num_iter}),
             **{k: base.get(k) for k in keys + quality_keys}, "num_samples": reference.plan.num_samples}]
    for point in tqdm(points, desc="sweep", unit="point", disable=not progress):
        run, result = reference.measure(point.schedule, point.settings, quality=quality, name=point.name)
        if runs is not None:
            runs[point.name] = run
        rows.append({"name": point.name, "family": point.family, "params": json.dumps(point.params, sort_keys=True),
                     **{k: result.get(k) for k in keys + quality_keys}, "num_samples": reference.plan.num_samples})
    df = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in df.columns and col != "pareto":
            df[col] = np.nan
    df["psnr"] = df["psnr"].astype(float)  # None (no image space) -> NaN
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
    from .schedules import predicted_flops
    use_cfg = reference_settings.cfg != 1.0
    full = reference_settings.num_iter

    def schedule(n: int) -> CacheSchedule:
        return none_schedule(n).with_changes(head_cache=[True] * n, head=HeadCachePolicy(hoist_invariants=True),
                                             name=f"steps-{n}")

    def ratio(n: int) -> float:
        base = predicted_flops(schedule(full), config, use_cfg)["total"]  # the exact sampler: hoisted too
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


# --- the committed sweep ---------------------------------------------------------------------------------------
# thresholds of the derived grid points of the default sweep, besides the schedule files given with --schedule
DERIVED_GRID = [
    dict(token_quantile=0.5, tau_refresh=6.0, tau_cfg=0.9995, selection_layer=1, tau_head=0.1),
    dict(token_quantile=0.0, tau_refresh=8.0, tau_cfg=0.999, selection_layer=0, tau_head=0.2),
    dict(token_quantile=0.0, tau_refresh=12.0, tau_cfg=0.995, selection_layer=0, tau_head=0.4),
    dict(token_quantile=0.0, tau_refresh=24.0, tau_cfg=0.99, selection_layer=0, tau_head=0.8),
    dict(token_quantile=0.0, tau_refresh=6.0, tau_cfg=1.0, selection_layer=0, tau_head=0.6, tau_buffer=0.999),
]


def default_stats(model: str = "digits") -> Path:
    """The committed recording of an embedded model (found from the package, not the working directory):
    data/stats/<model>.nc or <model>.zarr. Other models have none: their sweeps need --stats or --no-defaults."""
    from .checkpoint import DATA_DIR, EMBEDDED
    if model not in EMBEDDED:
        raise SweepError(f"no committed recording for {model!r}; pass --stats (a `lazymar record` output) "
                         "or --no-defaults with --schedule")
    nc = DATA_DIR / "stats" / f"{model}.nc"
    return nc if nc.exists() else DATA_DIR / "stats" / f"{model}.zarr"


def schedule_point(spec: "str | Path | ScheduleChoice", settings: SamplingSettings, config) -> SweepPoint:
    """The sweep point of a schedule given by name (a preset: family "lazymar" for the lazymar ones, else
    "derived") or JSON file (family "derived", named by the file's stem), loaded for ``settings``' steps."""
    from .cache.schedule_file import load_schedule
    schedule = load_schedule(spec, settings.num_iter, config)
    text = str(spec)
    is_file = text.endswith(".json")
    return SweepPoint(Path(text).stem if is_file else text,
                      "lazymar" if text.startswith("lazymar") and not is_file else "derived", schedule,
                      params={"schedule": text, "schedule_name": schedule.name})


def baseline_point(spec: Optional[str], points: Sequence[SweepPoint], settings: SamplingSettings,
                   config) -> Optional[SweepPoint]:
    """The sweep point ``--baseline`` names: a point of the sweep by name, else the schedule (preset or JSON file)
    it names; None for 'none' (the uncached reference row)."""
    if spec is None or str(spec) == "none":
        return None
    for point in points:
        if point.name == str(spec):
            return point
    return schedule_point(spec, settings, config)


def default_points(profile, reference_settings: SamplingSettings, config, extra: list[SweepPoint]) -> list[SweepPoint]:
    """The committed sweep: the lazymar preset, ``extra`` (e.g. the derived schedules of data/schedules/), the
    derived thresholds of :data:`DERIVED_GRID` on ``profile`` (a lazymar.schedules.RedundancyProfile), and the
    baselines: fewer MAR steps at the FLOPs of lazymar and of the fastest schedule, fixed-interval reuse every 4
    and 8 steps, and random token selection in place of the similarity ranking for lazymar and for the derived
    schedule closest to lazymar's FLOPs."""
    from .cache.schedule_file import load_schedule
    from .schedules import derive_schedule, predicted_flops
    use_cfg = reference_settings.cfg != 1.0
    lazymar = SweepPoint("lazymar", "lazymar", load_schedule("lazymar", reference_settings.num_iter, config),
                         params={"preset": "lazymar"})
    grid = []
    for params in DERIVED_GRID:
        params = dict(params)
        params["tau_token"] = profile.tau_token_at(params.pop("token_quantile"), params["selection_layer"])
        d = derive_schedule(profile, **params)
        grid.append(SweepPoint(d.schedule.name, "derived", d.schedule, params=d.params))
    derived = extra + grid
    ratio = {id(p): predicted_flops(p.schedule, config, use_cfg)["ratio"] for p in [lazymar] + derived}
    points = [lazymar] + derived
    fastest = max(ratio.values())
    points.append(fewer_steps_point(reference_settings, config, ratio[id(lazymar)]))
    points.append(fewer_steps_point(reference_settings, config, fastest))
    for interval in (4, 8):
        points.append(fixed_interval_point(reference_settings.num_iter, interval))
    points.append(random_point(lazymar))
    if derived:
        closest = min(derived, key=lambda p: abs(ratio[id(p)] - ratio[id(lazymar)]))
        points.append(random_point(closest))
    unique, seen = [], set()
    for p in points:  # e.g. two fewer-steps targets that land on the same step count
        if p.name not in seen:
            seen.add(p.name)
            unique.append(p)
    return unique
