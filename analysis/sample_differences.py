"""Cached against uncached samples for the same seeds, with per-pixel difference maps: the figure a caching paper
shows first. All runs share one plan (labels, seed, batch size), so a cached sample differs from its uncached twin
only by what the cache reused; the maps show where in the image that error landed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
from matplotlib.figure import Figure

from lazymar.cache import CacheSchedule
from lazymar.model import MAR
from lazymar.runs import IMAGE_DATA_RANGE, ImageSpace, SamplePlan, generate_tokens
from lazymar.sampling import SamplingSettings

from .figures import subplots

UNCACHED = "uncached"


@dataclass(frozen=True)
class SampleDifferences:
    """Images (N, H, W, C) in [-1, 1] of one plan: the uncached run and each named cached run."""

    labels: tuple[int, ...]
    uncached: np.ndarray
    cached: Mapping[str, np.ndarray]

    def difference(self, name: str) -> np.ndarray:
        """(N, H, W) absolute per-pixel difference to the uncached twin, averaged over colour channels."""
        return np.abs(self.cached[name] - self.uncached).mean(axis=-1)

    def psnr(self, name: str) -> np.ndarray:
        """(N,) PSNR in dB of each cached sample against its uncached twin (data range 2; inf where equal)."""
        mse = ((self.cached[name] - self.uncached) ** 2).reshape(len(self.uncached), -1).mean(axis=1)
        with np.errstate(divide="ignore"):
            return 10.0 * np.log10(IMAGE_DATA_RANGE ** 2 / mse)


def sample_differences(model: MAR, schedules: Mapping[str, CacheSchedule], plan: SamplePlan,
                       settings: SamplingSettings, vae=None, progress: bool = False) -> SampleDifferences:
    """Sample ``plan`` uncached and under each schedule (same orders and noise) and decode all of them."""
    if not schedules:
        raise ValueError("name at least one cache schedule to compare with the uncached run")
    if UNCACHED in schedules:
        raise ValueError(f"{UNCACHED!r} names the reference run; give the schedules other names")
    image_space = ImageSpace(model, vae)
    if not image_space.available:
        raise ValueError("these tokens are VAE latents: pass the VAE that decodes them")

    def images(schedule: Optional[CacheSchedule], name: str) -> np.ndarray:
        tokens, _ = generate_tokens(model, plan, settings, schedule, progress=progress, desc=name)
        return image_space(tokens, settings.precision).permute(0, 2, 3, 1).numpy().astype(np.float64)

    return SampleDifferences(plan.labels, images(None, UNCACHED),
                             {name: images(schedule, name) for name, schedule in schedules.items()})


def draw_sample_differences(found: SampleDifferences, max_difference: Optional[float] = None,
                            title: Optional[str] = None) -> Figure:
    """One row per sample: the uncached image, then for each schedule its image and the |cached - uncached| map
    (one colour scale for every map, default the largest difference), each cached image titled with its PSNR."""
    names = list(found.cached)
    n = len(found.uncached)
    vmax = max_difference or max(max(float(found.difference(k).max()) for k in names), 1e-6)
    fig, axes = subplots(n, 1 + 2 * len(names), figsize=(1.25 * (1 + 2 * len(names)) + 0.8, 1.3 * n + 0.6),
                         squeeze=False)
    maps = None
    for i in range(n):
        _show_image(axes[i, 0], found.uncached[i])
        axes[i, 0].set_ylabel(f"class {found.labels[i]}", fontsize=8)
        for j, name in enumerate(names):
            _show_image(axes[i, 1 + 2 * j], found.cached[name][i])
            axes[i, 1 + 2 * j].set_title(f"{found.psnr(name)[i]:.1f} dB", fontsize=7, pad=2)
            maps = axes[i, 2 + 2 * j].imshow(found.difference(name)[i], cmap="magma", vmin=0.0, vmax=vmax,
                                             interpolation="nearest")
            _bare(axes[i, 2 + 2 * j])
    header = [UNCACHED] + [part for name in names for part in (name, "|difference|")]
    for j, text in enumerate(header):
        axes[0, j].annotate(text, (0.5, 1.35), xycoords="axes fraction", ha="center", fontsize=8, weight="bold")
    fig.colorbar(maps, ax=axes, shrink=0.6, label="|cached - uncached| (pixel value, range 2)")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _show_image(ax, image: np.ndarray) -> None:
    shown = (image.clip(-1.0, 1.0) + 1.0) / 2.0  # as lazymar.grid draws samples
    single = image.shape[-1] == 1
    ax.imshow(shown[..., 0] if single else shown, cmap="gray_r" if single else None, vmin=0.0, vmax=1.0,
              interpolation="nearest")
    _bare(ax)


def _bare(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
