"""Small stand-ins for the ImageNet and torchrun tests: an Inception-like extractor and pseudo-images."""
from __future__ import annotations

import torch
from torch import Tensor

from lazymar.model import MAR


class StandInExtractor:
    """A fixed random conv + ReLU + global average pool (64 features) and a linear layer (10 logits): the shape of
    torch-fidelity's Inception (uint8 images -> pool features, logits) at a size a test can run."""

    def __init__(self, features: int = 64, classes: int = 10, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.randn(features, 3, 3, 3, generator=g)
        self.fc = torch.randn(features, classes, generator=g) * 0.5
        self.calls: list[Tensor] = []

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        assert images.dtype == torch.uint8, "the extractor must see uint8 images, as torch-fidelity's does"
        self.calls.append(images)
        x = (images.float() - 128) / 128
        h = torch.relu(torch.nn.functional.conv2d(x, self.conv, padding=1)).mean(dim=(2, 3))
        return h, h @ self.fc


def pseudo_images(model: MAR, tokens: Tensor) -> Tensor:
    """Images in [-1, 1] (B, 3, 8, 8) from tokens without a VAE: three latent channels through tanh."""
    return torch.tanh(model.unpatchify(tokens)[:, :3])
