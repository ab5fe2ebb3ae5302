"""Benchmark a cache schedule against the uncached sampler: FLOPs, wall time, peak memory, fidelity, quality.

Both runs sample the same plan (labels, batches, seeds: lazymar.runs), so they draw the same orders and noise and
differ only by what the schedule reuses. Wall times come from the same process, repetitions interleaved
(baseline, cached, baseline, ...), median reported; process CPU time beside it (all threads: on a shared machine
it is less disturbed by other processes than wall time). Peak memory (on CPU from one untimed repetition after the
timed ones) and every comparison metric come from lazymar.runs (runs.memory, runs.compare).
"""
from __future__ import annotations

import math
from typing import Optional

from tqdm.auto import tqdm

from ..model import MAR
from ..runs import DEFAULT, ImageSpace, Run, SamplePlan, fidelity, prepare_cpu_memory_measurement, quality_evaluator
from ..sampling import SamplingSettings
from .schedule import CacheSchedule, none_schedule


def benchmark_runs(model: MAR, plan: SamplePlan, settings: SamplingSettings, schedule: CacheSchedule,
                   repeats: int = 3, warmup: bool = True, vae=None, evaluator=DEFAULT,
                   cpu_baseline_mb: Optional[float] = None, progress: bool = True) -> dict[str, Run]:
    """The finished "baseline" (uncached) and "cached" runs, ``repeats`` timed repetitions each, interleaved.

    With ``cpu_baseline_mb`` (CPU) each run then samples once more, untimed, for its peak memory, under the
    allocator settings of runs.memory (which would slow the timed repetitions; on CUDA the timed ones measure it)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    runs = {"baseline": Run("baseline", plan, settings, none_schedule(settings.num_iter)),
            "cached": Run("cached", plan, settings, schedule)}
    if warmup:  # one sample each, untimed: allocator, kernels
        first = SamplePlan.of(plan.labels[:1], plan.seed, plan.batch_size)
        for run in runs.values():
            Run(run.name, first, settings, run.schedule).repeat(model)
    measure_cpu_memory = cpu_baseline_mb is not None
    bar = tqdm(total=(repeats + measure_cpu_memory) * len(runs), desc="bench", unit="run", disable=not progress)
    for _ in range(repeats):
        for run in runs.values():
            run.repeat(model)
            bar.update(1)
    if measure_cpu_memory and prepare_cpu_memory_measurement():
        for run in runs.values():
            run.repeat(model, cpu_baseline_mb, timed=False)
            bar.update(1)
    bar.close()
    images = ImageSpace(model, vae)
    evaluator = quality_evaluator(model, vae) if evaluator is DEFAULT else evaluator
    return {name: run.finish(images, evaluator) for name, run in runs.items()}


def benchmark(model: MAR, plan: SamplePlan, settings: SamplingSettings, schedule: CacheSchedule, repeats: int = 3,
              warmup: bool = True, vae=None, evaluator=DEFAULT, cpu_baseline_mb: Optional[float] = None,
              progress: bool = True) -> dict:
    """Uncached ("none") against ``schedule``; the JSON-able comparison: each run's summary (runs.Run.summary),
    and the cached run's fidelity against the baseline (runs.fidelity; infinite values as "inf")."""
    runs = benchmark_runs(model, plan, settings, schedule, repeats, warmup, vae, evaluator, cpu_baseline_mb,
                          progress)
    out: dict = {}
    for name, run in runs.items():
        out[name] = {"accuracy": None, "fid": None, **run.summary()}
    out.update(fidelity(runs["cached"], runs["baseline"]))
    for key in ("psnr", "token_mse"):
        if isinstance(out[key], float) and math.isinf(out[key]):
            out[key] = "inf"
    return out
