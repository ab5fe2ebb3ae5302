"""Generating a plan's tokens under a cache schedule, batch by batch, and the timed record of such a run.

Batch k is generated with ``torch.Generator(device).manual_seed(batch.seed)`` (the one seed rule, runs.plan) and,
when a schedule is given, its own fresh ``CacheEngine(schedule)``; the FLOPs ledgers of the batches are merged.
``rank``/``world_size`` pick this process's batches (round robin) so that a multi-process layer reuses it.

Under torchrun (lazymar.distributed) a :class:`Run` generates this rank's share and gathers it: the tokens in
sample order on rank 0 (the other ranks hold none, and decode, score and compare nothing), the FLOPs ledgers of
all ranks merged. Timing: the ranks start together (barrier) and each times its own share, CUDA synchronised; a
repetition's ``seconds`` is the slowest rank's (the wall time of the parallel run), ``cpu_seconds`` the sum over
ranks (the CPU work), ``peak_memory_mb`` the largest rank's. One rank and N ranks give the same tokens.
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
from ..cache.schedule import CacheSchedule
from ..model import MAR
from ..sampling import SamplingSettings, generate
from .images import ImageSpace, QualityEvaluator, decode_and_score
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
    """A plan sampled under a schedule: its tokens (CPU; rank 0 only under torchrun), the FLOPs of all batches, the
    wall and process CPU seconds and peak memory (MiB) of every timed repetition, and, once :meth:`finish` ran, its
    images (when the image space keeps them) and quality."""

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
        index = [i for batch in self.plan.batches(rank, self.world_size) for i in range(batch.start, batch.stop)]
        tokens = distributed.gather_samples(tokens.detach(), index)  # None on ranks other than 0
        parts = distributed.gather_objects((ledger, seconds, cpu_seconds, memory.peak_mb), dst=None)
        tokens = None if tokens is None else tokens.cpu()
        if self.repetitions == 0:
            self.tokens, self.flops = tokens, FlopsLedger()
            for part in parts:
                self.flops = self.flops.merge(part[0])
        elif tokens is not None and not torch.equal(self.tokens, tokens):
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
        """Decode the images and score them with ``evaluator`` (if any), streamed (runs.images.decode_and_score);
        the images are kept when ``images.keep``. Nothing to do on ranks other than 0 under torchrun."""
        if not self.repetitions:
            raise RuntimeError(f"run {self.name!r} has not been sampled yet")
        self.image_space = images
        if self.tokens is not None:
            self.images, quality = decode_and_score(images, self.tokens, self.plan.labels, evaluator,
                                                    self.settings.precision)
            self.quality = quality if evaluator is not None else self.quality
        return self

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
