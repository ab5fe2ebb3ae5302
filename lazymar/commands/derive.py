"""`lazymar derive`: a cache schedule derived from a redundancy recording (thresholds, a FLOPs budget or a
fidelity floor), and `lazymar sweep`: the speed/quality trade-off of schedules and baselines into a CSV."""
from __future__ import annotations

import argparse
import json

import torch

from .. import schedules, sweep
from ..errors import ArgumentError
from ..validation import (check_outputs, finite_float, float_in, greater_than, non_negative_int, positive_int,
                          seed, sweep_schedule_spec)
from .common import add_model_args, load_model_from_args, print_json, sampling_from_args


def _reference(args: argparse.Namespace, profile):
    """The uncached reference run on --measure-samples fixed samples, for measured PSNR (lazymar.runs)."""
    from ..runs import Reference, RunError, SamplePlan
    model = load_model_from_args(args)
    settings = sampling_from_args(model, args)
    profile.check_model(model.config, settings.num_iter, f"--model {args.model}")
    if model.config.vae_stride != 1:
        raise RunError("measured PSNR is taken on images and this model's tokens are VAE latents; "
                       "use --no-measure for a budget search")
    plan = SamplePlan.balanced(args.measure_samples, model.config.class_num, args.seed, args.batch_size)
    return Reference(model, plan, settings, evaluator=None)


def _measurer(reference, quiet: bool):
    """reference.psnr, reporting each measurement on stderr (they take a while; rank 0 under torchrun)."""
    import sys
    from .. import distributed

    def measure(schedule) -> float:
        psnr = reference.psnr(schedule)  # every rank measures its share and gets the merged PSNR: same search
        if not quiet and distributed.is_main():
            print(f"  measured {schedule.name}: PSNR {psnr:.2f} dB", file=sys.stderr, flush=True)
        return psnr
    return measure


def cmd_derive(args: argparse.Namespace) -> int:
    """Under torchrun the measured searches sample every candidate on all ranks (lazymar.runs: each rank its
    share, the PSNR merged on every rank, so every rank takes the same path); rank 0 prints and writes."""
    from .launch import launched
    check_outputs(schedules.derive_outputs(args.out), args.force)
    with launched(args):
        return _derive(args)


def _derive(args: argparse.Namespace) -> int:
    from .. import distributed
    quiet = args.json or not distributed.is_main()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.target_flops_ratio is not None and args.min_psnr is not None:
        raise ArgumentError("pass either --target-flops-ratio or --min-psnr, not both")
    profile = schedules.load_profile(args.stats)
    if args.model is None:  # default: the recording's own model
        args.model = str(profile.attrs.get("model", "digits"))
    else:  # a --model given must be the recording's, checked before any search
        profile.check_model(load_model_from_args(args).config, None, f"--model {args.model}")
    measured, considered, reference = [], None, None
    mode = "thresholds"
    if args.target_flops_ratio is not None or args.min_psnr is not None:
        grid = {k.replace("-", "_"): tuple(getattr(args, "grid_" + k.replace("-", "_"))) for k in GRID_ARGS
                if getattr(args, "grid_" + k.replace("-", "_"))}
        if args.target_flops_ratio is not None:
            mode = "budget"
            if not args.target_flops_ratio > 1.0:
                raise ArgumentError(f"--target-flops-ratio must be > 1 (1 is no caching), got {args.target_flops_ratio}")
            measure = None
            if not args.no_measure:
                schedules.search_budget(profile, args.target_flops_ratio, None, grid=grid,  # impossible budget: fail now
                                     flops_batch_size=args.flops_batch_size)
                reference = _reference(args, profile)
                measure = _measurer(reference, quiet)
            result = schedules.search_budget(profile, args.target_flops_ratio, measure, num_measured=args.candidates,
                                          grid=grid, progress=not quiet, flops_batch_size=args.flops_batch_size)
        else:
            mode = "fidelity"
            if args.no_measure:
                raise ArgumentError("--min-psnr needs measured PSNR; drop --no-measure")
            reference = _reference(args, profile)
            result = schedules.search_fidelity(profile, args.min_psnr, _measurer(reference, quiet), grid=grid,
                                            progress=not quiet, flops_batch_size=args.flops_batch_size)
        derived, measured, considered = result.best, result.measured, result.considered
    else:
        derived = schedules.derive_schedule(profile, tau_token=args.tau_token, tau_refresh=args.tau_refresh,
                                         tau_cfg=args.tau_cfg, selection_layer=args.selection_layer,
                                         tau_head=args.tau_head, token_quantile=args.token_quantile,
                                         tau_buffer=args.tau_buffer,
                                         flops_batch_size=args.flops_batch_size)
    schedule = derived.schedule
    if args.name:
        schedule = schedule.with_changes(name=args.name)
    if measured:  # the seeds the pick looked at: quote this schedule's quality from other seeds
        schedule = schedule.with_changes(search=schedules.search_provenance(
            args.seed, args.measure_samples, args.batch_size, measured, target_flops_ratio=args.target_flops_ratio,
            min_psnr=args.min_psnr))
    out = schedules.derived_record(derived, profile, args.stats, mode, schedule.name,
                                   target_flops_ratio=args.target_flops_ratio, min_psnr=args.min_psnr,
                                   candidates_considered=considered, measured=measured,
                                   measure_samples=args.measure_samples, search_seed=args.seed)
    if not distributed.is_main():
        return 0
    if args.out:
        path, report = schedules.write_derived(schedule, out, args.out)
        out["out"], out["report"] = str(path), str(report)
    if args.json:
        print_json(out)
    else:
        print(derived.summary() if not args.name else derived.summary().replace(derived.schedule.name, args.name, 1))
        for row in measured:
            predicted = "" if row["predicted_psnr"] is None else f", predicted {row['predicted_psnr']:.2f} dB"
            print(f"  {row['role']:17s} {row['name']}: FLOPs x{row['predicted_flops_ratio']:.2f}, "
                  f"PSNR {row['psnr']:.2f} dB{predicted}")
        if args.out:
            print(f"wrote {out['out']} and {out['report']}")
    return 0


GRID_ARGS = {
    "token-quantile": "tau_token as quantiles of the selection layer's similarity",
    "tau-token": "tau_token cosines (instead of quantiles)",
    "tau-refresh": "tau_refresh step-equivalents", "tau-cfg": "tau_cfg cosines",
    "tau-head": "tau_head relative changes", "tau-buffer": "tau_buffer cosines",
}


def cmd_sweep(args: argparse.Namespace) -> int:
    """Under torchrun every point samples its batches on all ranks (lazymar.runs.Run); rank 0 decodes, scores,
    compares, prints and writes the CSV."""
    from .launch import launched
    with launched(args):
        return _sweep(args)


def _sweep(args: argparse.Namespace) -> int:
    from .. import distributed, peers
    from ..runs import Reference, SamplePlan
    from .imagenet_options import image_space_from_args, quality_from_args
    check_outputs([args.out], args.force)
    if args.stats is None and not args.no_defaults:
        args.stats = sweep.default_stats(args.model)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    profile = None if args.stats is None else schedules.load_profile(args.stats)
    model = load_model_from_args(args)
    settings = sampling_from_args(model, args)
    if profile is not None:
        profile.check_model(model.config, settings.num_iter, f"--model {args.model}")
    # MARché / GtR at the paper's settings (lazymar.peers), else presets and schedule files
    extra = [peers.preset_point(spec, settings, model.config) if spec in peers.PEER_PRESETS
             else sweep.schedule_point(spec, settings, model.config) for spec in args.schedule or []]
    points = extra if args.no_defaults else sweep.default_points(profile, settings, model.config, extra)
    images = image_space_from_args(model, args, need_images=False)
    quality = quality_from_args(model, args)
    for family in args.family or []:
        points += peers.family_points(family, settings, model.config)
    from ..runs import intervals
    options = intervals.IntervalOptions.from_args(args)
    baseline = sweep.baseline_point(args.baseline, points, settings, model.config)
    if baseline is not None and baseline.name not in [p.name for p in points]:
        points.insert(0, baseline)
    seeds = args.seeds or [args.seed]
    per_seed, arrays = {}, {}
    for run_seed in seeds:  # one reference per seed; the seed is the bootstrap's stratum
        plan = SamplePlan.balanced(args.num_samples, model.config.class_num, run_seed, args.batch_size)
        reference = Reference(model, plan, settings, vae=images.vae, evaluator=None if args.no_quality else quality)
        runs: dict = {}
        per_seed[run_seed] = sweep.run_sweep(reference, points, quality=not args.no_quality,
                                             progress=not args.json and distributed.is_main(), runs=runs)
        arrays[run_seed] = {name: intervals.sample_arrays(run, reference.run, reference.evaluator)
                            for name, run in runs.items()}  # collective: every rank
    if not distributed.is_main():
        return 0
    df = intervals.annotate_table(per_seed, arrays, options, reference.evaluator,
                                  "none" if baseline is None else baseline.name)
    df = sweep.mark_pareto(df)
    df = df[list(sweep.COLUMNS) + [c for c in df.columns if c not in sweep.COLUMNS]]
    if args.out:
        sweep.save_sweep(df, args.out)
    if args.json:
        rows = json.loads(df.to_json(orient="records"))
        print_json([{**row, "world_size": distributed.world_size()} for row in rows])
    else:
        print(sweep.front_markdown(df))
        if len(seeds) > 1:
            print(f"\nPer seed ({args.num_samples} samples each):")
            print(sweep.front_markdown(df, ["name"] + [c for c in df.columns if "_seed" in c]))
        print()
        print(intervals.verdict_markdown(df, "none" if baseline is None else baseline.name, options))
        print("\nPareto front (flops_ratio vs psnr):")
        print(sweep.front_markdown(sweep.pareto_front(df)))
        if args.out:
            print(f"wrote {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("derive", help="derive a cache schedule from a redundancy recording",
                       description="Derive a cache schedule from a recording (lazymar record): from thresholds, "
                                   "or the best measured fidelity at a FLOPs budget (--target-flops-ratio), or "
                                   "the highest FLOPs ratio above a PSNR floor (--min-psnr).")
    p.add_argument("--stats", required=True, help="recording (NetCDF) made by `lazymar record`")
    p.add_argument("--out", default=None, help="schedule JSON to write (a markdown report goes beside it, with "
                                               "the suffix .md)")
    p.add_argument("--force", action="store_true", help="overwrite --out and its report")
    p.add_argument("--name", default=None, help="schedule name (default: from the thresholds)")
    mode = p.add_argument_group("search (instead of fixed thresholds)")
    target = mode.add_mutually_exclusive_group()
    target.add_argument("--target-flops-ratio", type=greater_than(1.0), default=None,
                        help="best fidelity among schedules with at least this predicted FLOPs ratio (> 1)")
    target.add_argument("--min-psnr", type=finite_float, default=None,
                      help="highest predicted FLOPs ratio with measured PSNR vs uncached >= this (dB)")
    mode.add_argument("--no-measure", action="store_true",
                      help="budget search ranked by the uncalibrated error model only (no sampling)")
    mode.add_argument("--candidates", type=positive_int, default=4,
                      help="candidates measured near the budget, after one calibration probe per error component (default 4)")
    mode.add_argument("--measure-samples", type=positive_int, default=32,
                      help="fixed samples for measured PSNR (default 32)")
    mode.add_argument("--batch-size", type=positive_int, default=100, help="sampling batch of the measurements")
    p.add_argument("--flops-batch-size", type=positive_int, default=1,
                   help="batch the predicted FLOPs ratio assumes (default 1, per image: conservative; 100 matches "
                        "`lazymar bench` and `lazymar sweep` defaults, where the hoisted head embedding is shared)")
    for name, help_text in GRID_ARGS.items():
        kind = float_in(0.0, 1.0) if name == "token-quantile" else finite_float
        mode.add_argument(f"--grid-{name}", type=kind, nargs="+", default=None,
                          help=f"search grid: {help_text} (default: lazymar.schedules.DEFAULT_GRID)")
    th = p.add_argument_group("thresholds (without a search)")
    th.add_argument("--tau-token", type=finite_float, default=None,
                    help="recompute positions whose V similarity with the previous step is below this "
                         "(default: the median similarity)")
    th.add_argument("--token-quantile", type=float_in(0.0, 1.0), default=None,
                    help="tau_token as this quantile of the selection layer's similarity (instead of --tau-token)")
    th.add_argument("--tau-refresh", type=finite_float, default=8.0,
                    help="refresh when the accumulated change reaches this many average steps' worth (default 8)")
    th.add_argument("--tau-cfg", type=finite_float, default=0.999,
                    help="condition cache while the weighted residual similarity to the anchor is >= this "
                         "(default 0.999)")
    th.add_argument("--tau-head", type=finite_float, default=0.2,
                    help="largest accumulated relative change of a reused head part (default 0.2)")
    th.add_argument("--tau-buffer", type=finite_float, default=1.0,
                    help="cache the buffer in the encoder too (encoder 'new-tokens') when its accumulated change "
                         "since a refresh keeps a similarity >= this (default 1.0: recompute it, as LazyMAR)")
    th.add_argument("--selection-layer", type=non_negative_int, default=None,
                    help="decoder block that ranks positions (default: the selection-layer study's pick)")
    add_model_args(p)
    p.add_argument("--num-iter", type=positive_int, default=None,
                   help="MAR steps for measuring (must match the recording)")
    p.add_argument("--seed", type=seed, default=1,
                   help="seed of the measured samples (default 1: the sweep's default 0 stays a held-out check)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_derive, cfg=None, cfg_schedule=None, temperature=None, model=None)

    p = sub.add_parser("sweep", help="speed/quality trade-off of cache schedules and baselines",
                       description="Run the lazymar preset, derived schedules and baselines (fewer MAR steps, "
                                   "fixed-interval reuse, random token selection) on fixed seeds against the "
                                   "uncached sampler; write FLOPs ratio, wall ratio, PSNR, token MSE, accuracy, "
                                   "FID and the Pareto front (flops_ratio vs psnr) to a CSV.")
    add_model_args(p)
    p.add_argument("--stats", default=None,
                   help="recording for the derived points (default: the repository's data/stats/<model>.nc or .zarr; not "
                        "needed with --no-defaults)")
    p.add_argument("--schedule", type=sweep_schedule_spec, nargs="+", default=None, metavar="NAME|PATH.json",
                   help="extra schedules to include (presets or schedule JSON files)")
    p.add_argument("--no-defaults", action="store_true", help="only the --schedule points (and the reference)")
    peer = p.add_argument_group("peer methods (lazymar.peers)")
    peer.add_argument("--family", nargs="+", choices=("marche", "gtr", "combo"), default=None,
                      help="add a family's preset and parameter grid: marche (attention-score refresh), gtr "
                           "(two-stage order, fewer steps), combo (mechanisms combined); --schedule also takes "
                           "the presets 'marche' and 'gtr'")
    p.add_argument("--num-samples", type=positive_int, default=100)
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--num-iter", type=positive_int, default=None, help="MAR steps (must match the recording)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--seeds", type=seed, nargs="+", default=None, metavar="SEED",
                   help="several seeds (instead of --seed): runs pooled, each seed a bootstrap stratum, per-seed "
                        "numbers beside the pooled ones")
    p.add_argument("--no-quality", action="store_true", help="skip accuracy and FID")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="CSV to write, e.g. data/sweeps/digits.csv")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_sweep, cfg=None, cfg_schedule=None, temperature=None)
    from .interval_options import add_interval_args
    add_interval_args(p)
    from .imagenet_options import add_imagenet_args
    add_imagenet_args(p)  # ImageNet FID/IS of a VAE model (lazymar.commands.imagenet_options)
