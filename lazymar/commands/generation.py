"""`lazymar sample`, `lazymar eval` and `lazymar train`."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import ArgumentError
from ..grid import save_sample_grid
from ..runs import Run, SamplePlan, generate_tokens
from ..validation import (check_outputs, finite_float, image_path, labels, positive_float, positive_int, seed,
                          step_list)
from .common import (add_model_args, add_sampling_args, add_schedule_arg, load_model_from_args, print_json,
                     sampling_from_args, schedule_from_args)
from .imagenet_options import add_imagenet_args, image_space_from_args, quality_from_args
from .launch import launched


def cmd_sample(args: argparse.Namespace) -> int:
    args.out = str(check_outputs([image_path(args.out)], args.force)[0])  # the file really written
    with launched(args):
        return _sample(args)


def _sample(args: argparse.Namespace) -> int:
    """Under torchrun each rank samples and decodes its share of the batches; rank 0 gathers the images and
    writes the grid (the same grid as one process)."""
    from .. import distributed
    model = load_model_from_args(args)
    settings = sampling_from_args(model, args)
    labels = [l for l in args.labels for _ in range(args.per_label)]
    bad = [l for l in labels if not -1 <= l < model.config.class_num]
    if bad:
        raise ArgumentError(f"label {bad[0]} out of range: the model has {model.config.class_num} classes (-1 = unconditional)")
    images_of = image_space_from_args(model, args)
    schedule = schedule_from_args(model, args, settings)
    plan = SamplePlan.of(labels, args.seed, args.batch_size)
    rank, world = distributed.rank(), distributed.world_size()
    start = time.perf_counter()
    tokens, _ = generate_tokens(model, plan, settings, schedule, rank, world, progress=distributed.is_main())
    index = [i for batch in plan.batches(rank, world) for i in range(batch.start, batch.stop)]
    images = distributed.gather_samples(images_of(tokens, settings.precision), index)  # rank 0: every image, in label order
    seconds = time.perf_counter() - start
    if not distributed.is_main():
        return 0
    title = f"{args.model}: {settings.num_iter} steps, cfg {settings.cfg:g} ({settings.cfg_schedule}), seed {args.seed}"
    save_sample_grid(images, labels, args.out, title=title)
    result = {"out": str(args.out), "num_samples": len(labels), "seconds": seconds, "world_size": world,
              **settings.to_dict()}
    print_json(result) if args.json else print(f"wrote {args.out}: {len(labels)} samples in {seconds:.1f} s")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    with launched(args):
        return _eval(args)


def _eval(args: argparse.Namespace) -> int:
    """Under torchrun each rank samples its share of the batches; rank 0 decodes, scores and prints."""
    from .. import distributed
    model = load_model_from_args(args)
    settings = sampling_from_args(model, args)
    images_of = image_space_from_args(model, args)
    evaluator = quality_from_args(model, args)
    if evaluator is None:
        raise ArgumentError("no quality evaluator fits this model (the digits model: accuracy and digits-FID; a VAE "
                         "model: --vae with --fid-stats for ImageNet FID/IS)")
    from ..cache.schedule_file import exact_schedule
    from ..runs import intervals
    # uncached: the fastest exact sampler, the very samples of bench's and sweep's uncached reference
    schedule = schedule_from_args(model, args, settings) or exact_schedule(settings.num_iter)
    seeds = args.seeds or [args.seed]
    runs, arrays = {}, {}
    for run_seed in seeds:
        plan = SamplePlan.balanced(args.num_samples, model.config.class_num, run_seed, args.batch_size)
        runs[run_seed] = Run("eval", plan, settings, schedule).repeat(model, progress=True).finish(images_of,
                                                                                                  evaluator)
        arrays[run_seed] = {"eval": intervals.sample_arrays(runs[run_seed], None, evaluator)}
    if not distributed.is_main():
        return 0
    seconds = sum(run.median_seconds for run in runs.values())
    found = intervals.intervals(list(arrays.values()), intervals.IntervalOptions.from_args(args),
                                evaluator).get("eval", {})
    quality = dict(runs[seeds[0]].quality) if len(seeds) == 1 else {
        k: (found.get(k) if k in found else sum(r.quality[k] for r in runs.values()) / len(runs))
        for k in evaluator.keys}
    quality.update({k: v for k, v in found.items() if k.endswith(("_ci_low", "_ci_high"))})
    result = {**quality, "num_samples": args.num_samples * len(seeds), "seconds": seconds,
              "world_size": runs[seeds[0]].world_size, "model": args.model, "schedule": str(args.schedule),
              "seed": seeds[0], "seeds": seeds, "batch_size": args.batch_size, **settings.to_dict()}
    if len(seeds) > 1:
        result["per_seed"] = {str(s): dict(r.quality) for s, r in runs.items()}
    if args.json:
        print_json(result)
    else:
        scores = "  ".join(f"{k} {intervals.cell(result[k], result.get(k + '_ci_low'), result.get(k + '_ci_high'), 4)}"
                           for k in evaluator.keys)
        print(f"{scores}  ({evaluator.name}; {result['num_samples']} samples in {seconds:.1f} s; 95 % bootstrap "
              f"intervals)")
        for s, r in (result.get("per_seed") or {}).items():
            print(f"  seed {s}: " + "  ".join(f"{k} {r[k]:.4g}" for k in evaluator.keys))
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
                 model=args.model, save_at=args.save_at, **overrides)
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
    p.add_argument("--vae", default=None, metavar="kl16|PATH",
                   help="KL-16 VAE for latent-space models (official MAR): 'kl16' (downloaded) or a checkpoint path")
    p.add_argument("--out", default="samples.png",
                   help="output image (default samples.png; .png is appended to a name without a suffix)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="quality of generated samples (digits: accuracy, digits-FID; ImageNet: FID, IS)",
                       description="Generate balanced class-conditional samples and score them with the model's "
                                   "quality evaluator: class accuracy and digits-FID for the embedded digits "
                                   "models, beside roughness and (digits16) fid32 at their own resolution; FID "
                                   "and Inception Score for ImageNet (VAE) models, given --vae and --fid-stats. "
                                   "Under torchrun every rank samples, decodes and scores its share.")
    add_model_args(p)
    add_sampling_args(p)
    add_schedule_arg(p)
    p.add_argument("--num-samples", type=positive_int, default=500)
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--seeds", type=seed, nargs="+", default=None, metavar="SEED",
                   help="several seeds (instead of --seed): samples pooled, each seed a bootstrap stratum, per-seed "
                        "scores under per_seed")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval, vae=None)
    from .interval_options import add_interval_args
    add_interval_args(p, baseline=None, margins=False)
    add_imagenet_args(p)  # ImageNet FID/IS of a VAE model (lazymar.commands.imagenet_options)

    p = sub.add_parser("train", help="train the embedded digits MAR",
                       description="Train a MAR on scikit-learn's digits (train split); writes the checkpoint, "
                                   "its training log (JSON) and a loss-curve PNG beside it.")
    p.add_argument("--model", choices=("digits", "digits16"), default="digits",
                   help="which embedded model: digits (8x8 pixels as tokens) or digits16 (32x32, 2x2-pixel tokens: "
                        "256 tokens + 64 buffer, the official layout)")
    p.add_argument("--out", required=True, help="checkpoint path, e.g. data/checkpoints/digits.pth; a killed run "
                                                "resumes from <out stem>_train_state.pth when restarted")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="optimiser steps (default: the committed checkpoint's, 600 for digits, 1000 for digits16)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=5e-4)
    p.add_argument("--width", type=positive_int, default=None,
                   help="encoder/decoder width, a multiple of the 4 attention heads (default 96)")
    p.add_argument("--depth", type=positive_int, default=None, help="encoder/decoder depth (default 4)")
    p.add_argument("--num-iter", type=positive_int, default=64,
                   help="stored default sampling steps (at most the model's tokens: 64 or 256)")
    p.add_argument("--cfg", type=finite_float, default=3.0, help="stored default CFG scale")
    p.add_argument("--save-at", type=step_list, default=(), metavar="N,N,...",
                   help="also write intermediate checkpoints <out stem>_step<N>.pth after these optimiser steps "
                        "(for studies over training), e.g. 500,1000,2000")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    p.set_defaults(func=cmd_train)
