"""Confidence intervals for run comparisons (lazymar.stats on the per-sample arrays of finished runs).

A finished run gives, per sample: its mean squared image error against the uncached reference run of the same plan
(``sq_err``), whether the digits classifier assigns it its label (``correct``) and its classifier features
(``features``, the digits-FID features), computed once from the run's images: resampling reuses these rows and
never runs an image through the classifier again. Several seeds pool by concatenation, the seed of each sample its
bootstrap stratum. Runs of one plan share their samples, so their differences are paired.

The options (``--bootstrap``, ``--bootstrap-seed``, ``--baseline``, ``--margin-*``) are declared before a run, as a
non-inferiority test needs; lazymar.commands.interval_options adds them to a command.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from torch import Tensor

from .. import stats
from ..tables import markdown_table
from .execute import Run
from .images import DigitsQuality, DigitsStream
from .native_intervals import NATIVE_METRICS, native_metrics, native_sample_arrays

METRICS = ("psnr", "accuracy", "fid") + NATIVE_METRICS


@dataclass(frozen=True)
class IntervalOptions:
    """Resample count and seed of the bootstrap, the baseline row, and the non-inferiority margins (PSNR in dB,
    accuracy in points, FID in percent of the baseline's)."""

    resamples: int = stats.DEFAULT_RESAMPLES
    seed: int = stats.DEFAULT_SEED
    baseline: Optional[str] = "lazymar"
    margin_psnr: float = 0.5
    margin_accuracy: float = 0.5
    margin_fid: float = 5.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "IntervalOptions":
        margins = {k: getattr(args, k) for k in ("margin_psnr", "margin_accuracy", "margin_fid") if hasattr(args, k)}
        return cls(resamples=args.bootstrap, seed=args.bootstrap_seed, baseline=getattr(args, "baseline", None),
                   **margins)

    def metrics(self, real: Optional[stats.RealStatistics]) -> list[stats.Metric]:
        return stats.standard_metrics(self.margin_psnr, self.margin_accuracy, self.margin_fid, real)

    def describe(self) -> str:
        return (f"95 % bootstrap intervals ({self.resamples} resamples, seed {self.seed}, stratified by seed); "
                f"non-inferiority margins: PSNR -{self.margin_psnr:g} dB, accuracy -{self.margin_accuracy:g} points, "
                f"FID +{self.margin_fid:g} % of the baseline's")


def real_statistics(evaluator) -> Optional[stats.RealStatistics]:
    """The fixed real statistics of the evaluator's FID (digits: the classifier features of the train split)."""
    if isinstance(evaluator, DigitsQuality):
        from ..metrics import _train_statistics
        return stats.RealStatistics.of(*_train_statistics())
    from ..imagenet import ImageNetQuality
    if isinstance(evaluator, ImageNetQuality):  # the FID reference statistics (e.g. ADM's in256)
        return stats.RealStatistics.of(evaluator.reference.mu, evaluator.reference.sigma)
    return None


def sample_arrays(run: Run, reference: Optional[Run], evaluator=None) -> dict:
    """Per-sample arrays of a finished ``run``, in sample order and on every rank: ``sq_err`` (mean squared image
    error per sample) against ``reference`` (None without images) and the evaluator's arrays
    (:func:`image_sample_arrays`). Under torchrun each rank contributes its own samples
    (runs.compare.sample_squared_errors, the evaluator's merged stream), as one process computes them: a collective
    call, made on every rank. ImageNet runs: ``sq_err`` and ``features``, the Inception pool features that the
    evaluator's stream kept per sample (FID is resampled from them; no image is scored again)."""
    from .compare import sample_squared_errors
    out = image_sample_arrays(None, [], None)
    if reference is not None:
        errors = sample_squared_errors(run, reference)
        if errors.get("images") is not None:
            out["sq_err"] = errors["images"] / errors["image_elements"]
    from ..imagenet import ImageNetQuality
    if isinstance(evaluator, ImageNetQuality):
        stream = getattr(run, "quality_stream", None)
        if stream is None:  # not scored yet: score this run's samples now
            run.score(evaluator)
            stream = run.quality_stream
        if stream is not None and stream.state().count:
            out["features"] = stream.state().ordered_features()
    if isinstance(evaluator, DigitsQuality):
        stream = getattr(run, "quality_stream", None)
        if not isinstance(stream, DigitsStream):  # not scored yet: score this run's samples now
            run.score(evaluator)
            stream = run.quality_stream
        if stream is not None:
            images = stream.images()
            found = image_sample_arrays(images, stream.labels[:len(images)], evaluator)
            out.update({k: v for k, v in found.items() if k != "sq_err"})
    return out


def image_sample_arrays(images: Optional[Tensor], labels: Sequence[int], evaluator=None,
                        reference_images: Optional[Tensor] = None) -> dict:
    """Per-sample arrays of all of a run's ``images`` (in sample order): ``sq_err`` against ``reference_images``
    and, with the digits evaluator, ``correct`` and ``features`` (digits classifier at 8x8) and ``roughness`` and
    ``features_native`` (lazymar.runs.native_intervals); None where not measured."""
    out: dict = {"sq_err": None, "correct": None, "features": None, "roughness": None, "features_native": None}
    if images is None:
        return out
    if reference_images is not None:
        out["sq_err"] = ((images.double() - reference_images.double()) ** 2).flatten(1).mean(1).numpy()
    if isinstance(evaluator, DigitsQuality):
        from ..digits import to_8x8
        from ..metrics import _classifier_input, load_classifier
        x = _classifier_input(to_8x8(images))
        classifier = load_classifier()
        out["correct"] = (classifier.predict(x) == np.asarray(labels)).astype(np.float64)
        out["features"] = classifier.hidden(x)
        out.update(native_sample_arrays(images, evaluator.side))
    return out


def pool(per_seed: Sequence[dict[str, dict]]) -> tuple[dict[str, dict], np.ndarray]:
    """Per-seed arrays {run: arrays} concatenated seed after seed, and the stratum (position of the seed) of every
    sample. Only runs present for every seed are pooled."""
    names = [n for n in per_seed[0] if all(n in part for part in per_seed)]
    pooled: dict[str, dict] = {}
    for name in names:
        pooled[name] = {}
        for key in ("sq_err", "correct", "features", "roughness", "features_native"):
            parts = [part[name].get(key) for part in per_seed]
            pooled[name][key] = None if any(p is None for p in parts) else np.concatenate(parts)
    sizes = [_size(part[names[0]]) for part in per_seed] if names else []
    strata = np.concatenate([np.full(size, k) for k, size in enumerate(sizes)]) if sizes else np.zeros(0)
    return pooled, strata


def _size(arrays: dict) -> int:
    for value in arrays.values():
        if value is not None:
            return len(value)
    return 0


def intervals(per_seed: Sequence[dict[str, dict]], options: IntervalOptions, evaluator=None,
              baseline: Optional[str] = None) -> dict[str, dict]:
    """Every run's pooled metrics with intervals and, against ``baseline`` (a run name), differences and verdicts
    (lazymar.stats.compare); {} when no run has per-sample arrays."""
    pooled, strata = pool(per_seed)
    if not pooled or len(strata) == 0:
        return {}
    metrics = options.metrics(real_statistics(evaluator))
    if isinstance(evaluator, DigitsQuality):
        metrics += native_metrics(evaluator.side, options.margin_fid)
    return stats.compare(pooled, strata, metrics, baseline=baseline, resamples=options.resamples,
                         seed=options.seed)


def cell(value, low=None, high=None, digits: int = 2) -> str:
    """``value [low, high]`` rounded for a markdown table (inf and NaN spelled out)."""
    def fmt(x) -> str:
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return "nan"
        return ("inf" if x > 0 else "-inf") if math.isinf(x) else f"{x:.{digits}f}"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if low is None or (isinstance(low, float) and math.isnan(low)):
        return fmt(value)
    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


def digits_of(metric: str) -> int:
    return 3 if metric in ("accuracy", "d_accuracy", "token_mse", "roughness_gap", "d_roughness_gap") else 2


# --- tables: one row per run, pooled over seeds, with intervals, differences and verdicts ---------------------
def annotate_table(per_seed_rows: dict[int, "object"], per_seed_arrays: dict[int, dict[str, dict]],
                   options: IntervalOptions, evaluator=None, baseline: Optional[str] = None):
    """One DataFrame row per run (``name`` column) from per-seed tables of the same runs: with one seed that
    seed's rows; with several, the runs' numbers averaged over seeds (equal sample counts: FLOPs and wall ratios,
    token MSE) and PSNR, accuracy and FID of the pooled samples, each seed's own beside them
    (``<metric>_seed<s>``). Then ``<metric>_ci_low/high``, and against ``baseline`` ``d_<metric>`` (with its
    interval), ``verdict_<metric>`` and ``verdict``; ``seeds`` lists the seeds, ``num_samples`` counts all."""
    import pandas as pd
    seeds = list(per_seed_rows)
    frames = [per_seed_rows[s].set_index("name") for s in seeds]
    frames = [f[~f.index.duplicated()] for f in frames]  # e.g. --schedule none beside the reference: one row
    names = [n for n in frames[0].index if all(n in f.index for f in frames)]
    df = frames[0].loc[names].copy()
    if len(seeds) > 1:
        for col in df.columns:
            if pd.api.types.is_numeric_dtype(df[col]) and col not in ("pareto",):
                df[col] = sum(f.loc[names, col].astype(float) for f in frames) / len(frames)
        for metric in METRICS:
            if metric in df.columns:
                for s, f in zip(seeds, frames):
                    df[f"{metric}_seed{s}"] = f.loc[names, metric].astype(float)
        if "num_samples" in df.columns:
            df["num_samples"] = sum(f.loc[names, "num_samples"] for f in frames)
    df["seeds"] = " ".join(str(s) for s in seeds)
    found = intervals([per_seed_arrays[s] for s in seeds], options, evaluator,
                      baseline if baseline in names else None)
    for name, values in found.items():
        if name not in df.index:
            continue
        for key, value in values.items():
            if key in METRICS and len(seeds) == 1 and key in df.columns and not pd.isna(df.at[name, key]):
                continue  # one seed: keep the run's own number (the same, up to round-off for FID)
            if key not in df.columns:
                df[key] = math.nan if not key.startswith("verdict") else ""
            df.at[name, key] = value
    return df.reset_index()


def verdict_markdown(df, baseline: str, options: IntervalOptions) -> str:
    """The differences against the baseline with their intervals, per-metric verdicts and the overall one."""
    metrics = [m for m in METRICS if f"d_{m}" in df.columns]
    head = ["name"] + [f"d_{m} [95% CI]" for m in metrics] + [f"verdict {m}" for m in metrics] + ["verdict"]
    rows = []
    for _, row in df.iterrows():
        cells = [str(row["name"])]
        cells += [cell(row.get(f"d_{m}"), row.get(f"d_{m}_ci_low"), row.get(f"d_{m}_ci_high"),
                       digits_of(f"d_{m}")) for m in metrics]
        cells += [str(row.get(f"verdict_{m}", "") if isinstance(row.get(f"verdict_{m}"), str) else "")
                  for m in metrics]
        cells.append(str(row.get("verdict", "") if isinstance(row.get("verdict"), str) else ""))
        rows.append(cells)
    return f"Against {baseline} ({options.describe()}):\n\n" + markdown_table(head, rows)


def pooled_bench(per_seed: dict[int, dict], per_seed_arrays: dict[int, dict[str, dict]],
                 options: IntervalOptions, evaluator=None) -> dict:
    """``lazymar bench``'s result with intervals: with one seed its result, with several the runs' FLOPs, seconds
    and CPU seconds summed over seeds (ratios of the sums), token MSE averaged, PSNR and quality of the pooled
    samples, and each seed's result under ``per_seed``. Each run's quality gets ``<metric>_ci_low/high``, the
    cached run's PSNR its interval, and the cached - baseline differences (paired) ``d_<metric>`` with interval,
    ``verdict_<metric>`` and ``verdict`` (the margins of ``options``; PSNR has none: the baseline is exact)."""
    seeds = list(per_seed)
    if len(seeds) == 1:
        result = {k: (dict(v) if isinstance(v, dict) else v) for k, v in per_seed[seeds[0]].items()}
    else:
        result = {"per_seed": {str(s): r for s, r in per_seed.items()}}
        for name in ("baseline", "cached"):
            parts = [per_seed[s][name] for s in seeds]
            peaks = [r["peak_memory_mb"] for r in parts if r.get("peak_memory_mb") is not None]
            result[name] = {"flops": sum(r["flops"] for r in parts), "seconds": sum(r["seconds"] for r in parts),
                            "cpu_seconds": sum(r["cpu_seconds"] for r in parts),
                            "peak_memory_mb": max(peaks) if peaks else None, "accuracy": None, "fid": None}
        b, c = result["baseline"], result["cached"]
        result.update(flops_ratio=b["flops"] / c["flops"] if c["flops"] else None,
                      wall_ratio=b["seconds"] / c["seconds"], cpu_time_ratio=b["cpu_seconds"] / c["cpu_seconds"],
                      memory_ratio=(c["peak_memory_mb"] / b["peak_memory_mb"]
                                    if c["peak_memory_mb"] and b["peak_memory_mb"] else None),
                      token_mse=(None if any(per_seed[s]["token_mse"] is None for s in seeds) else
                                 sum(float(per_seed[s]["token_mse"]) for s in seeds) / len(seeds)),
                      psnr=None)
    found = intervals([per_seed_arrays[s] for s in seeds], options, evaluator, baseline="baseline")
    for name in ("baseline", "cached"):
        for metric in ("accuracy", "fid"):
            if metric in found.get(name, {}):
                if len(seeds) > 1 or result[name].get(metric) is None:
                    result[name][metric] = found[name][metric]
                result[name][f"{metric}_ci_low"] = found[name][f"{metric}_ci_low"]
                result[name][f"{metric}_ci_high"] = found[name][f"{metric}_ci_high"]
    cached = found.get("cached", {})
    if "psnr" in cached:
        if len(seeds) > 1:
            result["psnr"] = cached["psnr"]
        result["psnr_ci_low"], result["psnr_ci_high"] = cached["psnr_ci_low"], cached["psnr_ci_high"]
    for metric in ("accuracy", "fid"):
        if f"verdict_{metric}" in cached:
            for key in (f"d_{metric}", f"d_{metric}_ci_low", f"d_{metric}_ci_high", f"verdict_{metric}"):
                result[key] = cached[key]
    if "verdict" in cached:
        result["verdict"] = cached["verdict"]
        result["intervals"] = options.describe()
    for key in ("psnr", "psnr_ci_low", "psnr_ci_high"):
        if isinstance(result.get(key), float) and math.isinf(result[key]):
            result[key] = "inf"
    return result
