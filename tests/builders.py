"""The one place where tests build small models and checkpoints: MAR models with random weights (the package's
builder, lazymar.random_weights), small KL autoencoders, and official-layout checkpoints. Every builder seeds torch
itself, so that a model is the same whichever test builds it first."""
from __future__ import annotations

from pathlib import Path

import torch

from lazymar.config import get_config
from lazymar.model import MAR
from lazymar.random_weights import Randomise, random_mar
from lazymar.vae import AutoencoderKL, VAEConfig

__all__ = ["Randomise", "checkpoint", "random_mar", "random_vae", "saved", "tiny_mar", "tiny_model", "tiny_vae",
           "tiny_vae_config"]


def tiny_mar(seed: int = 0, *, randomise: Randomise = "zero", std: float = 0.02, token_std: float | None = None,
             **config_changes) -> MAR:
    """``random_mar`` of ``get_config("mar_tiny", **config_changes)``: 10 classes, 8x8 tokens of 16 channels at the
    default img_size 128 (img_size=64 gives 4x4 tokens), 2 + 2 blocks, 10 head steps unless changed."""
    return random_mar(get_config("mar_tiny", **config_changes), seed, randomise=randomise, std=std,
                      token_std=token_std)


def tiny_model(seed: int = 0) -> MAR:
    """The cache tests' model: ``tiny_mar`` with 3 decoder blocks and 3 head res-blocks (so that every cache has
    blocks to skip and reuse), its zero-initialised weights made random."""
    return tiny_mar(seed, decoder_depth=3, diffloss_d=3, num_sampling_steps="10")


def tiny_vae_config(**changes) -> VAEConfig:
    """A KL autoencoder config small enough for a test: 16 latent channels from 4 z-channels, width 8, no
    down-sampling and no attention unless changed."""
    settings = dict(embed_dim=16, z_channels=4, ch=8, ch_mult=(1, 1), num_res_blocks=1, norm_groups=4,
                    encoder_attn_levels=())
    return VAEConfig(**{**settings, **changes})


def random_vae(config: VAEConfig, seed: int | None = 0, *, std: float | None = None) -> AutoencoderKL:
    """An AutoencoderKL in eval mode with its own init under torch seed ``seed`` (``None``: the global random
    stream as it stands), and with every tensor drawn again from N(0, std) when ``std`` is given."""
    if seed is not None:
        torch.manual_seed(seed)
    vae = AutoencoderKL(config).eval()
    if std is not None:
        with torch.no_grad():
            for p in vae.parameters():
                p.normal_(0, std)
    return vae


def tiny_vae(seed: int | None = 0, *, std: float | None = None, **config_changes) -> AutoencoderKL:
    """``random_vae`` of ``tiny_vae_config(**config_changes)``."""
    return random_vae(tiny_vae_config(**config_changes), seed, std=std)


def checkpoint(model: MAR, weights: str = "model", **extra) -> dict:
    """An official-layout checkpoint of ``model``: its state dict under ``weights`` ("model" or "model_ema"), its
    config under "args", and ``extra`` keys (for example "sampling") as given."""
    return {weights: model.state_dict(), "args": model.config.to_dict(), **extra}


def saved(path: Path, obj) -> Path:
    """``torch.save(obj, path)``, returning ``path``."""
    torch.save(obj, path)
    return path
