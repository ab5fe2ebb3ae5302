"""A candidate run against the uncached reference run of the same plan: every comparison metric, computed here once.

- ``psnr``: in image space, 10 log10(2.0^2 / MSE) over images in [-1, 1] (runs.images.IMAGE_DATA_RANGE), for pixel
  and VAE models alike; None where the model has no image space (latent tokens without a VAE); inf when equal;
  where the runs did not keep their images (VAE models) both are decoded again chunk by chunk (streamed MSE);
- ``token_mse``: mean squared difference of the tokens;
- ``flops_ratio``, ``wall_ratio``, ``cpu_time_ratio``: reference / candidate (FLOPs of the engine's ledger; median
  seconds); ``memory_ratio``: candidate / reference peak memory (None where not measured);
- quality (accuracy, FID, ...): each run's own, from the model's quality evaluator (runs.images).

Under torchrun the comparison is made on rank 0, which holds the gathered tokens; other ranks get None metrics.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..cache.schedule import CacheSchedule, exact_schedule
from ..errors import LazymarError
from ..model import MAR
from ..sampling import SamplingSettings
from .execute import Run
from .images import IMAGE_DATA_RANGE, ImageSpace, QualityEvaluator, decode_and_score, quality_evaluator
from .plan import SamplePlan

DEFAULT = object()  # "the model's own quality evaluator"


class RunError(LazymarError):
    """A comparison that cannot be made; the message names the problem."""


def fidelity(candidate: Run, reference: Run) -> dict:
    """The candidate's numbers relative to the reference (both sampled and finished, same plan)."""
    from ..metrics import psnr, token_mse
    if candidate.plan != reference.plan:
        raise RunError("a candidate is compared with the reference of the same plan (labels, seed, batch size)")
    c, r = candidate.summary(), reference.summary()
    tokens = candidate.tokens is not None and reference.tokens is not None  # False on ranks other than 0
    if candidate.images is not None and reference.images is not None:
        image_psnr = psnr(candidate.images, reference.images, data_range=IMAGE_DATA_RANGE)
    else:
        space = candidate.image_space or reference.image_space
        image_psnr = streamed_psnr(space, candidate.tokens, reference.tokens,
                                   (candidate.settings.precision, reference.settings.precision)) \
            if tokens and space is not None and space.available else None
    return {"flops_ratio": r["flops"] / c["flops"] if c["flops"] else None,
            "wall_ratio": r["seconds"] / c["seconds"], "cpu_time_ratio": r["cpu_seconds"] / c["cpu_seconds"],
            "memory_ratio": (c["peak_memory_mb"] / r["peak_memory_mb"]
                             if c["peak_memory_mb"] and r["peak_memory_mb"] else None),
            "psnr": image_psnr, "token_mse": token_mse(candidate.tokens, reference.tokens) if tokens else None}


def streamed_psnr(space: ImageSpace, tokens, reference_tokens, precisions: tuple[str, str] = ("fp32", "fp32")
                  ) -> float:
    """PSNR (data range 2) of the images of ``tokens`` against those of ``reference_tokens``, decoded chunk by
    chunk (each under its run's precision); the squared errors summed in float64."""
    total, count = 0.0, 0
    for (_, a), (_, b) in zip(space.chunks(tokens, precisions[0]), space.chunks(reference_tokens, precisions[1])):
        total += float(((a.double() - b.double()) ** 2).sum())
        count += a.numel()
    mse = total / count
    return math.inf if mse == 0.0 else 10.0 * math.log10(IMAGE_DATA_RANGE ** 2 / mse)


class Reference:
    """The uncached run of a plan and candidates measured against it. The uncached run is the fastest exact sampler
    (cache.schedule.exact_schedule: the head's invariants hoisted, as the cached schedules do), FLOPs counted.

    ``evaluator``: the quality evaluator of the runs (default: the model's own, see runs.images; None: no quality).
    ``psnr(schedule)`` is the measure that schedule searches (lazymar derive) expect."""

    def __init__(self, model: MAR, plan: SamplePlan, settings: SamplingSettings, vae=None,
                 evaluator: Optional[QualityEvaluator] | object = DEFAULT, cpu_baseline_mb: Optional[float] = None,
                 progress: bool = False, keep_images: Optional[bool] = None):
        self.model, self.plan, self.settings = model, plan, settings
        self.image_space = ImageSpace(model, vae, keep=keep_images)
        self.evaluator = quality_evaluator(model, vae) if evaluator is DEFAULT else evaluator
        self.cpu_baseline_mb, self.progress = cpu_baseline_mb, progress
        self.schedule = exact_schedule(settings.num_iter)
        self.run = self.sample("none", self.schedule, quality=False)
        self._scored = False

    @property
    def labels(self) -> list[int]:
        return list(self.plan.labels)

    @property
    def tokens(self):
        return self.run.tokens

    @property
    def images(self):
        return self.run.images

    def sample(self, name: str, schedule: CacheSchedule, settings: Optional[SamplingSettings] = None,
               quality: bool = True) -> Run:
        """A finished run of ``schedule`` on this plan (one timed repetition); scored when ``quality``."""
        run = Run(name, self.plan, settings or self.settings, schedule)
        run.repeat(self.model, self.cpu_baseline_mb, progress=self.progress)
        return run.finish(self.image_space, self.evaluator if quality else None)

    def quality(self) -> dict:
        """The reference's own quality (scored on first use)."""
        if not self._scored and self.evaluator is not None and self.run.tokens is not None:
            self.run.quality = decode_and_score(self.image_space, self.run.tokens, self.plan.labels,
                                                self.evaluator, self.run.settings.precision)[1]
        self._scored = True
        return dict(self.run.quality)

    def row(self, quality: bool = True) -> dict:
        """The reference's own summary (with its quality when ``quality``) and fidelity against itself: ratios 1,
        token MSE 0, PSNR inf (None without an image space)."""
        if quality:
            self.quality()
        return {**self.run.summary(), **fidelity(self.run, self.run)}

    def measure(self, schedule: CacheSchedule, settings: Optional[SamplingSettings] = None, quality: bool = True,
                name: Optional[str] = None) -> tuple[Run, dict]:
        """Run ``schedule`` (under ``settings``: e.g. fewer steps) and its summary with the fidelity metrics."""
        run = self.sample(name or schedule.name, schedule, settings, quality)
        return run, {**run.summary(), **fidelity(run, self.run)}

    def psnr(self, schedule: CacheSchedule) -> float:
        """PSNR (dB) of ``schedule``'s images against the reference's; RunError without an image space."""
        if not self.image_space.available:
            raise RunError("measured PSNR needs images: this model's tokens are VAE latents and no VAE was given")
        return float(self.measure(schedule, quality=False)[1]["psnr"])
