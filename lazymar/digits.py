"""scikit-learn's bundled handwritten digits (1797 8x8 images) as MAR training data, with a fixed split."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.25


@lru_cache(maxsize=1)
def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 8.0 - 1.0)  # 0..16 -> [-1, 1]
    return tuple(train_test_split(images, digits.target, test_size=HELD_OUT_FRACTION,
                                  random_state=SPLIT_SEED, stratify=digits.target))  # type: ignore[return-value]


def digits_split(split: str, size: int = 8) -> tuple[Tensor, Tensor]:
    """Images (N, 1, size, size) in [-1, 1] and labels (N,) of the "train" or "held_out" split (stratified, fixed).

    ``size`` > 8 upsamples the 8x8 images (:func:`upsample`), the data of the ``digits16`` model."""
    x_train, x_test, y_train, y_test = _split()
    if split == "train":
        x, y = x_train, y_train
    elif split == "held_out":
        x, y = x_test, y_test
    else:
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    images = torch.from_numpy(x).unsqueeze(1)
    return (images if size == 8 else upsample(images, size)), torch.from_numpy(y).long()


def upsample(images: Tensor, size: int) -> Tensor:
    """8x8 digits -> size x size by bilinear interpolation (half-pixel centres, no overshoot, so values stay in
    [-1, 1]): the strokes become smooth ramps, and a 2x2 patch of the 32x32 image holds four different values."""
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def to_8x8(images: Tensor) -> Tensor:
    """(N, C, S, S) images made by :func:`upsample` -> 8x8, the scale of the digits classifier and digits-FID.

    The map is the least-squares inverse (pseudo-inverse) of the bilinear upsampling, applied along rows and
    columns, so ``to_8x8(upsample(x, S)) == x`` up to rounding. It is well conditioned (singular values of the 1-D
    upsampling 1.16..2.0 for S = 32), so sample noise is not amplified much; any other image is projected to the
    8x8 image whose upsampling is nearest to it."""
    side = images.shape[-1]
    if images.shape[-2] != side or side < 8:
        raise ValueError(f"expected square images of side >= 8, got {tuple(images.shape[-2:])}")
    if side == 8:
        return images
    inverse = _inverse_upsampling(side).to(images)
    return torch.einsum("ij,ncjk,lk->ncil", inverse, images, inverse)


@lru_cache(maxsize=4)
def _inverse_upsampling(side: int) -> Tensor:
    basis = torch.eye(8, dtype=torch.float64).reshape(8, 1, 8)
    up = F.interpolate(basis, size=side, mode="linear", align_corners=False).reshape(8, side).T  # (side, 8)
    return torch.linalg.pinv(up).float()


def to_pixels(images: Tensor) -> Tensor:
    """Images in [-1, 1] -> the digits' 0..16 intensity scale, clipped (what the classifier sees)."""
    return ((images.clamp(-1, 1) + 1.0) * 8.0)
