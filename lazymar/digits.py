"""scikit-learn's bundled handwritten digits (1797 8x8 images) as MAR training data, with a fixed split."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
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


def digits_split(split: str) -> tuple[Tensor, Tensor]:
    """Images (N, 1, 8, 8) in [-1, 1] and labels (N,) of the "train" or "held_out" split (stratified, fixed)."""
    x_train, x_test, y_train, y_test = _split()
    if split == "train":
        x, y = x_train, y_train
    elif split == "held_out":
        x, y = x_test, y_test
    else:
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y).long()


def to_pixels(images: Tensor) -> Tensor:
    """Images in [-1, 1] -> the digits' 0..16 intensity scale, clipped (what the classifier sees)."""
    return ((images.clamp(-1, 1) + 1.0) * 8.0)
