"""From tokens to images, and the quality of images: the image space of a model and its pluggable evaluators.

Images are (N, C, H, W) on the [-1, 1] scale for every model: the digits model's tokens are its pixels (vae_stride
1, only rearranged by ``model.unpatchify``), a latent-space model's tokens are decoded by its KL-16 VAE
(``vae.decode(unpatchify(tokens) / 0.2325)``, lazymar.vae). So PSNR is always taken in image space with the data
range of that space, :data:`IMAGE_DATA_RANGE` = 2.0. A latent-space model without a VAE has no image space here:
its runs have no images, no PSNR and no image quality (token MSE still compares them).

Quality evaluators are small objects that score a run's images; :func:`quality_evaluator` picks the one that fits
a model (the digits classifier's accuracy and digits-FID for the digits model). An evaluator for other models (for
example ImageNet FID/IS for the VAE models, lazymar.imagenet) plugs in with :func:`register_evaluator`. An evaluator
with a ``stream()`` method sees the images chunk by chunk (:func:`decode_and_score`), so a run of 50k decoded
256x256 images never sits in memory: an :class:`ImageSpace` keeps the images of pixel models (they are the tokens)
and, by default, not those of VAE models (PSNR is then streamed from the tokens too, runs.compare).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Protocol, Sequence

import torch
from torch import Tensor

from ..config import MARConfig
from ..model import MAR

IMAGE_DATA_RANGE = 2.0  # images are in [-1, 1] for pixel and VAE models alike


def is_digits_model(config: MARConfig) -> bool:
    """Tokens are pixels of digit images, 8x8 (``digits``) or upsampled from 8x8 (``digits16``: 32x32): images and
    the digits classifier apply (after :func:`lazymar.digits.to_8x8`)."""
    return (config.vae_stride == 1 and config.vae_embed_dim == 1 and config.class_num == 10
            and config.img_size % 8 == 0 and config.img_size >= 8)


class ImageSpace:
    """Maps a model's tokens (N, seq_len, token_dim) to CPU float images (N, C, H, W) in [-1, 1], or to None when
    the model's tokens are VAE latents and no VAE was given. VAE decoding runs ``decode_batch`` samples at a time.
    ``keep``: whether runs keep their decoded images (default: pixel models only; decoded images are streamed)."""

    def __init__(self, model: MAR, vae=None, decode_batch: int = 32, keep: Optional[bool] = None):
        from ..vae import check_vae_fits
        if vae is not None:
            check_vae_fits(model, vae)
        self.model, self.vae, self.decode_batch = model, vae, decode_batch
        self.keep = vae is None if keep is None else keep

    @property
    def available(self) -> bool:
        return self.vae is not None or self.model.config.vae_stride == 1

    @torch.no_grad()
    def __call__(self, tokens: Tensor, precision: str = "fp32") -> Optional[Tensor]:
        if not self.available:
            return None
        if self.vae is None:
            return self.model.unpatchify(tokens).detach().cpu().float()
        return torch.cat([images for _, images in self.chunks(tokens, precision)])

    @torch.no_grad()
    def chunks(self, tokens: Tensor, precision: str = "fp32") -> Iterator[tuple[int, Tensor]]:
        """(index of the first sample, CPU float images) of ``decode_batch`` samples at a time, the VAE decoding
        under ``precision`` (that of the settings the tokens were sampled with, lazymar.precision)."""
        from ..vae import tokens_to_images
        for i in range(0, len(tokens), self.decode_batch):
            batch = tokens[i:i + self.decode_batch]
            yield i, tokens_to_images(self.model, batch, self.vae, precision).cpu().float()


class QualityEvaluator(Protocol):
    """Scores the images of a run drawn for ``labels``: named numbers (``keys``), e.g. accuracy and FID."""

    name: str
    keys: tuple[str, ...]

    def __call__(self, images: Tensor, labels: Sequence[int]) -> dict[str, float]: ...


class QualityStream(Protocol):
    """Running quality of images added chunk by chunk (``start``: index of the chunk's first sample)."""

    def add(self, images: Tensor, start: int) -> None: ...

    def scores(self) -> dict[str, float]: ...


def decode_and_score(image_space: ImageSpace, tokens: Tensor, labels: Sequence[int],
                     evaluator: Optional[QualityEvaluator] = None,
                     precision: str = "fp32") -> tuple[Optional[Tensor], dict]:
    """The images of ``tokens`` (None unless the image space keeps them; decoded under ``precision``) and their
    quality ({} without an evaluator or images; scored in float32). Streaming evaluators (``stream()``) see one
    chunk at a time, the others all images."""
    if not image_space.available:
        return None, {}
    stream = evaluator.stream() if evaluator is not None and hasattr(evaluator, "stream") else None
    collect = image_space.keep or (evaluator is not None and stream is None)
    kept = []
    for start, images in image_space.chunks(tokens, precision):
        if stream is not None:
            stream.add(images, start)
        if collect:
            kept.append(images)
    images = torch.cat(kept) if kept else None
    if stream is not None:
        quality = dict(stream.scores())
    else:
        quality = dict(evaluator(images, labels)) if evaluator is not None else {}
    return (images if image_space.keep else None), quality


class DigitsQuality:
    """Class accuracy, digits-FID and its floor (lazymar.metrics); FID is NaN for fewer than 2 images. Images
    larger than 8x8 (the digits16 model) are brought back to 8x8 first by the exact inverse of their upsampling
    (:func:`lazymar.digits.to_8x8`), so both models are scored by the same classifier and statistics. Beside them,
    quality at the images' own ``side`` (lazymar.metrics.evaluate_native): roughness against real digits', and for
    side > 8 the FID of that side's classifier (``fid32`` for digits16), which sees the pixel noise to_8x8 removes."""

    name = "digits"
    keys = ("accuracy", "fid", "fid_floor", "roughness", "roughness_real")  # side 8; an instance has its side's

    def __init__(self, side: int = 8):
        from ..metrics import native_quality_keys
        self.side = side
        self.keys = ("accuracy", "fid", "fid_floor") + native_quality_keys(side)

    def __call__(self, images: Tensor, labels: Sequence[int]) -> dict[str, float]:
        from ..digits import to_8x8
        from ..metrics import class_accuracy, evaluate_digits, evaluate_native
        native = {k: v for k, v in evaluate_native(images).items() if k in self.keys}
        images = to_8x8(images)
        labels = torch.tensor([int(x) for x in labels])
        if len(images) < 2:
            return {"accuracy": class_accuracy(images, labels), "fid": math.nan, "fid_floor": math.nan, **native}
        out = evaluate_digits(images, labels)
        return {**{k: out[k] for k in ("accuracy", "fid", "fid_floor")}, **native}


EvaluatorFactory = Callable[[MAR, object], Optional[QualityEvaluator]]
_FACTORIES: list[EvaluatorFactory] = [lambda model, vae: DigitsQuality(model.config.img_size)
                                       if is_digits_model(model.config) else None]


def register_evaluator(factory: EvaluatorFactory) -> None:
    """Add ``factory(model, vae) -> evaluator or None``; factories are asked in order of registration."""
    _FACTORIES.append(factory)


def quality_evaluator(model: MAR, vae=None) -> Optional[QualityEvaluator]:
    """The first registered evaluator that fits ``model`` (and its VAE), or None when none does."""
    for factory in _FACTORIES:
        evaluator = factory(model, vae)
        if evaluator is not None:
            return evaluator
    return None
