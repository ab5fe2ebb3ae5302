"""Confidence intervals over samples, paired differences and non-inferiority verdicts (numpy only, vectorised).

A resample is a row of counts (how often each sample is drawn), so every statistic is computed for all resamples at
once: a mean is ``counts @ values / n``. Samples are drawn with replacement *within* each stratum (a run's seed), so
runs pooled over seeds keep each seed's share. Two runs of the same plan share their samples (same seeds, labels,
orders, noise), so one count matrix resamples them together: their difference is paired.

- mean metrics (accuracy: per-sample correctness): the mean of the resample;
- PSNR: 10 log10(range^2 / MSE) of the pooled MSE of the resample (the per-sample mean squared errors averaged:
  every image has as many pixels, so that is the MSE over all pixels, as :func:`lazymar.metrics.psnr`);
- FID: the resample's rows of the per-sample feature matrix give a mean and covariance; their Frechet distance to
  the fixed real statistics uses tr sqrt(S R) = sum sqrt(eig(R^1/2 S R^1/2)) (the real side factored once), so no
  image goes through the classifier again and no per-resample ``sqrtm`` is needed.

Intervals at level 95 % by default: the percentile interval of the bootstrap distribution. FID is biased upward at
finite n, and a resample, with its duplicated rows, more so: its interval is the percentile interval shifted back by
the bootstrap's bias (mean of the replicates - the value), an interval for the FID *at the run's sample count* (the
number every FID report quotes; compare FIDs of equal n only). Differences of FID between runs of the same samples
carry little of that bias, and their intervals are the basic (reverse-percentile) ones, [2 d - q_hi, 2 d - q_lo],
which remove what is left, so they cover the population difference (tests/test_stats.py).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
DATA_RANGE = 2.0  # images in [-1, 1]

VERDICTS = ("better", "no worse", "worse", "inconclusive")


# --- resampling -----------------------------------------------------------------------------------------------
def resample_counts(strata: Sequence[int], resamples: int = DEFAULT_RESAMPLES,
                    seed: int = DEFAULT_SEED) -> np.ndarray:
    """(resamples, n) counts of a stratified bootstrap: within each stratum (equal labels in ``strata``), as many
    draws with replacement as the stratum has samples. Seeded: the same arguments give the same counts."""
    strata = np.asarray(strata)
    if strata.ndim != 1 or len(strata) == 0:
        raise ValueError(f"strata must be a non-empty 1-d sequence, got shape {strata.shape}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    counts = np.zeros((resamples, len(strata)), dtype=np.int32)
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        counts[:, members] = rng.multinomial(len(members), np.full(len(members), 1.0 / len(members)),
                                             size=resamples)
    return counts


# --- statistics of weighted samples: weights (B, n) give B values at once ---------------------------------------
def weighted_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    values = np.asarray(values, np.float64)
    return weights @ values / values.shape[0]


def psnr_of_errors(sq_err: np.ndarray, weights: np.ndarray, data_range: float = DATA_RANGE) -> np.ndarray:
    """PSNR (dB) of the pooled MSE of each weighting of the per-sample mean squared errors (inf where 0)."""
    mse = weighted_mean(sq_err, weights)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range ** 2 / mse)


@dataclass(frozen=True)
class RealStatistics:
    """The fixed side of an FID: mean (D,), covariance (D, D), its symmetric square root and trace."""

    mu: np.ndarray
    sigma: np.ndarray
    root: np.ndarray
    trace: float

    @classmethod
    def of(cls, mu: np.ndarray, sigma: np.ndarray) -> "RealStatistics":
        sigma = np.asarray(sigma, np.float64)
        sigma = (sigma + sigma.T) / 2
        w, v = np.linalg.eigh(sigma)
        root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
        return cls(np.asarray(mu, np.float64), sigma, root, float(np.trace(sigma)))


def fid_of_features(features: np.ndarray, real: RealStatistics, weights: np.ndarray,
                    chunk: Optional[int] = None, budget_bytes: int = 256 * 2**20) -> np.ndarray:
    """FID of each weighting (rows of ``weights``, counts summing to n) of the (n, D) features against ``real``:
    ||mu - mu_r||^2 + tr S + tr R - 2 tr sqrt(R^1/2 S R^1/2), S the weighted covariance (ddof 1, as np.cov).

    Memory stays within about ``budget_bytes`` whatever n and D are (Inception's D = 2048 at 50,000 samples
    included): weightings are taken ``chunk`` at a time (default: as many (D, D) covariances as fit the budget)
    and their second moments summed over blocks of samples."""
    features = np.asarray(features, np.float64)
    weights = np.atleast_2d(np.asarray(weights, np.float64))
    n, dim = features.shape
    if n < 2:  # no covariance from one sample: FID is undefined (NaN), as for the point estimate
        return np.full(len(weights), np.nan)
    chunk = chunk or max(1, min(len(weights), budget_bytes // (3 * 8 * dim * dim)))
    rows = max(1, budget_bytes // (8 * dim * chunk))  # samples per block of the (b, D, rows) weighted features
    out = np.empty(len(weights))
    for start in range(0, len(weights), chunk):
        w = weights[start:start + chunk]
        mu = w @ features / n                                                     # (b, D)
        second = np.zeros((len(w), dim, dim))
        for first in range(0, n, rows):
            block = features[first:first + rows]
            second += np.matmul(block.T[None] * w[:, None, first:first + rows], block)
        cov = (second - n * mu[:, :, None] * mu[:, None, :]) / (n - 1)
        inner = real.root @ cov @ real.root
        eig = np.linalg.eigvalsh((inner + np.swapaxes(inner, 1, 2)) / 2)
        tr_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum(axis=1)
        diff = mu - real.mu
        out[start:start + chunk] = (diff * diff).sum(1) + np.trace(cov, axis1=1, axis2=2) + real.trace - 2 * tr_sqrt
    return out


# --- metrics and intervals ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """How one metric is computed from a run's per-sample arrays, its interval kind, and its direction.

    ``margin`` is the non-inferiority margin in the metric's own units (relative to the baseline's value when
    ``relative``); ``scale`` turns a difference into the units the margin is declared in (accuracy: points)."""

    name: str
    statistic: Callable[[dict, np.ndarray], np.ndarray]  # (arrays, weights (B, n)) -> (B,)
    higher_is_better: bool
    margin: float
    relative: bool = False
    biased: bool = False  # FID: level intervals shifted by the bootstrap bias, differences basic
    needs: str = ""

    def available(self, arrays: dict) -> bool:
        return arrays.get(self.needs) is not None


def standard_metrics(margin_psnr: float = 0.5, margin_accuracy: float = 0.5, margin_fid: float = 5.0,
                     real: Optional[RealStatistics] = None) -> list[Metric]:
    """PSNR (margin in dB), accuracy (margin in points, i.e. percent of samples) and, with ``real``, FID (margin in
    percent of the baseline's FID): the defaults -0.5 dB, -0.5 points, +5 %."""
    metrics = [Metric("psnr", lambda a, w: psnr_of_errors(a["sq_err"], w), True, margin_psnr, needs="sq_err"),
               Metric("accuracy", lambda a, w: weighted_mean(a["correct"], w), True, margin_accuracy / 100.0,
                      needs="correct")]
    if real is not None:
        metrics.append(Metric("fid", lambda a, w: fid_of_features(a["features"], real, w), False,
                              margin_fid / 100.0, relative=True, biased=True,
                              needs="features"))
    return metrics


def interval(point: float, replicates: np.ndarray, kind: str = "percentile",
             confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The bootstrap interval of a statistic from its value and its replicates: ``percentile``, ``basic``
    ([2 t - q_hi, 2 t - q_lo]) or ``shifted`` (the percentile interval minus the bootstrap bias, mean - t)."""
    alpha = (1.0 - confidence) / 2
    finite = replicates[~np.isnan(replicates)]
    if len(finite) == 0:
        return math.nan, math.nan
    if np.isinf(finite).any():  # e.g. PSNR of identical runs: inf in every resample
        lo, hi = (float(np.quantile(finite, alpha, method="inverted_cdf")),
                  float(np.quantile(finite, 1 - alpha, method="inverted_cdf")))
        return lo, hi
    lo, hi = np.quantile(finite, [alpha, 1 - alpha])
    if kind == "basic":
        return float(2 * point - hi), float(2 * point - lo)
    if kind == "shifted":
        bias = float(finite.mean()) - point
        return float(lo - bias), float(hi - bias)
    return float(lo), float(hi)


def verdict(low: float, high: float, margin: float, higher_is_better: bool) -> str:
    """The non-inferiority verdict of a difference (candidate - baseline) with confidence interval [low, high].

    In the good direction (the difference negated when lower is better) with margin m >= 0:

    - ``better``: the whole interval above 0 (hence above -m too): the candidate is better;
    - ``no worse``: the whole interval above -m, but not above 0: any loss is smaller than the margin;
    - ``worse``: the whole interval below -m: the loss exceeds the margin;
    - ``inconclusive``: otherwise (the interval straddles -m): more samples are needed to tell.
    An interval that is NaN (metric not measured) gives ``inconclusive``."""
    if math.isnan(low) or math.isnan(high):
        return "inconclusive"
    lo, hi = (low, high) if higher_is_better else (-high, -low)
    if lo > 0:
        return "better"
    if lo > -margin:
        return "no worse"
    if hi < -margin:
        return "worse"
    return "inconclusive"


def overall_verdict(verdicts: Sequence[str]) -> str:
    """All metrics together: ``worse`` if any is worse, else ``inconclusive`` if any is, else ``better`` if every
    one is better, else ``no worse``."""
    if not verdicts:
        return "inconclusive"
    if "worse" in verdicts:
        return "worse"
    if "inconclusive" in verdicts:
        return "inconclusive"
    return "better" if all(v == "better" for v in verdicts) else "no worse"


def compare(arrays: dict[str, dict], strata: Sequence[int], metrics: Sequence[Metric],
            baseline: Optional[str] = None, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
            confidence: float = CONFIDENCE) -> dict[str, dict]:
    """Every run's metrics with intervals, and their paired differences against ``baseline`` with verdicts.

    ``arrays``: per run, its per-sample arrays (``sq_err``, ``correct``, ``features``: rows aligned over the runs,
    one per sample, ``strata`` giving each sample's seed). Returns per run ``<metric>``, ``<metric>_ci_low``,
    ``<metric>_ci_high`` and, against the baseline (the baseline itself included: a difference of 0),
    ``d_<metric>``, ``d_<metric>_ci_low``, ``d_<metric>_ci_high``, ``verdict_<metric>`` and ``verdict`` (overall).
    A metric whose baseline value is infinite (PSNR against itself) has no difference (NaN, no verdict)."""
    counts = resample_counts(strata, resamples, seed)
    n = len(strata)
    ones = np.ones((1, n))
    values: dict[str, dict[str, tuple[float, np.ndarray]]] = {}
    out: dict[str, dict] = {}
    for name, a in arrays.items():
        values[name], out[name] = {}, {}
        for metric in metrics:
            if not metric.available(a):
                continue
            point, reps = float(metric.statistic(a, ones)[0]), metric.statistic(a, counts)
            values[name][metric.name] = (point, reps)
            lo, hi = interval(point, reps, "shifted" if metric.biased else "percentile", confidence)
            out[name].update({metric.name: point, f"{metric.name}_ci_low": lo, f"{metric.name}_ci_high": hi})
    if baseline is None:
        return out
    if baseline not in arrays:
        raise KeyError(f"baseline {baseline!r} is not among the runs ({', '.join(arrays)})")
    for name in arrays:
        verdicts = []
        for metric in metrics:
            if metric.name not in values[name] or metric.name not in values[baseline]:
                continue
            (p, reps), (pb, reps_b) = values[name][metric.name], values[baseline][metric.name]
            key = f"d_{metric.name}"
            if math.isinf(pb):
                out[name].update({key: math.nan, f"{key}_ci_low": math.nan, f"{key}_ci_high": math.nan})
                continue
            with np.errstate(invalid="ignore"):
                d, d_reps = p - pb, reps - reps_b
            lo, hi = interval(d, d_reps, "basic" if metric.biased else "percentile", confidence)
            margin = metric.margin * abs(pb) if metric.relative else metric.margin
            v = verdict(lo, hi, margin, metric.higher_is_better) if name != baseline else "baseline"
            out[name].update({key: d, f"{key}_ci_low": lo, f"{key}_ci_high": hi, f"verdict_{metric.name}": v})
            verdicts.append(v)
        out[name]["verdict"] = "baseline" if name == baseline else overall_verdict(verdicts)
    return out


def ratio_intervals(numerators: np.ndarray, denominators: np.ndarray, resamples: int = DEFAULT_RESAMPLES,
                    seed: int = DEFAULT_SEED, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Percentile intervals over samples (the last axis, n) of sum(numerators) / sum(denominators) for every
    leading index at once: e.g. the fraction of positions above a threshold per (layer, step), from per-sample
    counts. Returns (low, high) of the leading shape; NaN where a resample has no denominator."""
    numerators, denominators = np.asarray(numerators, np.float64), np.asarray(denominators, np.float64)
    n = numerators.shape[-1]
    counts = resample_counts(np.zeros(n), resamples, seed).astype(np.float64)
    top = np.einsum("bn,...n->...b", counts, numerators)
    bottom = np.einsum("bn,...n->...b", counts, denominators)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = top / bottom
    alpha = (1.0 - confidence) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: no value at that index
        low, high = np.nanquantile(values, [alpha, 1 - alpha], axis=-1)
    return low, high
