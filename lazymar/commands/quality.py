"""``lazymar search-quality``: the quality-aware budget search (lazymar.schedules.quality) on calibration seeds."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..fingerprint import ModelFingerprint
from ..schedules.quality import quality_report_markdown
from ..validation import schedule_spec
from .common import add_model_args, load_model_from_args, print_json, sampling_from_args


def cmd_search_quality(args: argparse.Namespace) -> int:
    """Under torchrun every candidate samples on all ranks (lazymar.runs: each rank decodes and scores its share,
    the quality and PSNR merged on every rank, so every rank makes the same choices); rank 0 prints and writes."""
    from .launch import launched
    with launched(args):
        return _search_quality(args)


def _search_quality(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..cache.schedule_file import load_schedule
    from ..runs import DEFAULT, Reference, SamplePlan
    from ..schedules import quality
    if args.threads:
        torch.set_num_threads(args.threads)
    quality.check_calibration_plan(args.seed, args.num_samples)
    if args.out and Path(args.out).exists() and not args.force:
        raise FileExistsError(f"{args.out} exists (use --force to overwrite)")
    model = load_model_from_args(args)
    settings = sampling_from_args(model, args)
    bases = [load_schedule(spec, settings.num_iter, model.config) for spec in args.base]
    candidates = quality.with_head_policies(bases) + bases
    floor = load_schedule(args.floor, settings.num_iter, model.config)
    plan = SamplePlan.balanced(args.num_samples, model.config.class_num, args.seed, args.batch_size)
    quiet = args.json or not distributed.is_main()
    reference = Reference(model, plan, settings, evaluator=DEFAULT, progress=not quiet)
    objective = quality.QualityObjective(margin_psnr=args.margin_psnr, margin_accuracy=args.margin_accuracy,
                                         margin_fid=args.margin_fid, resamples=args.bootstrap,
                                         bootstrap_seed=args.bootstrap_seed)
    result = quality.quality_search(reference, floor, candidates, model.config, args.target_flops_ratio, objective,
                                    max_measured=args.candidates, progress=not quiet)
    if not distributed.is_main():
        return 0 if result.best is not None else 1
    record = result.search_record(args.seed, args.num_samples, objective.describe(args.floor))
    out = {"search": record, "measured": result.measured,
           "best": result.best.name if result.best is not None else None}
    if args.out and result.best is not None:
        schedule = result.best.with_changes(search=record, name=args.name or result.best.name,
                                            made_for=ModelFingerprint.of(model.config))  # searched on this model
        path = schedule.save(args.out)
        path.with_suffix(".md").write_text(quality_report_markdown(
            schedule, result, seed=args.seed, num_samples=args.num_samples, batch_size=args.batch_size,
            bases=args.base, floor=args.floor, target_flops_ratio=args.target_flops_ratio))
        out["out"] = str(path)
    if args.json:
        print_json(out)
    else:
        print(json.dumps(out, indent=1, default=float))
    return 0 if result.best is not None else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search-quality", help="budget search judged by accuracy, digits-FID and PSNR",
                       description="Combine base schedules with head-cache policies, keep those with predicted "
                                   "FLOPs ratio >= the target, measure the closest few on a calibration set "
                                   "(seeds apart from evaluation seeds, >= 200 samples) beside a floor schedule, "
                                   "and write the fastest one whose PSNR, accuracy and FID are each no worse than "
                                   "the floor's (paired bootstrap non-inferiority verdicts).")
    add_model_args(p)
    p.add_argument("--base", type=schedule_spec, nargs="+", required=True, metavar="NAME|PATH.json",
                   help="base schedules")
    p.add_argument("--floor", type=schedule_spec, default="lazymar",
                   help="the schedule to match (default: the lazymar preset)")
    p.add_argument("--target-flops-ratio", type=float, required=True)
    p.add_argument("--candidates", type=int, default=6, help="candidates measured (default 6)")
    p.add_argument("--num-samples", type=int, default=200, help="calibration samples (>= 200)")
    p.add_argument("--seed", type=int, default=101, help="calibration seed (not an evaluation seed)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--num-iter", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--name", default=None, help="name of the written schedule")
    p.add_argument("--out", default=None, help="schedule JSON to write (a markdown report goes beside it)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_search_quality, cfg=None, cfg_schedule=None, temperature=None)
    from .interval_options import add_interval_args
    add_interval_args(p, baseline=None)  # the floor is the baseline of the verdicts
