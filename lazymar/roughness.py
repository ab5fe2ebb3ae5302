"""Pixel roughness of images and the pixel noise that raises it: a statistic for both digits models, the
roughness inputs of the 32x32 classifier (lazymar.metrics), and the noise its negative class is trained on.

Roughness is the mean absolute difference between neighbouring pixels, horizontal and vertical pairs pooled, of
images clipped to [-1, 1] (as the metrics score them). Real 8x8 digits have sharp strokes and a flat background;
real 32x32 digits (bilinear upsampling, lazymar.digits.upsample) are ramps four pixels long, so their roughness is
about a quarter of it. Isolated speckles and pixel noise raise it; blurred or blank images lower it. It is reported
beside ``roughness_real``, the same statistic of the real held-out digits at the same resolution.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

NOISE_KINDS = ("gaussian", "block", "speckle")


def neighbour_differences(images: Tensor) -> tuple[Tensor, Tensor]:
    """|x[..., i, j+1] - x[..., i, j]| (N, C, H, W-1) and |x[..., i+1, j] - x[..., i, j]| (N, C, H-1, W)."""
    return ((images[..., :, 1:] - images[..., :, :-1]).abs(), (images[..., 1:, :] - images[..., :-1, :]).abs())


def per_image_roughness(images: Tensor) -> np.ndarray:
    """(N,) float64 roughness of each image in [-1, 1] (clipped): the mean of its horizontal and vertical
    neighbour differences pooled (equally many of each for square images)."""
    x = images.detach().cpu().double().clamp(-1, 1)
    dx, dy = neighbour_differences(x)
    total = dx.flatten(1).sum(1) + dy.flatten(1).sum(1)
    return (total / (dx[0].numel() + dy[0].numel())).numpy()


def roughness(images: Tensor) -> float:
    """Mean roughness of (N, C, H, W) images in [-1, 1] (every image has as many pixel pairs: the pooled mean)."""
    return float(per_image_roughness(images).mean())


@lru_cache(maxsize=4)
def roughness_real(side: int = 8) -> float:
    """Roughness of the real held-out digits at ``side`` x ``side`` (upsampled as the model's data)."""
    from .digits import digits_split
    return roughness(digits_split("held_out", side)[0])


def roughness_map(images: Tensor, cells: int = 8) -> Tensor:
    """(N, cells * cells) local roughness: the absolute neighbour differences of each pixel (to its right and
    below; 0 past the edge) summed, averaged over each of cells x cells blocks of the image. Position-coarse, so a
    classifier reading it sees noise anywhere with few weights."""
    dx, dy = neighbour_differences(images)
    local = torch.nn.functional.pad(dx, (0, 1)) + torch.nn.functional.pad(dy, (0, 0, 0, 1))
    return torch.nn.functional.adaptive_avg_pool2d(local, cells).flatten(1)


def add_pixel_noise(images: Tensor, kind: str, amplitude: float, generator: torch.Generator) -> Tensor:
    """``images`` in [-1, 1] with pixel noise of ``amplitude`` (on the [-1, 1] scale), clipped to [-1, 1]:

    - ``gaussian``: independent N(0, amplitude^2) on every pixel;
    - ``block``: the same, constant over 2x2 pixel blocks (the tokens of the digits16 model);
    - ``speckle``: a fraction ``amplitude / 4`` of the pixels set to uniform values in [-1, 1] (isolated dots).
    """
    n, c, h, w = images.shape
    if kind == "gaussian":
        noisy = images + amplitude * torch.randn(images.shape, generator=generator)
    elif kind == "block":
        coarse = amplitude * torch.randn((n, c, (h + 1) // 2, (w + 1) // 2), generator=generator)
        noisy = images + coarse.repeat_interleave(2, -2).repeat_interleave(2, -1)[..., :h, :w]
    elif kind == "speckle":
        hit = torch.rand(images.shape, generator=generator) < amplitude / 4
        noisy = torch.where(hit, torch.rand(images.shape, generator=generator) * 2 - 1, images)
    else:
        raise ValueError(f"noise kind must be one of {', '.join(NOISE_KINDS)}, got {kind!r}")
    return noisy.clamp(-1, 1)


def noisy_copies(images: Tensor, seed: int, low: float = 0.15, high: float = 0.6) -> Tensor:
    """One noisy copy of each image: a kind drawn uniformly from :data:`NOISE_KINDS` and an amplitude drawn
    log-uniformly in [low, high] per image (the negative class of the 32x32 classifier; seeded)."""
    generator = torch.Generator().manual_seed(seed)
    kinds = torch.randint(len(NOISE_KINDS), (len(images),), generator=generator)
    amplitudes = torch.exp(torch.empty(len(images)).uniform_(np.log(low), np.log(high), generator=generator))
    out = torch.empty_like(images)
    for i in range(len(images)):
        out[i:i + 1] = add_pixel_noise(images[i:i + 1], NOISE_KINDS[int(kinds[i])], float(amplitudes[i]), generator)
    return out
