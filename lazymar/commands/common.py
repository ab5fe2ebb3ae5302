"""Options shared by several subcommands: which model, which sampling settings, JSON output."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

from ..checkpoint import load_model, shape_signature
from ..config import CONFIGS, PRESET_HEAD_STEPS, SAMPLING_PRESETS, sampling_preset
from ..errors import SettingsError
from ..model import MAR
from ..sampling import SamplingSettings
from ..precision import PRECISIONS, default_precision
from ..validation import device, finite_float, head_steps_spec, model_arch, positive_float
from ..validation import positive_int, schedule_spec
from ..validation import seed as seed_type


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="digits", metavar="NAME|PATH",
                        help="'digits' or 'digits16' (embedded: 8x8 pixels, or the official 16x16 token layout), "
                             "'mar_base', 'mar_large' or 'mar_huge' (official, `lazymar download NAME`) or a path to "
                             "a MAR checkpoint (default: digits)")
    parser.add_argument("--arch", type=model_arch, default=None,
                        help="architecture name (mar_base, ...) when it cannot be inferred")
    parser.add_argument("--device", type=device, default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default=None,
                        help="fp32, or autocast of the transformer, diffusion head and VAE decode to bf16 or fp16 "
                             "(caches in the same dtype); default: fp16 for a VAE model on CUDA (the official "
                             "evaluation's autocast), else the checkpoint's (fp32)")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Sampling options; each defaults to the --preset's setting, else to the checkpoint's stored one."""
    parser.add_argument("--preset", choices=tuple(SAMPLING_PRESETS), default=None,
                        help="the published sampling settings of the official models (MAR-B/L/H): 'mar-paper' "
                             "(MAR's FID-50k: 256 steps, cfg 2.9/3.0/3.2) or 'lazymar-paper' (LazyMAR's: 64 steps, "
                             "cfg 3.25); the options below override it (default: the checkpoint's settings)")
    parser.add_argument("--num-iter", type=positive_int, default=None,
                        help="MAR steps, 1 to the model's token count (default: the checkpoint's)")
    parser.add_argument("--cfg", type=finite_float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--cfg-schedule", choices=("linear", "constant"), default=None)
    parser.add_argument("--temperature", type=positive_float, default=None)
    parser.add_argument("--head-steps", type=head_steps_spec, default=None, metavar="uniform|fts:FRACTION:STEPS",
                        help="diffusion-head steps per token: 'uniform' (the checkpoint's steps for every token), or "
                             "GtR's frequency-weighted selection: the FRACTION of tokens with the most high-frequency "
                             "energy get the full steps, the rest STEPS (default: the checkpoint's)")
    parser.add_argument("--seed", type=seed_type, default=0, help="fixes generation orders and noise, in [0, 2**63)")


def load_model_from_args(args: argparse.Namespace) -> MAR:
    return load_model(args.model, arch=args.arch, device=args.device)


def sampling_from_args(model: MAR, args: argparse.Namespace) -> SamplingSettings:
    preset = getattr(args, "preset", None)
    base = model.sampling_defaults if preset is None else preset_settings(model, preset)
    overrides = {k: getattr(args, k) for k in ("num_iter", "cfg", "cfg_schedule", "temperature", "head_steps")
                 if getattr(args, k, None) is not None}
    overrides["precision"] = getattr(args, "precision", None) or default_precision(model, base.precision)
    settings = replace(base, **overrides)
    settings.check_for(model.seq_len, model.diffloss.gen_diffusion.num_timesteps)  # before any work
    return settings


def preset_settings(model: MAR, preset: str) -> SamplingSettings:
    """``preset``'s settings for this model: an official one by name, or by its shapes (random weights)."""
    arch = getattr(model, "arch", None) or next(
        (n for n, c in CONFIGS.items() if shape_signature(c) == shape_signature(model.config)), None)
    settings = sampling_preset(preset, arch)
    head_steps = model.diffloss.gen_diffusion.num_timesteps
    if head_steps != PRESET_HEAD_STEPS:
        raise SettingsError(f"the {preset} preset samples with {PRESET_HEAD_STEPS} diffusion-head steps, and this "
                            f"checkpoint's head takes {head_steps} (num_sampling_steps)")
    return settings


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=float)
    sys.stdout.write("\n")


# --- cache schedules (lazymar.cache) ------------------------------------------------------------------------
def add_schedule_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schedule", type=schedule_spec, default="none", metavar="NAME|PATH.json",
                        help="cache schedule: 'none' (exact), 'lazymar', 'lazymar-released', 'lazymar-new-tokens' "
                             "(lazymar with the buffer's encoder rows cached too), or a schedule JSON file")



def schedule_from_args(model: MAR, args: argparse.Namespace, settings: SamplingSettings):
    """The ``--schedule`` (a parsed :class:`~lazymar.cache.schedule_file.ScheduleChoice`) for this model and
    ``settings``, checked now (a bad schedule fails before any sampling); None for "none": the plain sampler. A
    command runs it with a fresh ``CacheEngine(schedule)`` per generation."""
    from ..cache.schedule_file import NO_CACHE
    return (getattr(args, "schedule", None) or NO_CACHE).sampler_schedule(settings.num_iter, model.config)
