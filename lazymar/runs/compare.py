"""A candidate run against the uncached reference run of the same plan: every comparison metric, computed here once.

- ``psnr``: in image space, 10 log10(2.0^2 / MSE) over images in [-1, 1] (runs.images.IMAGE_DATA_RANGE), for pixel
  and VAE models alike; None where the model has no image space (latent tokens without a VAE); inf when equal;
  where the runs did not keep their images (VAE models) both are decoded again chunk by chunk (streamed MSE);
- ``token_mse``: mean squared difference of the tokens;
- ``flops_ratio``, ``wall_ratio``, ``cpu_time_ratio``: reference / candidate (FLOPs of the engine's ledger; median
  seconds); ``memory_ratio``: candidate / reference peak memory (None where not measured);
- quality (accuracy, FID, ...): each run's own, from the model's quality evaluator (runs.images).

Under torchrun every rank compares its own samples of the two runs and the per-sample squared errors are gathered
to every rank (:func:`sample_squared_errors`), so every rank gets the run's metrics, equal to one process's.
PSNR and token MSE are sums of per-sample float64 sums taken in sample order, whatever the number of ranks.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..cache.schedule_file import CacheSchedule, exact_schedule
from ..errors import LazymarError
from ..model import MAR
from ..sampling import SamplingSettings
from .execute import Run
from torch import Tensor

from .images import IMAGE_DATA_RANGE, ImageSpace, QualityEvaluator, quality_evaluator, segment_chunks
from .plan import SamplePlan

DEFAULT = object()  # "the model's own quality evaluator"


class RunError(LazymarError):
    """A comparison that cannot be made; the message names the problem."""


def fidelity(candidate: Run, reference: Run) -> dict:
    """The candidate's numbers relative to the reference (both sampled and finished, same plan)."""
    if candidate.plan != reference.plan:
        raise RunError("a candidate is compared with the reference of the same plan (labels, seed, batch size)")
    c, r = candidate.summary(), reference.summary()
    errors = sample_squared_errors(candidate, reference)
    return {"flops_ratio": r["flops"] / c["flops"] if c["flops"] else None,
            "wall_ratio": r["seconds"] / c["seconds"], "cpu_time_ratio": r["cpu_seconds"] / c["cpu_seconds"],
            "memory_ratio": (c["peak_memory_mb"] / r["peak_memory_mb"]
                             if c["peak_memory_mb"] and r["peak_memory_mb"] else None),
            "psnr": None if errors.get("images") is None else
            psnr_of(float(errors["images"].sum()) / (len(errors["images"]) * errors["image_elements"])),
            "token_mse": None if errors.get("tokens") is None else
            float(errors["tokens"].sum()) / (len(errors["tokens"]) * errors["token_elements"])}


def psnr_of(mse: float) -> float:
    """10 log10(IMAGE_DATA_RANGE^2 / mse); inf for equal images."""
    return math.inf if mse == 0.0 else 10.0 * math.log10(IMAGE_DATA_RANGE ** 2 / mse)


def _sums(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample float64 sums of squared differences of two equally shaped (n, ...) tensors."""
    return ((a.double() - b.double()) ** 2).flatten(1).sum(dim=1)


def sample_squared_errors(candidate: Run, reference: Run) -> dict:
    """Per-sample sums of squared differences (float64, in sample order, on every rank) of the candidate's tokens
    against the reference's (``tokens``) and of their images (``images``; None without an image space), and the
    number of elements per sample of each (``token_elements``, ``image_elements``). Each rank compares its own
    samples (the images kept, or decoded again chunk by chunk) and the arrays are gathered to every rank."""
    from .. import distributed
    (tokens, segments), (ref_tokens, ref_segments) = candidate.mine(), reference.mine()
    if tokens is None or ref_tokens is None:
        return {}
    if segments != ref_segments or tokens.shape != ref_tokens.shape:
        raise RunError("the two runs hold different samples on this rank")
    index = [start + i for start, count in segments for i in range(count)]
    out = {"tokens": _sums(tokens, ref_tokens), "token_elements": math.prod(tokens.shape[1:]), "images": None}
    elements = 0  # per image; 0 on a rank without samples (the others tell)
    if candidate.images is not None and reference.images is not None:
        out["images"], elements = _sums(candidate.images, reference.images), math.prod(candidate.images.shape[1:])
    else:
        space = candidate.image_space or reference.image_space
        if space is not None and space.available:
            parts = []
            for (_, a), (_, b) in zip(segment_chunks(space, tokens, segments, candidate.settings.precision),
                                      segment_chunks(space, ref_tokens, segments, reference.settings.precision)):
                parts.append(_sums(a, b))
                elements = math.prod(a.shape[1:])
            out["images"] = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    for key in ("tokens", "images"):
        if out[key] is not None:
            out[key] = distributed.gather_samples(out[key], index, dst=None).numpy()
    if out["images"] is not None:
        out["image_elements"] = max(distributed.gather_objects(elements, dst=None))
    return out


class Reference:
    """The uncached run of a plan and candidates measured against it. The uncached run is the fastest exact sampler
    (cache.schedule_file.exact_schedule: the head's invariants hoisted, as the cached schedules do), FLOPs counted.

    ``evaluator``: the quality evaluator of the runs (default: the model's own, see runs.images; None: no quality).
    ``psnr(schedule)`` is the measure that schedule searches (lazymar derive) expect."""

    def __init__(self, model: MAR, plan: SamplePlan, settings: SamplingSettings, vae=None,
                 evaluator: Optional[QualityEvaluator] | object = DEFAULT, cpu_baseline_mb: Optional[float] = None,
                 progress: bool = False, keep_images: Optional[bool] = None):
        self.model, self.plan, self.settings = model, plan, settings
        self.image_space = ImageSpace(model, vae, keep=keep_images)
        self.evaluator = quality_evaluator(model) if evaluator is DEFAULT else evaluator
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
        if not self._scored and self.evaluator is not None:
            self.run.score(self.evaluator)
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
