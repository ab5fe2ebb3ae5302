"""Benchmark a cache schedule against the uncached sampler: FLOPs, wall time, peak memory, fidelity, quality.

Both runs sample the same plan (labels, batches, seeds: lazymar.runs), so they draw the same orders and noise and
differ only by what the schedule reuses. Wall times come from the same process, repetitions interleaved
(baseline, cached, baseline, ...), median reported; process CPU time beside it (all threads: on a shared machine
it is less disturbed by other processes than wall time). Peak memory (on CPU from one untimed repetition before the
timed ones) and every comparison metric come from the rest of lazymar.runs (memory, compare).
"""
from __future__ import annotations

import math

from tqdm.auto import tqdm

from ..cache.schedule_file import CacheSchedule, exact_schedule
from ..model import MAR
from ..sampling import SamplingSettings
from .compare import DEFAULT, fidelity
from .execute import Run
from .images import ImageSpace, quality_evaluator
from .memory import cpu_memory_measurement, resident_mb, weights_mb
from .plan import SamplePlan


def benchmark_runs(model: MAR, plan: SamplePlan, settings: SamplingSettings, schedule: CacheSchedule,
                   repeats: int = 3, warmup: bool = True, vae=None, evaluator=DEFAULT,
                   cpu_memory: bool = False, progress: bool = True) -> dict[str, Run]:
    """The finished "baseline" (uncached: the fastest exact sampler, schedule.exact_schedule) and "cached" runs, ``repeats`` timed repetitions each, interleaved.

    With ``cpu_memory`` (a model on the CPU) each run first samples once, untimed, for its peak memory (weights
    included), under the allocator settings of runs.memory, which would slow the timed repetitions; on CUDA the
    timed repetitions measure it."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    runs = {"baseline": Run("baseline", plan, settings, exact_schedule(settings.num_iter)),
            "cached": Run("cached", plan, settings, schedule)}
    if warmup:  # one sample each, untimed: allocator, kernels
        first = SamplePlan.of(plan.labels[:1], plan.seed, plan.batch_size)
        for run in runs.values():
            Run(run.name, first, settings, run.schedule).repeat(model)
    bar = tqdm(total=(repeats + cpu_memory) * len(runs), desc="bench", unit="run", disable=not progress)
    if cpu_memory:
        with cpu_memory_measurement() as measuring:
            # the process without the model: what glibc holds now was just given back, so this is its own size
            without_model = resident_mb() - weights_mb(model) if measuring else None
            for run in runs.values():
                run.repeat(model, without_model, timed=False)
                bar.update(1)
    for _ in range(repeats):
        for run in runs.values():
            run.repeat(model)
            bar.update(1)
    bar.close()
    images = ImageSpace(model, vae)
    evaluator = quality_evaluator(model) if evaluator is DEFAULT else evaluator
    return {name: run.finish(images, evaluator) for name, run in runs.items()}


def benchmark(model: MAR, plan: SamplePlan, settings: SamplingSettings, schedule: CacheSchedule, repeats: int = 3,
              warmup: bool = True, vae=None, evaluator=DEFAULT, cpu_memory: bool = False,
              progress: bool = True, runs_out: dict | None = None) -> dict:
    """Uncached ("none") against ``schedule``; the JSON-able comparison: each run's summary (runs.Run.summary),
    and the cached run's fidelity against the baseline (runs.fidelity; infinite values as "inf"). ``runs_out``
    receives the finished runs (for intervals, lazymar.runs.intervals)."""
    runs = benchmark_runs(model, plan, settings, schedule, repeats, warmup, vae, evaluator, cpu_memory,
                          progress)
    if runs_out is not None:
        runs_out.update(runs)
    out: dict = {}
    for name, run in runs.items():
        out[name] = {"accuracy": None, "fid": None, **run.summary()}
    out.update(fidelity(runs["cached"], runs["baseline"]))
    for key in ("psnr", "token_mse"):
        if isinstance(out[key], float) and math.isinf(out[key]):
            out[key] = "inf"
    return out
