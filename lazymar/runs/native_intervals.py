"""Intervals and verdicts for the quality at a digits model's own resolution (lazymar.metrics.evaluate_native).

Per sample, a run keeps its roughness (``roughness``) and, for images larger than 8x8, the features of that side's
classifier (``features_native``). Two metrics join PSNR, accuracy and digits-FID (lazymar.stats):

- ``fid32`` (``fid<side>``): the FID of those features against the real train split, lower is better, margin the
  same percentage of the baseline's as digits-FID's;
- ``roughness_gap``: |mean roughness / roughness_real - 1|, the relative distance of the run's roughness from that
  of real held-out digits at the same side, lower is better, margin :data:`ROUGHNESS_GAP_MARGIN` (absolute: 0.05 is
  5 % of the real roughness). A run can be too smooth as well as too rough, so the gap, not the roughness, is judged.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from torch import Tensor

from .. import stats

ROUGHNESS_GAP_MARGIN = 0.05
NATIVE_METRICS = ("fid32", "roughness_gap")


def native_sample_arrays(images: Tensor, side: int) -> dict:
    """``roughness`` (N,) of the images and, for side > 8, ``features_native`` (N, D) of the side's classifier."""
    from ..metrics import hidden_features
    from ..roughness import per_image_roughness
    out = {"roughness": per_image_roughness(images), "features_native": None}
    if side != 8 and images.shape[-1] == side:
        out["features_native"] = hidden_features(images, side)
    return out


def native_metrics(side: int, margin_fid: float) -> list[stats.Metric]:
    """The roughness gap and, for side > 8, ``fid<side>`` (``margin_fid``: percent of the baseline's FID)."""
    from ..metrics import _train_statistics
    from ..roughness import roughness_real
    real_roughness = roughness_real(side)

    def gap(arrays: dict, weights: np.ndarray) -> np.ndarray:
        return np.abs(stats.weighted_mean(arrays["roughness"], weights) / real_roughness - 1.0)

    metrics = [stats.Metric("roughness_gap", gap, False, ROUGHNESS_GAP_MARGIN, needs="roughness")]
    if side != 8:
        real: Optional[stats.RealStatistics] = stats.RealStatistics.of(*_train_statistics(side))
        metrics.insert(0, stats.Metric(f"fid{side}", lambda a, w: stats.fid_of_features(a["features_native"], real, w),
                                       False, margin_fid / 100.0, relative=True, biased=True,
                                       needs="features_native"))
    return metrics
