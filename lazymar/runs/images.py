"""From tokens to images, and the quality of images: the image space of a model and its pluggable evaluators.

Images are (N, C, H, W) on the [-1, 1] scale for every model: the digits model's tokens are its pixels (vae_stride
1, only rearranged by ``model.unpatchify``), a latent-space model's tokens are decoded by its KL-16 VAE
(``vae.decode(unpatchify(tokens) / 0.2325)``, lazymar.vae). So PSNR is always taken in image space with the data
range of that space, :data:`IMAGE_DATA_RANGE` = 2.0. A latent-space model without a VAE has no image space here:
its runs have no images, no PSNR and no image quality (token MSE still compares them).

Quality evaluators are small objects that score a run's images; :func:`quality_evaluator` gives a model's own (the
digits classifier's accuracy and digits-FID for the digits models). Any other evaluator (for example ImageNet FID/IS
of the VAE models, lazymar.imagenet.ImageNetQuality) is a value the caller passes to the run. An evaluator
with a ``stream()`` method sees the images chunk by chunk (:func:`decode_and_score`), so a run of 50k decoded
256x256 images never sits in memory: an :class:`ImageSpace` keeps the images of pixel models (they are the tokens)
and, by default, not those of VAE models (PSNR is then streamed from the tokens too, runs.compare).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Protocol, Sequence

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

    def shape(self) -> tuple[int, ...]:
        """(C, H, W) of one image."""
        return tuple(self(torch.zeros(1, self.model.seq_len, self.model.token_dim,
                                      device=next(self.model.parameters()).device)).shape[1:])

    @torch.no_grad()
    def __call__(self, tokens: Tensor, precision: str = "fp32") -> Optional[Tensor]:
        if not self.available:
            return None
        if self.vae is None:
            return self.model.unpatchify(tokens).detach().cpu().float()
        if len(tokens) == 0:  # e.g. a rank without batches
            return torch.zeros(0, *self.shape())
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
    """Running quality of images added chunk by chunk (``start``: index of the chunk's first sample in the run).

    Under torchrun each rank adds its own samples; ``state()`` is the picklable part that ranks exchange and
    ``merge(states)`` (every rank's state, in rank order) makes the stream hold all samples, so that ``scores()``
    are those of the whole run on every rank. After merging a stream keeps its per-sample values (e.g. the
    digits images, the Inception logits and features) for resampling."""

    def add(self, images: Tensor, start: int) -> None: ...

    def state(self) -> object: ...

    def merge(self, states: Sequence[object]) -> None: ...

    def scores(self) -> dict[str, float]: ...


Segments = Sequence[tuple[int, int]]  # (first sample index in the run, count) of consecutive rows of local tokens


def segment_chunks(image_space: ImageSpace, tokens: Tensor, segments: Segments, precision: str = "fp32"
                   ) -> Iterator[tuple[int, Tensor]]:
    """(index in the run of the first sample, CPU images) of ``tokens``, whose rows are the samples of
    ``segments`` in order, chunk by chunk within each segment (a run's segments are its batches: the same chunks
    on one process and on N ranks, so decoding and scoring give the same numbers bit for bit); the VAE decodes
    under ``precision`` (that of the settings the tokens were sampled with)."""
    offset = 0
    for start, count in segments:
        for i, images in image_space.chunks(tokens[offset:offset + count], precision):
            yield start + i, images
        offset += count


def sample_index(segments: Segments) -> list[int]:
    return [start + i for start, count in segments for i in range(count)]


def score_images(image_space: ImageSpace, tokens: Tensor, labels: Sequence[int],
                 evaluator: Optional[QualityEvaluator] = None, segments: Optional[Segments] = None,
                 precision: str = "fp32") -> tuple[Optional[Tensor], dict, Optional[QualityStream]]:
    """:func:`decode_and_score` of this rank's ``tokens`` (the samples of ``segments``; default: all of the run, in
    order), and the evaluator's stream. Under torchrun every rank decodes and scores its own samples, and the
    streams' states are merged on every rank (an evaluator without a mergeable stream gets all images, gathered
    to every rank): every rank returns the run's quality. Images kept are this rank's."""
    from .. import distributed
    if not image_space.available:
        return None, {}, None
    segments = [(0, len(tokens))] if segments is None else list(segments)
    stream = evaluator.stream(labels) if evaluator is not None and hasattr(evaluator, "stream") else None
    spread = distributed.active()
    if stream is not None and spread and not hasattr(stream, "merge"):
        stream = None  # gather the images instead
    collect = image_space.keep or (evaluator is not None and stream is None)
    kept = []
    for start, images in segment_chunks(image_space, tokens, segments, precision):
        if stream is not None:
            stream.add(images, start)
        if collect:
            kept.append(images)
    images = torch.cat(kept) if kept else None
    if stream is not None:
        if spread:
            stream.merge(distributed.gather_objects(stream.state(), dst=None))
        quality = dict(stream.scores())
    elif evaluator is not None:
        everything = images
        if spread:
            if images is None:  # no sample on this rank: an empty batch of the images' shape
                images = torch.zeros(0, *image_space.shape())
            everything = distributed.gather_samples(images, sample_index(segments), dst=None)
        quality = dict(evaluator(everything, labels))
    else:
        quality = {}
    return (images if image_space.keep else None), quality, stream


def decode_and_score(image_space: ImageSpace, tokens: Tensor, labels: Sequence[int],
                     evaluator: Optional[QualityEvaluator] = None, segments: Optional[Segments] = None,
                     precision: str = "fp32") -> tuple[Optional[Tensor], dict]:
    """The images of ``tokens`` (None unless the image space keeps them) and their quality ({} without an
    evaluator or images). Streaming evaluators (``stream()``) see one chunk at a time, the others all images.
    ``segments``: see :func:`score_images` (under torchrun: this rank's samples; the quality is the run's)."""
    images, quality, _ = score_images(image_space, tokens, labels, evaluator, segments, precision)
    return images, quality


class DigitsQuality:
    """Class accuracy, digits-FID and its floor (lazymar.metrics); FID is NaN for fewer than 2 images. Images
    larger than 8x8 (the digits16 model) are brought back to 8x8 first by the exact inverse of their upsampling
    (:func:`lazymar.digits.to_8x8`), so both models are scored by the same classifier and statistics. Beside them,
    quality at the images' own ``side`` (lazymar.metrics.evaluate_native): roughness against real digits', and for
    side > 8 the FID of that side's classifier (``fid32`` for digits16), which sees the pixel noise to_8x8 removes.
    ``stream(labels)`` collects the (small) images chunk by chunk and rank by rank: merged, they are scored as
    one process scores them, bit for bit."""

    name = "digits"
    keys = ("accuracy", "fid", "fid_floor", "roughness", "roughness_real")  # side 8; an instance has its side's

    def __init__(self, side: int = 8):
        from ..metrics import native_quality_keys
        self.side = side
        self.keys = ("accuracy", "fid", "fid_floor") + native_quality_keys(side)

    def stream(self, labels: Sequence[int]) -> "DigitsStream":
        return DigitsStream(self, labels)

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


class DigitsStream:
    """The images of a run (64 or 1024 floats per sample) with their sample indices; scored once all are in (one
    rank's, or every rank's after ``merge``) exactly as :class:`DigitsQuality` scores all images at once."""

    def __init__(self, evaluator: DigitsQuality, labels: Sequence[int]):
        self.evaluator, self.labels = evaluator, [int(x) for x in labels]
        self.chunks: list[tuple[int, Tensor]] = []

    def add(self, images: Tensor, start: int) -> None:
        self.chunks.append((int(start), images.detach().cpu().float()))

    def state(self) -> list[tuple[int, Tensor]]:
        return self.chunks

    def merge(self, states: Sequence[list[tuple[int, Tensor]]]) -> None:
        self.chunks = [chunk for state in states for chunk in state]

    def images(self) -> Tensor:
        """The images of samples 0..N-1 in order; each sample must have been added exactly once."""
        chunks = sorted(self.chunks, key=lambda chunk: chunk[0])
        expected = 0
        for start, images in chunks:
            if start != expected:
                raise ValueError(f"digits images of samples {expected}..{start - 1} are missing or added twice")
            expected += len(images)
        return torch.cat([images for _, images in chunks])

    def scores(self) -> dict[str, float]:
        images = self.images()
        return self.evaluator(images, self.labels[:len(images)])


def quality_evaluator(model: MAR) -> Optional[QualityEvaluator]:
    """The model's own evaluator: the digits classifier's for the digits models, None for others (whose evaluator,
    e.g. ImageNet FID/IS, the caller builds and passes explicitly)."""
    return DigitsQuality(model.config.img_size) if is_digits_model(model.config) else None
