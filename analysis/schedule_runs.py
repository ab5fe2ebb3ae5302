"""Small measured runs for the workbook: schedules against the uncached sampler on a few samples (the quick
check of notebook 03, the ablations of notebook 04), and the ablation schedules themselves.

Every run samples the same plan (labels, batches, seeds) as the uncached baseline and is measured against it by
lazymar.runs.Reference, so differences come from caching alone and every metric is the one of the other commands:
FLOPs are the engine's ledger of what ran; fidelity is PSNR of the images (data range 2; none for a latent model
without a VAE) and token MSE against the uncached ones; accuracy uses the digits classifier when the model is the
8x8 digits model. Wall times on a shared CPU are indicative only.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from lazymar.cache.schedule_file import CacheSchedule, lazymar_schedule, none_schedule
from lazymar.config import MARConfig
from lazymar.runs import Reference, SamplePlan

from .phenomena import AnalysisError


@dataclass
class Measurement:
    """A table (one row per schedule, "none" first), the images of every run keyed by schedule name (None for a
    latent-space model without a VAE), and the uncached reference run they were measured against."""

    table: pd.DataFrame
    images: dict[str, Optional[torch.Tensor]] = field(default_factory=dict)
    reference: Optional[Reference] = None

    @property
    def labels(self) -> list[int]:
        return self.reference.labels if self.reference is not None else []

    def reusable_for(self, model, labels: Sequence[int], settings, seed: int,
                     batch_size: Optional[int] = None) -> bool:
        """Whether this measurement's uncached run is the one ``model``/``labels``/``settings``/``seed`` would make."""
        labels = [int(x) for x in labels]
        plan = SamplePlan.of(labels, seed, batch_size or len(labels))
        ref = self.reference
        return ref is not None and ref.model is model and ref.plan == plan and ref.settings == settings


def measure_schedules(model, schedules: Mapping[str, CacheSchedule], labels: Sequence[int], settings,
                      seed: int = 0, batch_size: Optional[int] = None, progress: bool = False,
                      baseline: Optional[Measurement] = None, vae=None,
                      keep_images: Optional[bool] = None) -> Measurement:
    """Run the uncached sampler and each schedule on ``labels`` (one plan: lazymar.runs); one row per run with
    flops_per_image, flops_ratio (uncached / this), seconds, wall_ratio, psnr and token_mse against the
    uncached run, and accuracy (the model's quality evaluator: the digits model only, else NaN). Schedules
    identical up to their name run once and share the row. ``baseline``: an earlier Measurement of the same model,
    labels, settings and seed whose uncached run is reused instead of run again. ``keep_images``: keep the decoded
    images of a VAE model too (runs.images.ImageSpace; default: pixel models only)."""
    if not schedules:
        raise AnalysisError("no schedules to measure")
    if "none" in schedules:
        raise AnalysisError("'none' is the baseline and is always measured; do not pass it")
    labels = [int(x) for x in labels]
    if not labels:
        raise AnalysisError("need at least one label")
    if baseline is not None and baseline.reusable_for(model, labels, settings, seed, batch_size):
        reference = baseline.reference
    else:
        reference = Reference(model, SamplePlan.of(labels, seed, batch_size or len(labels)), settings, vae=vae,
                              keep_images=keep_images)
    rows = {"none": reference.row()}
    images = {"none": reference.images}
    done: dict[str, str] = {}  # schedule content -> the name it was measured under
    for name, schedule in tqdm(schedules.items(), desc="measured runs", disable=not progress, leave=False):
        key = _content_key(schedule)
        if key not in done:
            done[key] = name
            run, rows[name] = reference.measure(schedule, name=name)
            images[name] = run.images
        else:
            rows[name], images[name] = rows[done[key]], images[done[key]]
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "schedule"
    if "accuracy" not in table:
        table["accuracy"] = np.nan
    columns = ["flops_ratio", "psnr", "token_mse", "accuracy", "wall_ratio", "seconds", "flops_per_image"]
    return Measurement(table[columns].astype(float), images, reference)


def _content_key(schedule: CacheSchedule) -> str:
    import json
    return json.dumps({k: v for k, v in schedule.to_dict().items() if k != "name"}, sort_keys=True)


def speed_quality_from_sweep(sweep: pd.DataFrame) -> pd.DataFrame:
    """The speed/quality table from a sweep (lazymar.sweep.load_sweep): the uncached reference, the "lazymar"
    preset and the derived schedules on the Pareto front, by FLOPs ratio; indexed by name."""
    missing = [c for c in ("name", "family", "flops_ratio", "psnr", "pareto") if c not in sweep]
    if missing:
        raise AnalysisError(f"the sweep table lacks the column(s) {', '.join(missing)}")
    keep = sweep["family"].isin(["none", "lazymar"]) | (sweep["family"].eq("derived") & sweep["pareto"].astype(bool))
    columns = [c for c in ("name", "family", "flops_ratio", "wall_ratio", "psnr", "accuracy", "fid") if c in sweep]
    return sweep.loc[keep, columns].sort_values("flops_ratio", kind="stable").set_index("name")


# --- ablation schedules -----------------------------------------------------------------------------------
def ablation_schedules(config: MARConfig, num_iter: int) -> dict[str, CacheSchedule]:
    """The released scheme ("lazymar", all mechanisms) and each mechanism alone, on ``num_iter`` steps:

    - token cache only: its refresh steps, keep ratios and incremental encoder; no condition or head cache;
    - condition cache only: every step recomputes all tokens, the cond-only branch on its cached steps;
    - head cache only: every MAR step in full, the head policy of the released scheme;
    - all: the released scheme."""
    full = lazymar_schedule(num_iter, config)
    never = [False] * num_iter
    every = [True] * num_iter
    return {
        "token cache only": replace(full, name="token-only", condition_cache=never, head_cache=never),
        "condition cache only": replace(full, name="condition-only", refresh=every, head_cache=never),
        "head cache only": replace(full, name="head-only", refresh=every, condition_cache=never),
        "all (lazymar)": full,
    }


def selection_schedules(config: MARConfig, num_iter: int, seed: int = 0) -> dict[str, CacheSchedule]:
    """The token cache alone under each selection rule: V similarity (LazyMAR), random positions of the same
    count, and the always-kept statuses only (to-predict and new tokens)."""
    token_only = ablation_schedules(config, num_iter)["token cache only"]
    return {
        "similarity": token_only,
        "random": replace(token_only, name="token-only-random", selection="random", seed=seed),
        "status only": replace(token_only, name="token-only-status", selection="status"),
    }


def refresh_interval_schedule(config: MARConfig, num_iter: int, interval: int) -> CacheSchedule:
    """The released scheme with its refresh interval replaced: the same warm-up (the first 5/64 of the steps
    refresh) then a refresh every ``interval`` steps (9 at 64 steps is the released scheme)."""
    if not isinstance(interval, (int, np.integer)) or interval < 1:
        raise AnalysisError(f"refresh interval must be an integer >= 1, got {interval!r}")
    full = lazymar_schedule(num_iter, config)
    warmup = max(1, round(5 * num_iter / 64))
    refresh = [s < warmup or (s - warmup) % interval == 0 for s in range(num_iter)]
    return replace(full, name=f"lazymar-refresh-{interval}", refresh=refresh,
                   condition_cache=[not r for r in refresh])
