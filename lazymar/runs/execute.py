"""Generating a plan's tokens under a cache schedule, batch by batch, and the timed record of such a run.

Batch k is generated with ``torch.Generator(device).manual_seed(batch.seed)`` (the one seed rule, runs.plan) and,
when a schedule is given, its own fresh ``CacheEngine(schedule)``; the FLOPs ledgers of the batches are merged.
``rank``/``world_size`` pick this process's batches (round robin) so that a multi-process layer reuses it.

Under torchrun (lazymar.distributed) a :class:`Run` generates this rank's share and keeps it (``local_tokens``,
the samples of ``segments``); each rank decodes and scores its own samples and the quality statistics are merged
on every rank (runs.images.score_images), as are the fidelity metrics (runs.compare); the tokens themselves are
gathered (in sample order, on rank 0) only for a run made with ``gather_tokens`` (a command that writes them).
The FLOPs ledgers of all ranks are merged. Timing: the ranks start together (barrier) and each times its own
share, CUDA synchronised; a repetition's ``seconds`` is the slowest rank's (the wall time of the parallel run),
``cpu_seconds`` the sum over ranks (the CPU work), ``peak_memory_mb`` the largest rank's. One rank and N ranks
give the same tokens and the same metrics.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..cache.engine import CacheEngine
from ..cache.flops import FlopsLedger
from ..cache.schedule_file import CacheSchedule
from ..model import MAR
from ..sampling import SamplingSettings, generate
from .images import ImageSpace, QualityEvaluator, score_images
from .memory import PeakMemory
from .plan import SamplePlan


def generate_tokens(model: MAR, plan: SamplePlan, settings: SamplingSettings,
                    schedule: Optional[CacheSchedule] = None, rank: int = 0, world_size: int = 1,
                    progress: bool = False, desc: str = "sampling") -> tuple[Tensor, FlopsLedger]:
    """Tokens (N, seq_len, token_dim) of this rank's batches, in batch order, and the FLOPs of all of them
    (an empty ledger without a schedule: the plain sampler counts nothing)."""
    device = next(model.parameters()).device
    out, ledger = [], FlopsLedger()
    for batch in tqdm(plan.batches(rank, world_size), desc=desc, unit="batch", disable=not progress, leave=False):
        engine = CacheEngine(schedule) if schedule is not None else None
        generator = torch.Generator(device).manual_seed(batch.seed)
        out.append(generate(model, list(batch.labels), settings, seed=generator, runner=engine))
        if engine is not None:
            ledger = ledger.merge(engine.flops)
    if not out:  # more ranks than batches
        return torch.zeros(0, model.seq_len, model.token_dim, device=device), ledger
    return torch.cat(out), ledger


@dataclass
class Run:
    """A plan sampled under a schedule: its tokens (CPU; under torchrun only on rank 0 and with ``gather_tokens``)
    and this rank's (``local_tokens``, the samples of ``segments``: all of them on one process), the FLOPs of all
    batches, the wall and process CPU seconds and peak memory (MiB) of every timed repetition, and, once
    :meth:`finish` ran, its images (this rank's, when the image space keeps them), its quality (the whole run's,
    on every rank) and the evaluator's merged stream (``quality_stream``: per-sample values)."""

    name: str
    plan: SamplePlan
    settings: SamplingSettings
    schedule: Optional[CacheSchedule]
    tokens: Optional[Tensor] = None
    flops: FlopsLedger = field(default_factory=FlopsLedger)
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    peak_memory_mb: list[float] = field(default_factory=list)
    repeats_identical: bool = True
    repetitions: int = 0  # timed or not
    images: Optional[Tensor] = None
    quality: dict = field(default_factory=dict)
    image_space: Optional[ImageSpace] = None
    world_size: int = 1
    gather_tokens: bool = False
    local_tokens: Optional[Tensor] = None
    segments: list[tuple[int, int]] = field(default_factory=list)  # (first sample, count) of local_tokens' rows
    quality_stream: Optional[object] = None

    def mine(self) -> tuple[Optional[Tensor], list[tuple[int, int]]]:
        """This rank's tokens and their segments: ``local_tokens``, or for a run made from tokens, all of them."""
        if self.local_tokens is not None:
            return self.local_tokens, self.segments
        if self.tokens is not None:
            return self.tokens, [(0, len(self.tokens))]
        return None, []

    def repeat(self, model: MAR, cpu_baseline_mb: Optional[float] = None, progress: bool = False,
               timed: bool = True) -> "Run":
        """Sample the plan once more (this rank's share under torchrun), timed (CUDA synchronised) and gathered;
        notes whether the tokens repeat exactly. ``timed=False``: a repetition for its peak memory only."""
        from .. import distributed
        device = next(model.parameters()).device
        rank, self.world_size = distributed.rank(), distributed.world_size()
        distributed.barrier()
        with PeakMemory(device, cpu_baseline_mb) as memory:
            start, cpu_start = time.perf_counter(), time.process_time()
            tokens, ledger = generate_tokens(model, self.plan, self.settings, self.schedule, rank, self.world_size,
                                             progress=progress and distributed.is_main(), desc=self.name)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        segments = [(batch.start, batch.stop - batch.start) for batch in self.plan.batches(rank, self.world_size)]
        tokens = tokens.detach().cpu()
        identical = self.repetitions == 0 or torch.equal(self.local_tokens, tokens)
        parts = distributed.gather_objects((ledger, seconds, cpu_seconds, memory.peak_mb, identical), dst=None)
        if self.repetitions == 0:
            self.local_tokens, self.segments, self.flops = tokens, segments, FlopsLedger()
            if not distributed.active():
                self.tokens = tokens
            elif self.gather_tokens:  # None on ranks other than 0
                index = [start + i for start, count in segments for i in range(count)]
                self.tokens = distributed.gather_samples(tokens, index)
            for part in parts:
                self.flops = self.flops.merge(part[0])
        elif not all(part[4] for part in parts):
            self.repeats_identical = False
        self.repetitions += 1
        if timed:
            self.seconds.append(max(part[1] for part in parts))
            self.cpu_seconds.append(sum(part[2] for part in parts))
        peaks = [part[3] for part in parts if part[3] is not None]
        if peaks:
            self.peak_memory_mb.append(max(peaks))
        return self

    def finish(self, images: ImageSpace, evaluator: Optional[QualityEvaluator] = None) -> "Run":
        """Decode this rank's images and score them with ``evaluator`` (if any), streamed and merged over the
        ranks (runs.images.score_images); the images are kept when ``images.keep``."""
        if not self.repetitions:
            raise RuntimeError(f"run {self.name!r} has not been sampled yet")
        self.image_space = images
        self.score(evaluator)
        return self

    def score(self, evaluator: Optional[QualityEvaluator]) -> dict:
        """Decode (images kept when the image space keeps them) and score; the run's quality, on every rank."""
        tokens, segments = self.mine()
        self.images, quality, self.quality_stream = score_images(self.image_space, tokens, self.plan.labels,
                                                                 evaluator, segments, self.settings.precision)
        self.quality = quality if evaluator is not None else self.quality
        return self.quality

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    def summary(self) -> dict:
        """The JSON-able numbers of this run alone (medians over repetitions; quality keys when scored)."""
        totals = self.flops.totals()
        return {"flops": totals["total"], "flops_per_image": totals["total"] / self.plan.num_samples,
                "flops_by_component": {k: v for k, v in totals.items() if k != "total"},
                "seconds": self.median_seconds, "seconds_all": list(self.seconds),
                "cpu_seconds": statistics.median(self.cpu_seconds), "cpu_seconds_all": list(self.cpu_seconds),
                "peak_memory_mb": max(self.peak_memory_mb) if self.peak_memory_mb else None,
                "repeats_identical": self.repeats_identical, **self.quality}
