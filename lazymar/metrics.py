"""Quality metrics: class accuracy and digits-FID for the embedded digits model, and fidelity metrics for caches.

A small MLP classifier (scikit-learn, fixed seed) trained on the real "train" split of the digits judges generated
digits: its predictions give the class accuracy of class-conditional samples, and the activations of its hidden layer
are the features of digits-FID, the Frechet distance between Gaussian fits of generated and real feature
statistics (the Inception-FID recipe with a digits network). digits-FID is reported beside its floor: the same
distance between the held-out real split and the train split, i.e. what perfect samples of that size would score.

The classifier's weights are committed (data/checkpoints/digits_classifier.npz, ~80 kB) so that every machine
scores with the very same network: retraining is deterministic on one machine, but BLAS differences across CPUs can
move the weights of a few hundred Adam epochs slightly, and with them every FID. When the file is missing the
classifier is trained at first use (a few seconds) and saved there.

Images everywhere are (N, 1, 8, 8) in [-1, 1], as lazymar.digits.digits_split returns them and the digits MAR emits,
unless a function takes ``side``: the same procedure at another resolution (below).

At the digits16 model's own resolution (``side=32``: the 8x8 digits upsampled bilinearly) the same recipe gives
``fid32``, with a second classifier (data/checkpoints/digits32_classifier.npz) whose floor is again the held-out
split against the train split, both upsampled. An MLP fit only to smooth upsampled digits would have no reason to
look at pixel noise: the background pixels are constant in all its training images, so weight decay drives their
weights to zero and noise there would not move its features (and to_8x8, the route of the 8x8 metrics, averages
such noise away). So the 32x32 feature space is built to see it, in two ways:

- its input is the image (pixels / 16, side^2 values) and beside it a local roughness map, the absolute
  differences between neighbouring pixels averaged over an 8x8 grid of cells (lazymar.roughness.roughness_map,
  times :data:`ROUGHNESS_GAIN`);
- it is trained with an eleventh, negative class: a noisy copy of every training digit (Gaussian pixel noise,
  Gaussian noise constant over 2x2 blocks, i.e. over the digits16 tokens, or isolated speckles; amplitudes 0.15 to
  0.6, lazymar.roughness.noisy_copies). To tell a clean digit from a noisy one the hidden layer must encode the
  noise, so noise moves the FID features; the real statistics and the floor use clean real digits only.

Accuracy at 32x32 is the argmax over the ten digit classes. Beside the FIDs, :func:`lazymar.roughness.roughness`
(mean absolute neighbour difference) is a direct statistic of pixel noise for both models.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Union

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from .digits import digits_split, to_pixels
from .errors import LazymarError

DATA_DIR = Path(os.environ.get("LAZYMAR_DATA", Path(__file__).resolve().parents[1] / "data"))
CLASSIFIER_PATH = DATA_DIR / "checkpoints" / "digits_classifier.npz"
IMAGE_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
HIDDEN_UNITS = 128
CLASSIFIER_SEED = 0
NATIVE_SIDE = 32      # the digits16 model's images; its classifier file is digits32_classifier.npz
ROUGHNESS_CELLS = 8   # the roughness map of a side > 8 classifier's input: an 8x8 grid of cells
ROUGHNESS_GAIN = 4.0  # scales the map (upsampled digits' neighbour steps are <= 1/4 of the range) to ~[0, 1]
NOISE_SEED = 1        # the noisy copies of the negative class
FID_EPS = 1e-6  # diagonal offset for singular covariance products, as in the usual FID code
VALUE_LIMIT = 3.0  # samples may overshoot [-1, 1] a little (they are clipped); far beyond it, warn

ArrayLike = Union[Tensor, np.ndarray]


class MetricsInputError(LazymarError):
    """Input a metric cannot score (wrong shape, scale, or sizes); the message names the problem."""


class MetricsInputWarning(UserWarning):
    """Input a metric scores, but probably not as intended (values far outside [-1, 1])."""


# --- input checks ----------------------------------------------------------------------------------------
def _as_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().double().numpy()
    if isinstance(x, np.ndarray):
        return x.astype(np.float64, copy=False)
    raise MetricsInputError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")


def _check_images(images: ArrayLike, side: int = 8) -> np.ndarray:
    """(N, 1, side, side) images as float64 numpy, clipped to [-1, 1] like to_pixels: a broken model scores badly."""
    x = _as_numpy(images, "images")
    if x.ndim != 4 or x.shape[1:] != (1, side, side) or x.shape[0] == 0:
        raise MetricsInputError(f"images must have shape (N, 1, {side}, {side}) with N >= 1, got {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise MetricsInputError("images contain NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -VALUE_LIMIT or hi > VALUE_LIMIT:  # an untrained model's samples, or images on another scale
        warnings.warn(f"images should be in [-1, 1] but have values in [{lo:g}, {hi:g}]; they are clipped "
                      "(pixel-scale images? map them to [-1, 1] first)", MetricsInputWarning, stacklevel=3)
    return np.clip(x, -1.0, 1.0)


def _classifier_input(images: ArrayLike, side: int = 8) -> np.ndarray:
    """(N, 64) classifier inputs in [0, 1]: the digits' 0..16 intensity scale divided by 16. For ``side`` > 8,
    (N, side^2 + 64): those pixels and beside them the roughness map of the image (see the module docstring)."""
    x = _check_images(images, side)
    pixels = to_pixels(torch.from_numpy(x)).reshape(len(x), -1).numpy() / 16.0
    if side == 8:
        return pixels
    from .roughness import roughness_map
    local = roughness_map(torch.from_numpy(x), ROUGHNESS_CELLS).numpy() * (ROUGHNESS_GAIN / 2.0)
    return np.concatenate([pixels, local], axis=1)


def _check_labels(labels: ArrayLike, n: int) -> np.ndarray:
    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if y.shape != (n,):
        raise MetricsInputError(f"labels must have shape ({n},) to match the images, got {tuple(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise MetricsInputError(f"labels must be integers, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= NUM_CLASSES:
        raise MetricsInputError(f"labels must lie in 0..{NUM_CLASSES - 1}, got {y.min()}..{y.max()}")
    return y


# --- the classifier --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DigitsClassifier:
    """One-hidden-layer ReLU MLP: hidden = relu(x W1 + b1), logits = hidden W2 + b2, x = pixels / 16 (and the
    roughness map for side > 8). The predicted digit is the argmax over the ten digit classes (a side > 8
    classifier has an eleventh, "noisy", class)."""

    w1: np.ndarray  # (64, HIDDEN_UNITS); side > 8: (side^2 + 64, HIDDEN_UNITS)
    b1: np.ndarray
    w2: np.ndarray  # (HIDDEN_UNITS, 10); side > 8: (HIDDEN_UNITS, 11)
    b2: np.ndarray

    def hidden(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ self.w1 + self.b1, 0.0)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.hidden(x) @ self.w2 + self.b2

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.logits(x)[:, :NUM_CLASSES].argmax(axis=1)

    def save(self, path: Path, side: int = 8) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        import sklearn
        recipe = (f"sklearn {sklearn.__version__}, MLPClassifier(({HIDDEN_UNITS},), "
                  f"relu, alpha=1e-2, adam, random_state={CLASSIFIER_SEED})")
        if side != 8:  # float32 halves the file; train_classifier rounds the same way, so a reload is exact
            recipe += (f"; {side}x{side} upsampled digits + roughness map (gain {ROUGHNESS_GAIN:g}), negative class: "
                       f"noisy_copies(seed {NOISE_SEED}); weights rounded to float32")
        weights = {k: getattr(self, k) if side == 8 else getattr(self, k).astype(np.float32)
                   for k in ("w1", "b1", "w2", "b2")}
        np.savez_compressed(path, **weights, trained_with=np.array(recipe))

    @classmethod
    def load(cls, path: Path) -> "DigitsClassifier":
        with np.load(path) as f:
            return cls(*(f[k].astype(np.float64) for k in ("w1", "b1", "w2", "b2")))


def classifier_path(side: int = 8) -> Path:
    """Where the classifier of ``side`` x ``side`` digits lives: CLASSIFIER_PATH for 8, digits<side>_classifier.npz
    beside it otherwise."""
    return CLASSIFIER_PATH if side == 8 else CLASSIFIER_PATH.parent / f"digits{side}_classifier.npz"


def _check_side(side: int) -> None:
    if side < 8 or side % 8:
        raise MetricsInputError(f"side must be a multiple of 8 (the digits upsampled), got {side}")


def train_classifier(seed: int = CLASSIFIER_SEED, side: int = 8) -> DigitsClassifier:
    """Fit the MLP on the real "train" split at ``side`` x ``side`` (side > 8: with the noisy negative class, see
    the module docstring); deterministic for a seed on a given machine (seconds for 8x8, a minute or two for 32)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    _check_side(side)
    images, labels = digits_split("train", side)
    x, y = _classifier_input(images, side), labels.numpy()
    if side != 8:
        from .roughness import noisy_copies
        x = np.concatenate([x, _classifier_input(noisy_copies(images, NOISE_SEED), side)])
        y = np.concatenate([y, np.full(len(images), NUM_CLASSES)])
    mlp = MLPClassifier(hidden_layer_sizes=(HIDDEN_UNITS,), activation="relu", solver="adam", alpha=1e-2,
                        max_iter=1000, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp.fit(x, y)
    (w1, w2), (b1, b2) = mlp.coefs_, mlp.intercepts_
    if side != 8:
        w1, b1, w2, b2 = (w.astype(np.float32).astype(np.float64) for w in (w1, b1, w2, b2))
    return DigitsClassifier(w1, b1, w2, b2)


@lru_cache(maxsize=4)
def load_classifier(side: int = 8) -> DigitsClassifier:
    """The committed classifier of ``side`` x ``side`` digits; trained and saved (:func:`classifier_path`) first
    if the file is missing."""
    path = classifier_path(side)
    if path.exists():
        return DigitsClassifier.load(path)
    classifier = train_classifier(side=side)
    try:
        classifier.save(path, side)
    except OSError as err:  # read-only data directory: keep the in-process copy
        warnings.warn(f"could not cache the digits classifier at {path}: {err}")
    return classifier


# --- class accuracy and digits-FID -----------------------------------------------------------------------
def class_accuracy(images: ArrayLike, labels: ArrayLike, side: int = 8) -> float:
    """Fraction of (N, 1, side, side) images in [-1, 1] that the classifier of that side assigns to their label."""
    x = _classifier_input(images, side)
    y = _check_labels(labels, len(x))
    return float((load_classifier(side).predict(x) == y).mean())


def hidden_features(images: ArrayLike, side: int = 8) -> np.ndarray:
    """(N, HIDDEN_UNITS) float64 hidden-layer activations of the classifier of ``side``: the FID features."""
    return load_classifier(side).hidden(_classifier_input(images, side))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of (N, D) features, N >= 2."""
    if features.ndim != 2 or len(features) < 2:
        raise MetricsInputError(f"feature statistics need (N, D) features with N >= 2, got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = FID_EPS) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)). When the product is singular (sqrtm not
    finite or clearly complex), eps is added to both diagonals; the negligible imaginary round-off is dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise MetricsInputError(f"frechet_distance needs means (D,) and covariances (D, D) of one D, got "
                                f"{mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if covmean is None:
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if covmean is None:
            raise MetricsInputError("frechet_distance: the covariance product has no real square root "
                                    "(are the covariances symmetric positive semi-definite?)")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _sqrtm(product: np.ndarray) -> np.ndarray | None:
    """Real part of sqrtm(product), or None when it is not finite, clearly complex, or inaccurate."""
    with warnings.catch_warnings():  # singular products are expected (units dead on all images); checked below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(product)
    if not np.isfinite(root).all():
        return None
    if np.iscomplexobj(root):
        if np.abs(np.diagonal(root).imag).max() > 1e-3:
            return None
        root = root.real
    scale = max(float(np.linalg.norm(product)), 1e-300)
    return root if np.linalg.norm(root @ root - product) <= 1e-5 * scale else None


@lru_cache(maxsize=4)
def _train_statistics(side: int = 8) -> tuple[np.ndarray, np.ndarray]:
    return feature_statistics(hidden_features(digits_split("train", side)[0], side))


def digits_fid(images: ArrayLike, side: int = 8) -> float:
    """digits-FID of N >= 2 images against the real train split (the MAR generator's training data), in the
    features of the classifier of ``side`` (``side=32``: fid32 of (N, 1, 32, 32) images)."""
    mu, sigma = feature_statistics(hidden_features(images, side))
    return frechet_distance(mu, sigma, *_train_statistics(side))


@lru_cache(maxsize=4)
def fid_floor(side: int = 8) -> float:
    """digits-FID of the real held-out split (450 images) against the train split: the score of perfect samples."""
    return digits_fid(digits_split("held_out", side)[0], side)


def evaluate_digits(images: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Class accuracy, digits-FID and its floor for class-conditional samples of the given labels."""
    return {"accuracy": class_accuracy(images, labels), "fid": digits_fid(images), "fid_floor": fid_floor(),
            "num_samples": int(len(images))}


def native_quality_keys(side: int) -> tuple[str, ...]:
    """The keys of :func:`evaluate_native`: ``fid<side>`` and its floor beside roughness for side > 8."""
    return ("roughness", "roughness_real") if side == 8 else (f"fid{side}", f"fid{side}_floor", "roughness",
                                                                 "roughness_real")


def evaluate_native(images: ArrayLike) -> dict[str, float]:
    """Quality at the images' own resolution (N, 1, S, S): roughness and that of real held-out digits at S, and
    for S > 8 the FID of the S x S classifier (``fid<S>``, NaN for N < 2) and its floor."""
    from .roughness import roughness, roughness_real
    side = int(images.shape[-1])
    _check_side(side)
    x = _check_images(images, side)
    out = {"roughness": roughness(torch.from_numpy(x)), "roughness_real": roughness_real(side)}
    if side != 8:
        out = {f"fid{side}": digits_fid(x, side) if len(x) >= 2 else math.nan, f"fid{side}_floor": fid_floor(side),
               **out}
    return out


# --- fidelity of cached against exact outputs ------------------------------------------------------------
def _pair(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_numpy(a, "a"), _as_numpy(b, "b")
    if x.shape != y.shape:
        raise MetricsInputError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.size == 0:
        raise MetricsInputError("cannot compare empty arrays")
    return x, y


def token_mse(a: ArrayLike, b: ArrayLike) -> float:
    """Mean squared difference of two equally shaped token (or image) arrays."""
    x, y = _pair(a, b)
    return float(np.mean((x - y) ** 2))


def psnr(a: ArrayLike, b: ArrayLike, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB, 10 log10(data_range^2 / MSE); data_range 2 for [-1, 1]; inf if equal."""
    if not data_range > 0:
        raise MetricsInputError(f"data_range must be positive, got {data_range}")
    mse = token_mse(a, b)
    return math.inf if mse == 0.0 else float(10.0 * math.log10(data_range ** 2 / mse))


# --- python -m lazymar.metrics ---------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lazymar.metrics",
                                     description="Check a digits classifier: held-out accuracy and the FID floor.")
    parser.add_argument("--side", type=int, default=8, choices=(8, NATIVE_SIDE),
                        help="image side: 8 (digits-FID) or 32 (fid32, the digits16 model's own resolution)")
    parser.add_argument("--retrain", action="store_true", help="retrain the classifier and overwrite its file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    path = classifier_path(args.side)
    if args.retrain:
        train_classifier(side=args.side).save(path, args.side)
        for cached in (load_classifier, _train_statistics, fid_floor):
            cached.cache_clear()
    images, labels = digits_split("held_out", args.side)
    result = {"classifier": str(path), "side": args.side,
              "held_out_accuracy": class_accuracy(images, labels, args.side),
              "fid_floor": fid_floor(args.side), "num_held_out": len(labels)}
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"held-out accuracy {result['held_out_accuracy']:.4f}  FID floor {result['fid_floor']:.4f}"
              f"  ({result['num_held_out']} held-out vs train images at {args.side}x{args.side}; "
              f"{result['classifier']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
