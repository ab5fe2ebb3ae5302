"""`lazymar sample`, `lazymar eval` and `lazymar train`."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..grid import balanced_labels, parse_labels, save_sample_grid
from ..sampling import generate
from ..errors import ArgumentError
from ..validation import check_outputs, finite_float, image_path, labels, positive_float, positive_int, seed
from .common import (add_model_args, add_sampling_args, add_schedule_arg, load_model_from_args, print_json,
                     runner_from_args, sampling_from_args)


def generate_batched(model, labels: list[int], settings, seed: int, batch_size: int, runner_factory=None,
                     desc: str = "sampling") -> torch.Tensor:
    """Tokens for ``labels`` in batches; batch i uses seed + i, so a run is reproducible for a given batch size."""
    out = []
    for i, start in enumerate(tqdm(range(0, len(labels), batch_size), desc=desc, unit="batch")):
        runner = runner_factory() if runner_factory else None
        out.append(generate(model, labels[start:start + batch_size], settings, seed=seed + i, runner=runner))
    return torch.cat(out)


def _runner_factory(model, args, settings):
    """A fresh cache engine per batch for --schedule (validated now, before sampling); None for the plain sampler."""
    if args.schedule == "none":
        return None
    runner_from_args(model, args, settings)
    return lambda: runner_from_args(model, args, settings)


def _load_vae(model, args):
    """The --vae decoder, checked against the model before any sampling (None for pixel-space models)."""
    from ..vae import check_vae_fits, load_vae
    vae = load_vae(args.vae, device=args.device) if getattr(args, "vae", None) else None
    check_vae_fits(model, vae)
    return vae


def _images(model, tokens, vae):
    from ..vae import tokens_to_images
    with torch.no_grad():
        return tokens_to_images(model, tokens, vae)


def cmd_sample(args: argparse.Namespace) -> int:
    args.out = str(check_outputs([image_path(args.out)], args.force)[0])  # the file really written
    model = load_model_from_args(args)
    settings = sampling_from_args(model, args)
    labels = [l for l in parse_labels(args.labels) for _ in range(args.per_label)]
    bad = [l for l in labels if not -1 <= l < model.config.class_num]
    if bad:
        raise ArgumentError(f"label {bad[0]} out of range: the model has {model.config.class_num} classes (-1 = unconditional)")
    vae = _load_vae(model, args)
    start = time.perf_counter()
    tokens = generate_batched(model, labels, settings, args.seed, args.batch_size,
                              _runner_factory(model, args, settings))
    images = _images(model, tokens, vae)
    seconds = time.perf_counter() - start
    title = f"{args.model}: {settings.num_iter} steps, cfg {settings.cfg:g} ({settings.cfg_schedule}), seed {args.seed}"
    save_sample_grid(images, labels, args.out, title=title)
    result = {"out": str(args.out), "num_samples": len(labels), "seconds": seconds, **settings.__dict__}
    print_json(result) if args.json else print(f"wrote {args.out}: {len(labels)} samples in {seconds:.1f} s")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..metrics import evaluate_digits
    model = load_model_from_args(args)
    settings = sampling_from_args(model, args)
    labels = balanced_labels(args.num_samples, model.config.class_num)
    vae = _load_vae(model, args)
    start = time.perf_counter()
    tokens = generate_batched(model, labels, settings, args.seed, args.batch_size,
                              _runner_factory(model, args, settings))
    seconds = time.perf_counter() - start
    images = _images(model, tokens, vae)
    result = {**evaluate_digits(images, torch.tensor(labels)), "num_samples": len(labels), "seconds": seconds,
              "model": args.model, "schedule": args.schedule, "seed": args.seed,
              **settings.__dict__}
    if args.json:
        print_json(result)
    else:
        print(f"accuracy {result['accuracy']:.4f}  digits-FID {result['fid']:.3f} (floor {result['fid_floor']:.3f})"
              f"  {len(labels)} samples in {seconds:.1f} s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..sampling import SamplingSettings
    from ..train import train_digits, training_outputs
    sampling = SamplingSettings(num_iter=args.num_iter, cfg=args.cfg, cfg_schedule="linear", temperature=1.0)
    overrides = {k: v for k, v in (("encoder_embed_dim", args.width), ("decoder_embed_dim", args.width),
                                   ("encoder_depth", args.depth), ("decoder_depth", args.depth)) if v is not None}
    out = Path(args.out)
    check_outputs(training_outputs(out), args.force)
    train_digits(out, steps=args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr, sampling=sampling,
                 **overrides)
    print(f"wrote {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate a labelled grid of samples",
                       description="Generate class-conditional samples and save them as a labelled grid (PNG).")
    add_model_args(p)
    add_sampling_args(p)
    add_schedule_arg(p)
    p.add_argument("--labels", type=labels, default="0-9", help="class labels, e.g. 0,1,2 or 0-9 (default 0-9)")
    p.add_argument("--per-label", type=positive_int, default=8, help="samples per label (default 8)")
    p.add_argument("--batch-size", type=positive_int, default=80)
    p.add_argument("--vae", default=None, help="KL-16 VAE checkpoint for latent-space models (official MAR)")
    p.add_argument("--out", default="samples.png",
                   help="output image (default samples.png; .png is appended to a name without a suffix)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="class accuracy and digits-FID of generated samples",
                       description="Generate balanced class-conditional samples and report accuracy and digits-FID.")
    add_model_args(p)
    add_sampling_args(p)
    add_schedule_arg(p)
    p.add_argument("--num-samples", type=positive_int, default=500)
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval, vae=None)

    p = sub.add_parser("train", help="train the embedded digits MAR",
                       description="Train a MAR on scikit-learn's digits (train split); writes the checkpoint, "
                                   "its training log (JSON) and a loss-curve PNG beside it.")
    p.add_argument("--out", required=True, help="checkpoint path, e.g. data/checkpoints/digits.pth")
    p.add_argument("--steps", type=positive_int, default=600, help="optimiser steps (default 600)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=5e-4)
    p.add_argument("--width", type=positive_int, default=None,
                   help="encoder/decoder width, a multiple of the 4 attention heads (default 96)")
    p.add_argument("--depth", type=positive_int, default=None, help="encoder/decoder depth (default 4)")
    p.add_argument("--num-iter", type=positive_int, default=64,
                   help="stored default sampling steps (at most the 64 tokens)")
    p.add_argument("--cfg", type=finite_float, default=3.0, help="stored default CFG scale")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    p.set_defaults(func=cmd_train)
