"""Searches over derived schedules: the best fidelity within a FLOPs budget, or the highest FLOPs ratio above a
fidelity floor (``lazymar derive --target-flops-ratio`` / ``--min-psnr``).

Every point of a threshold grid is derived (a few seconds); the error model (:mod:`lazymar.schedules.error_model`),
calibrated by measuring one probe schedule per component against the uncached run, ranks the candidates, and the
best few are measured (PSNR vs uncached on fixed seeds); the measured best wins.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product
from typing import Callable, Iterable, Optional

from tqdm.auto import tqdm

from ..cache.schedule_file import CacheSchedule
from .derive import DerivedSchedule, derive_schedule
from .error_model import ErrorModel, calibrate_error_model, error_components, uncalibrated_error_model
from .profile import DerivationError, RedundancyProfile

DEFAULT_GRID = {
    # tau_token as quantiles of the selection layer's similarity (0: only the always-kept positions)
    "token_quantile": (0.0, 0.25, 0.5, 0.75),
    "tau_refresh": (4.0, 6.0, 8.0, 10.0, 12.0, 16.0, 24.0, 1e9),
    "tau_cfg": (0.9, 0.99, 0.995, 0.998, 0.999, 0.9995, 1.0),
    "tau_head": (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8),
    "tau_buffer": (1.0, 0.999, 0.998),
}
def candidate_schedules(profile: RedundancyProfile, grid: Optional[dict] = None,
                        layers: Optional[Iterable[int]] = None, progress: bool = False,
                        flops_batch_size: int = 1) -> list[DerivedSchedule]:
    """Every grid point derived (duplicate schedules dropped), sorted by predicted FLOPs ratio. ``grid`` may give
    "tau_token" values directly instead of "token_quantile"s."""
    grid = {**DEFAULT_GRID, **(grid or {})}
    layers = list(range(profile.decoder_depth - 1)) if layers is None else list(layers)
    points = []
    for layer in layers:
        if "tau_token" in grid:
            tokens = list(grid["tau_token"])
        else:
            tokens = [profile.tau_token_at(q, layer) for q in grid["token_quantile"]]
        points += [(t, r, c, h, b, layer) for t, r, c, h, b in product(
            tokens, grid["tau_refresh"], grid["tau_cfg"], grid["tau_head"], grid["tau_buffer"])]
    seen, out = set(), []
    for t, r, c, h, b, l in tqdm(points, desc="derive", unit="schedule", disable=not progress):
        d = derive_schedule(profile, tau_token=t, tau_refresh=r, tau_cfg=c, selection_layer=l, tau_head=h,
                            tau_buffer=b, flops_batch_size=flops_batch_size)
        key = d.schedule.with_changes(name="")  # frozen and hashable: equal plans under different names
        if key not in seen:
            seen.add(key)
            out.append(d)
    return sorted(out, key=lambda d: d.predicted_flops_ratio)


@dataclass
class SearchResult:
    best: DerivedSchedule
    measured: list[dict]       # the probes and candidates measured: name, role, thresholds, ratio, PSNR, ...
    considered: int
    error_model: ErrorModel


def _row(profile: RedundancyProfile, d: DerivedSchedule, model: ErrorModel, psnr: float, role: str) -> dict:
    return {"name": d.schedule.name, "role": role, **d.params, "predicted_flops_ratio": d.predicted_flops_ratio,
            "predicted_psnr": model.psnr(error_components(profile, d)) if model.calibrated else None,
            "psnr": psnr}


def search_budget(profile: RedundancyProfile, target_flops_ratio: float,
                  measure: Optional[Callable[[CacheSchedule], float]] = None, num_measured: int = 4,
                  band: float = 0.15, grid: Optional[dict] = None, progress: bool = False,
                  flops_batch_size: int = 1) -> SearchResult:
    """The schedule with predicted FLOPs ratio >= ``target_flops_ratio`` and the best fidelity.

    The candidates within ``band`` (relative) above the budget are ranked by the error model; with ``measure``
    (schedule -> PSNR in dB vs uncached, e.g. ``lazymar.runs.Reference.psnr``) the model is first calibrated
    on one probe per component, then the ``num_measured`` best-predicted candidates are measured and the highest
    measured PSNR wins. Without ``measure`` the best-predicted (uncalibrated) candidate wins."""
    if not target_flops_ratio > 0:
        raise DerivationError(f"target FLOPs ratio must be > 0, got {target_flops_ratio}")
    candidates = candidate_schedules(profile, grid, progress=progress, flops_batch_size=flops_batch_size)
    feasible = [d for d in candidates if d.predicted_flops_ratio >= target_flops_ratio]
    if not feasible:
        reach = max(d.predicted_flops_ratio for d in candidates)
        raise DerivationError(f"no derived schedule reaches a FLOPs ratio of {target_flops_ratio:g}; the most any "
                              f"grid point reaches on this recording is {reach:.2f}")
    limit = max(feasible[0].predicted_flops_ratio, target_flops_ratio) * (1 + band)
    near = [d for d in feasible if d.predicted_flops_ratio <= limit]
    rows: list[dict] = []
    if measure is None:
        model = uncalibrated_error_model(profile, near)
    else:
        model, rows = calibrate_error_model(profile, near, measure)
    ranked = sorted(near, key=lambda d: (model.mse(error_components(profile, d)), -d.predicted_flops_ratio))
    if measure is None:
        return SearchResult(best=ranked[0], measured=[], considered=len(candidates), error_model=model)
    measured = []
    for d in ranked[:num_measured]:
        psnr = float(measure(d.schedule))
        measured.append((psnr, d.predicted_flops_ratio, d))
        rows.append(_row(profile, d, model, psnr, "candidate"))
    best = max(measured, key=lambda x: (x[0], x[1]))[2]
    return SearchResult(best=best, measured=rows, considered=len(candidates), error_model=model)


def search_fidelity(profile: RedundancyProfile, min_psnr: float, measure: Callable[[CacheSchedule], float],
                    grid: Optional[dict] = None, progress: bool = False, max_measured: int = 8,
                    flops_batch_size: int = 1) -> SearchResult:
    """The fastest schedule (highest predicted FLOPs ratio) whose measured PSNR vs uncached is >= ``min_psnr``.

    The error model is calibrated on probes from all candidates; along the predicted front (ratio up, predicted
    PSNR down) a bisection measures at most ``max_measured`` candidates."""
    candidates = candidate_schedules(profile, grid, progress=progress, flops_batch_size=flops_batch_size)
    model, rows = calibrate_error_model(profile, candidates, measure)
    scored = sorted(((d.predicted_flops_ratio, model.psnr(error_components(profile, d)), d) for d in candidates),
                    key=lambda x: (-x[0], -x[1]))
    front, best_psnr = [], -math.inf
    for ratio, psnr, d in scored:  # fastest first; keep those with a better predicted PSNR than any faster one
        if psnr > best_psnr:
            front.append(d)
            best_psnr = psnr
    front = front[::-1]  # ratio ascending, predicted PSNR descending
    cache: dict[int, float] = {}

    def psnr_of(i: int) -> float:
        if i not in cache:
            cache[i] = float(measure(front[i].schedule))
            rows.append(_row(profile, front[i], model, cache[i], "candidate"))
        return cache[i]

    lo, hi = 0, len(front) - 1  # the last index with measured PSNR >= min_psnr
    if psnr_of(lo) < min_psnr:
        raise DerivationError(f"no derived schedule reaches PSNR {min_psnr:g} dB; the most cautious candidate "
                              f"({front[lo].schedule.name}) measures {cache[lo]:.2f} dB")
    while lo < hi and len(cache) < max_measured:
        mid = (lo + hi + 1) // 2
        if psnr_of(mid) >= min_psnr:
            lo = mid
        else:
            hi = mid - 1
    best = max((i for i, v in cache.items() if v >= min_psnr), key=lambda i: front[i].predicted_flops_ratio)
    return SearchResult(best=front[best], measured=rows, considered=len(candidates), error_model=model)
