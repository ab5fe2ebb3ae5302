"""ImageNet quality of VAE-decoded samples: FID and Inception Score as the official MAR evaluation computes them.

The official evaluation (MAR's ``engine_mar.py``) turns each decoded image into uint8 with
``np.round(np.clip((img + 1) / 2 * 255, 0, 255))``, writes PNGs and runs torch-fidelity on the folder: the pool
features ('2048') of its TF-compatible Inception-v3 ('inception-v3-compat') against the ADM in256 reference
statistics give FID, its 'logits_unbiased' give IS (10 splits, samples shuffled with seed 2020). Here the same uint8
images (:func:`to_uint8`) go straight to the same extractor, batch by batch and rank by rank, into an
:class:`InceptionStats`; nothing is written to disk (:func:`save_pngs` writes the folder for a cross-check)::

    extractor = load_inception(device)                  # ImageNetMetricsError, one line, without torch-fidelity
    reference = load_reference_stats(args.fid_stats)    # ADM .npz or torch-fidelity's cached .pt; fail early
    stats = InceptionStats()
    for batch in plan.batches(rank, world_size):        # images in [-1, 1] (lazymar.vae.tokens_to_images)
        stats.add_images(extractor, images, start=batch.start)
    stats = InceptionStats.merged(gather_objects(stats, dst=None))  # every rank: one accumulator for the run
    stats.scores(reference)                             # {'fid', 'inception_score', 'inception_score_std', ...}

Memory. FID keeps float64 sums of the features and of their outer products (2048 x 2048), each carried with its
round-off (double-double), so that the order in which batches and ranks are added does not change the result: one
process and N ranks give the same FID. IS keeps every sample's float32 logits (N x 1008, 200 MB at 50k) with its
sample index: torch-fidelity shuffles the samples before cutting the splits, so running per-split sums in arrival
order could not reproduce its number. The runs core's stream also keeps each sample's float32 features
(``keep_features``: 8 kB per sample, 400 MB at 50k) for resampling; under torchrun the statistics of all ranks are
merged on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .compat import TorchVersionError, safe_globals
from .errors import LazymarError
from .metrics import frechet_distance

INCEPTION_NAME = "inception-v3-compat"
INCEPTION_FEATURES = ("2048", "logits_unbiased")  # pool features for FID, logits without bias for IS
IS_SPLITS = 10
IS_SHUFFLE_SEED = 2020  # torch-fidelity's rng_seed default
INSTALL_HINT = ("FID/IS need torch-fidelity and its Inception weights: pip install torch-fidelity torchvision "
                "(online once, the weights are cached in $TORCH_HOME; or pass a local weights file)")

# (N, 3, H, W) uint8 images -> (N, D) pool features, (N, C) logits; the seam a stand-in network plugs into.
FeatureExtractor = Callable[[Tensor], "tuple[Tensor, Tensor]"]


class ImageNetMetricsError(LazymarError):
    """FID/IS cannot be computed (library, weights or reference statistics missing or unfit); one line says why."""


# --- images as the official evaluation sees them ---------------------------------------------------------
def to_uint8(images: Tensor) -> Tensor:
    """(N, 3, H, W) images in [-1, 1] -> uint8 in the official order: (x + 1) / 2, * 255, clip, round (half to even).

    Computed in float32 on the images' device; bit-identical to the official numpy expression on float32 input.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ImageNetMetricsError(f"images must be (N, 3, H, W) RGB, got {tuple(images.shape)}")
    scaled = (images.detach().float() + 1) / 2 * 255
    return torch.round(torch.clamp(scaled, 0, 255)).to(torch.uint8)


def save_pngs(images: Tensor, folder: str | Path, start: int = 0) -> list[Path]:
    """Write uint8 (N, 3, H, W) images as ``{index:05d}.png`` from ``start``, the official file names."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images.cpu().numpy().transpose(0, 2, 3, 1)):
        paths.append(folder / f"{start + i:05d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


# --- the extractor ---------------------------------------------------------------------------------------
class InceptionExtractor:
    """torch-fidelity's Inception-v3 network: uint8 images in chunks of ``batch_size`` -> (features, logits)."""

    def __init__(self, network: torch.nn.Module, device: torch.device, batch_size: int = 64):
        self.network, self.device, self.batch_size = network, device, batch_size

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        outputs = [self.network(chunk.to(self.device)) for chunk in images.split(self.batch_size)]
        return torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])


def load_inception(device: str | torch.device = "cpu", weights_path: Optional[str | Path] = None,
                   batch_size: int = 64) -> InceptionExtractor:
    """The extractor of the official evaluation, loaded the library's standard way (weights downloaded once)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:  # torch-fidelity itself, or torchvision that it imports
        raise ImageNetMetricsError(f"{INSTALL_HINT} ({err})") from None
    try:
        network = FeatureExtractorInceptionV3(INCEPTION_NAME, list(INCEPTION_FEATURES),
                                              feature_extractor_weights_path=None if weights_path is None
                                              else str(weights_path))
    except Exception as err:  # offline download, bad file: whatever the library raises, one line
        raise ImageNetMetricsError(f"{INSTALL_HINT}; loading the Inception weights failed: "
                                   f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    device = torch.device(device)
    return InceptionExtractor(network.to(device).eval(), device, batch_size)


# --- reference statistics --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReferenceStats:
    """Mean (D,) and covariance (D, D) of the reference set's features, and the file they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    path: str


def _load_torch_stats(path: Path) -> dict:
    """torch-fidelity's cached statistics: ``torch.save({'mu': ndarray, 'sigma': ndarray})``, loaded weights-only."""
    reconstruct = np._core.multiarray._reconstruct
    allowed = [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
               np.dtypes.Float64DType, np.dtypes.Float32DType]
    with safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_reference_stats(path: str | Path) -> ReferenceStats:
    """FID reference statistics from the ADM ``.npz`` (keys ``mu``, ``sigma``) or torch-fidelity's ``.pt`` cache."""
    path = Path(path)
    if not path.is_file():
        raise ImageNetMetricsError(f"FID reference statistics not found: {path} (--fid-stats; MAR's evaluation uses "
                                   "fid_stats/adm_in256_stats.npz from the official repository)")
    try:
        if path.suffix in (".pt", ".pth"):
            data = _load_torch_stats(path)
            mu, sigma = (data[k] for k in ("mu", "sigma"))
        else:
            with np.load(path) as data:
                mu, sigma = data["mu"], data["sigma"]
        mu, sigma = (np.asarray(torch.as_tensor(x).double()) if isinstance(x, Tensor) else np.asarray(x, np.float64)
                     for x in (mu, sigma))
    except TorchVersionError:
        raise
    except Exception as err:
        raise ImageNetMetricsError(f"{path} is not FID reference statistics (an .npz or torch-fidelity .pt with "
                                   f"'mu' and 'sigma'): {type(err).__name__}: {err}") from None
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ImageNetMetricsError(f"{path}: 'mu' must be (D,) and 'sigma' (D, D), finite; got {mu.shape} and "
                                   f"{sigma.shape}")
    return ReferenceStats(mu, sigma, str(path))


# --- streaming accumulation ------------------------------------------------------------------------------
def _two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a + b rounded, and its exact rounding error (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@dataclass
class CompensatedSum:
    """A float64 array sum carried as ``hi + lo`` (about 106 bits), so that the order of the terms does not change
    the float64 value ``hi``: batches summed on one process and over ranks agree."""

    hi: np.ndarray
    lo: np.ndarray

    @classmethod
    def zeros(cls, shape: Sequence[int]) -> "CompensatedSum":
        return cls(np.zeros(shape), np.zeros(shape))

    def add(self, hi: np.ndarray, lo: Optional[np.ndarray] = None) -> None:
        s, err = _two_sum(self.hi, hi)
        err += self.lo if lo is None else self.lo + lo
        self.hi, self.lo = _two_sum(s, err)


@dataclass
class InceptionStats:
    """Running FID sums and per-sample IS logits of a set of samples; ``merged`` joins those of several ranks."""

    count: int = 0
    feature_sum: Optional[CompensatedSum] = None   # sum of features (D,)
    outer_sum: Optional[CompensatedSum] = None     # sum of feature outer products (D, D)
    logits: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (first sample index, (n, C) float32)
    keep_features: bool = False  # also keep each sample's features (float32, 8 kB each at D = 2048): resampling
    features: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (first sample index, (n, D) float32)

    def add(self, features: Tensor, logits: Tensor, start: Optional[int] = None) -> None:
        """Add (n, D) features and (n, C) logits of samples ``start .. start + n`` (default: after the last ones)."""
        x = features.detach().to("cpu", torch.float64).numpy()
        z = logits.detach().to("cpu", torch.float32).numpy()
        if x.ndim != 2 or z.ndim != 2 or len(x) != len(z) or len(x) == 0:
            raise ImageNetMetricsError(f"features (n, D) and logits (n, C) of the same n >= 1 expected, got "
                                       f"{tuple(x.shape)} and {tuple(z.shape)}")
        if self.feature_sum is None:
            self.feature_sum, self.outer_sum = CompensatedSum.zeros(x.shape[1:]), CompensatedSum.zeros(x.shape[1:] * 2)
        elif self.feature_sum.hi.shape != x.shape[1:] or self.logits[0][1].shape[1] != z.shape[1]:
            raise ImageNetMetricsError(f"features/logits of width {x.shape[1]}/{z.shape[1]} do not match earlier "
                                       f"ones ({self.feature_sum.hi.shape[0]}/{self.logits[0][1].shape[1]})")
        start = self.count if start is None else int(start)
        self.feature_sum.add(x.sum(axis=0))
        self.outer_sum.add(x.T @ x)
        self.logits.append((start, z))
        if self.keep_features:
            self.features.append((start, x.astype(np.float32)))
        self.count += len(x)

    def add_images(self, extractor: FeatureExtractor, images: Tensor, start: Optional[int] = None) -> None:
        """Add images in [-1, 1]: converted with :func:`to_uint8`, then passed through ``extractor``."""
        with torch.no_grad():
            features, logits = extractor(to_uint8(images))
        self.add(features, logits, start)

    @classmethod
    def merged(cls, parts: Iterable["InceptionStats"]) -> "InceptionStats":
        """One accumulator holding the samples of all ``parts`` (e.g. ``gather_objects`` of every rank's)."""
        parts = list(parts)
        out = cls(keep_features=bool(parts) and all(part.keep_features for part in parts))
        for part in parts:
            if part.count == 0:
                continue
            if out.feature_sum is None:
                out.feature_sum = CompensatedSum.zeros(part.feature_sum.hi.shape)
                out.outer_sum = CompensatedSum.zeros(part.outer_sum.hi.shape)
            elif out.feature_sum.hi.shape != part.feature_sum.hi.shape:
                raise ImageNetMetricsError("cannot merge statistics of features of different widths")
            out.feature_sum.add(part.feature_sum.hi, part.feature_sum.lo)
            out.outer_sum.add(part.outer_sum.hi, part.outer_sum.lo)
            out.logits.extend(part.logits)
            out.features.extend(part.features)
            out.count += part.count
        return out

    def feature_statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (D,) and unbiased covariance (D, D) of the features, as ``np.cov`` gives them."""
        if self.count < 2:
            raise ImageNetMetricsError(f"FID needs at least 2 samples, got {self.count}")
        mu = self.feature_sum.hi / self.count
        sigma = (self.outer_sum.hi - self.count * np.outer(mu, mu) + self.outer_sum.lo) / (self.count - 1)
        return mu, (sigma + sigma.T) / 2

    def fid(self, reference: ReferenceStats) -> float:
        """Frechet distance of the features' Gaussian fit to the reference statistics."""
        mu, sigma = self.feature_statistics()
        if reference.mu.shape != mu.shape:
            raise ImageNetMetricsError(f"{reference.path} holds statistics of {reference.mu.shape[0]}-dim features, "
                                       f"but the extractor gives {mu.shape[0]}-dim ones (Inception pool: 2048)")
        return frechet_distance(mu, sigma, reference.mu, reference.sigma)

    def ordered_logits(self) -> np.ndarray:
        """(N, C) logits in sample order; the chunks must cover samples 0..N-1 exactly once."""
        return _in_sample_order(self.logits, "logits")

    def ordered_features(self) -> np.ndarray:
        """(N, D) float32 features in sample order (kept with ``keep_features``): per-sample values for resampling."""
        if not self.keep_features:
            raise ImageNetMetricsError("these statistics did not keep per-sample features (keep_features=False)")
        return _in_sample_order(self.features, "features")

    def inception_score(self, splits: int = IS_SPLITS, shuffle_seed: Optional[int] = IS_SHUFFLE_SEED
                        ) -> tuple[float, float]:
        """(mean, std) over ``splits`` of exp(E KL(p(y|x) || p(y))), torch-fidelity's recipe: the samples are
        permuted with ``RandomState(shuffle_seed)`` (None: not shuffled), softmax in float64."""
        logits = self.ordered_logits()
        n = len(logits)
        if not 1 <= splits <= n:
            raise ImageNetMetricsError(f"IS with {splits} splits needs at least {splits} samples, got {n}")
        if shuffle_seed is not None:
            logits = logits[np.random.RandomState(shuffle_seed).permutation(n)]
        log_p = torch.from_numpy(logits).double().log_softmax(dim=1)
        scores = []
        for i in range(splits):
            chunk = log_p[i * n // splits:(i + 1) * n // splits]
            log_marginal = chunk.exp().mean(dim=0).log()
            kl = (chunk.exp() * (chunk - log_marginal)).sum(dim=1).mean()
            scores.append(float(kl.exp()))
        return float(np.mean(scores)), float(np.std(scores))

    def scores(self, reference: Optional[ReferenceStats] = None, splits: int = IS_SPLITS) -> dict[str, float]:
        """IS (and FID when ``reference`` is given) of the samples added so far."""
        mean, std = self.inception_score(splits)
        out = {"inception_score": mean, "inception_score_std": std, "num_samples": self.count}
        if reference is not None:
            out = {"fid": self.fid(reference), **out, "fid_stats": reference.path}
        return out


def _in_sample_order(chunks: list[tuple[int, np.ndarray]], what: str) -> np.ndarray:
    """The rows of (first sample index, rows) chunks in sample order; they must cover 0..N-1 exactly once."""
    chunks = sorted(chunks, key=lambda chunk: chunk[0])
    expected = 0
    for start, z in chunks:
        if start != expected:
            raise ImageNetMetricsError(f"{what} of samples {expected}..{start - 1} are missing or added twice "
                                       f"(chunk starting at sample {start})")
        expected += len(z)
    return np.concatenate([z for _, z in chunks])


# --- the quality evaluator of VAE models (passed to lazymar.runs) -----------------------------------------
class ImageNetQuality:
    """FID against ``reference`` and IS of a run's decoded images, through ``extractor``: a quality evaluator of the
    runs core for VAE models, passed to the runs explicitly (``eval``/``bench``/``sweep`` ``--fid-stats``). It
    streams: ``stream()`` takes the images chunk by chunk into an :class:`InceptionStats`. IS uses ``min(10, N)``
    splits (10 from 10 samples on, as the official evaluation)."""

    name = "imagenet"
    keys = ("fid", "inception_score", "inception_score_std")

    def __init__(self, extractor: FeatureExtractor, reference: ReferenceStats):
        self.extractor, self.reference = extractor, reference

    @classmethod
    def load(cls, fid_stats: str | Path, device: str | torch.device = "cpu",
             weights_path: Optional[str | Path] = None) -> "ImageNetQuality":
        """Reference statistics and the Inception network, loaded now (one-line ImageNetMetricsError if missing)."""
        reference = load_reference_stats(fid_stats)
        return cls(load_inception(device, weights_path), reference)

    def stream(self, labels: Optional[Sequence[int]] = None) -> "_ImageNetStream":
        return _ImageNetStream(self)

    def __call__(self, images: Tensor, labels: Sequence[int]) -> dict[str, float]:
        stream = self.stream()
        stream.add(images, 0)
        return stream.scores()


class _ImageNetStream:
    """This rank's :class:`InceptionStats` (per-sample features kept); ``merge`` joins every rank's (lazymar.runs)."""

    def __init__(self, quality: ImageNetQuality):
        self.quality, self.stats = quality, InceptionStats(keep_features=True)

    def add(self, images: Tensor, start: int) -> None:
        self.stats.add_images(self.quality.extractor, images, start=start)

    def state(self) -> InceptionStats:
        return self.stats

    def merge(self, states: Sequence[InceptionStats]) -> None:
        self.stats = InceptionStats.merged(states)

    def scores(self) -> dict[str, float]:
        return {k: v for k, v in self.stats.scores(self.quality.reference, splits=min(IS_SPLITS, self.stats.count)
                                                   ).items() if k in ImageNetQuality.keys}

