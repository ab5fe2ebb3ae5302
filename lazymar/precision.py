"""Numerical precision of sampling and decoding: ``fp32``, or autocast to ``bf16`` / ``fp16``.

The precision is one field of the sampling settings (``SamplingSettings.precision``): :func:`lazymar.sampling.generate`
runs the transformer and the diffusion head under :func:`autocast`, the cache engine stores its caches in the
matching dtype (:func:`cache_dtype`), and decoding a run's tokens with a VAE (lazymar.vae.tokens_to_images) uses
the run's precision. The diffusion coefficients and the head's reverse process stay in float32 (the tables are
float64), as under the official ``torch.cuda.amp.autocast()``.

Defaults (:func:`default_precision`): the official evaluation samples and decodes the ImageNet (VAE) models under
``torch.cuda.amp.autocast()``, i.e. fp16 on CUDA; on other devices, and for the embedded pixel (digits) models,
the default is fp32 (CPU autocast to fp16 is slow or unsupported, bf16 changes the numbers, and fp32 is what the
conformance fixtures check).
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from .errors import SettingsError

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise SettingsError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def autocast(precision: str, device: torch.device | str) -> ContextManager:
    """``torch.autocast`` to the precision's dtype on ``device``; nothing for fp32 (the computation as written)."""
    device = torch.device(device)
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def compute_dtype(precision: str, parameter_dtype: torch.dtype) -> torch.dtype:
    """The dtype the matrix products run in: the autocast dtype, or the parameters' own (a model cast with
    ``.to(torch.bfloat16)`` computes in bfloat16 without autocast)."""
    return parameter_dtype if check_precision(precision) == "fp32" else PRECISIONS[precision]


def cache_dtype(precision: str, parameter_dtype: torch.dtype, fp32_storage: torch.dtype) -> torch.dtype:
    """The dtype caches are stored in: the compute dtype when it is a half type, ``fp32_storage`` (float16 by
    default: lazymar.cache.buffers) when the computation is in float32."""
    dtype = compute_dtype(precision, parameter_dtype)
    return fp32_storage if dtype == torch.float32 else dtype


def default_precision(model: torch.nn.Module, fallback: str = "fp32") -> str:
    """The official evaluation's choice for a latent-space (VAE) model on CUDA, fp16; else ``fallback`` (the
    model's stored sampling precision, fp32 unless a checkpoint stores another)."""
    device = next(model.parameters()).device
    if device.type == "cuda" and model.config.vae_stride != 1:
        return "fp16"
    return fallback
