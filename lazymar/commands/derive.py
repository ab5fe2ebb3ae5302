"""`lazymar derive`: a cache schedule derived from a redundancy recording (thresholds, a FLOPs budget or a
fidelity floor), and `lazymar sweep`: the speed/quality trade-off of schedules and baselines into a CSV."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch

from .. import schedules, sweep
from ..errors import ArgumentError
from ..tables import markdown_table
from ..validation import (check_outputs, finite_float, float_in, greater_than, non_negative_int, positive_int,
                          schedule_spec, seed, sweep_schedule_spec)
from .common import add_model_args, load_model_from_args, print_json, sampling_from_args


def derive_outputs(out: str | None) -> list[Path]:
    """The files ``derive --out`` writes: the schedule JSON and its markdown report beside it."""
    return [] if out is None else [Path(out), Path(out).with_suffix(".md")]


def default_stats(model: str = "digits") -> Path:
    """The committed recording of an embedded model (found from the package, not the working directory):
    data/stats/<model>.nc or <model>.zarr. Other models have none: their sweeps need --stats or --no-defaults."""
    from ..checkpoint import DATA_DIR, EMBEDDED
    if model not in EMBEDDED:
        raise ArgumentError(f"no committed recording for {model!r}; pass --stats (a `lazymar record` output) "
                            "or --no-defaults with --schedule")
    nc = DATA_DIR / "stats" / f"{model}.nc"
    return nc if nc.exists() else DATA_DIR / "stats" / f"{model}.zarr"


def load_profile(derive, stats: str | Path):
    """The redundancy profile of a recording; a recording without any finite token similarity (e.g. all NaN)
    cannot rank positions, so it is rejected with one line instead of failing inside the search."""
    import numpy as np
    from ..recording import load_stats
    ds = load_stats(stats)
    if "token_cosine" in ds and not np.isfinite(ds["token_cosine"].values).any():
        raise derive.DerivationError(f"{stats}: token_cosine holds no finite values (all NaN); record it again")
    return dataclasses.replace(derive.RedundancyProfile.from_stats(ds), source=str(stats))


def _reference(args: argparse.Namespace, profile):
    """The uncached reference run on --measure-samples fixed samples, for measured PSNR (lazymar.runs)."""
    from ..runs import Reference, RunError, SamplePlan
    model = load_model_from_args(args)
    if model.config != profile.config:
        raise ArgumentError(f"model {args.model!r} does not match the recording's model configuration "
                         f"({profile.source}); pass the --model that was recorded")
    settings = sampling_from_args(model, args)
    if settings.num_iter != profile.num_iter:
        raise ArgumentError(f"the recording has {profile.num_iter} steps but sampling uses {settings.num_iter}; "
                         f"pass --num-iter {profile.num_iter}")
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
    from .measuring import launched
    check_outputs(derive_outputs(args.out), args.force)
    with launched(args):
        return _derive(args)


def _derive(args: argparse.Namespace) -> int:
    from .. import distributed
    derive = schedules
    quiet = args.json or not distributed.is_main()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.target_flops_ratio is not None and args.min_psnr is not None:
        raise ArgumentError("pass either --target-flops-ratio or --min-psnr, not both")
    profile = load_profile(derive, args.stats)
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
                derive.search_budget(profile, args.target_flops_ratio, None, grid=grid,  # impossible budget: fail now
                                     flops_batch_size=args.flops_batch_size)
                reference = _reference(args, profile)
                measure = _measurer(reference, quiet)
            result = derive.search_budget(profile, args.target_flops_ratio, measure, num_measured=args.candidates,
                                          grid=grid, progress=not quiet, flops_batch_size=args.flops_batch_size)
        else:
            mode = "fidelity"
            if args.no_measure:
                raise ArgumentError("--min-psnr needs measured PSNR; drop --no-measure")
            reference = _reference(args, profile)
            result = derive.search_fidelity(profile, args.min_psnr, _measurer(reference, quiet), grid=grid,
                                            progress=not quiet, flops_batch_size=args.flops_batch_size)
        derived, measured, considered = result.best, result.measured, result.considered
    else:
        derived = derive.derive_schedule(profile, tau_token=args.tau_token, tau_refresh=args.tau_refresh,
                                         tau_cfg=args.tau_cfg, selection_layer=args.selection_layer,
                                         tau_head=args.tau_head, token_quantile=args.token_quantile,
                                         tau_buffer=args.tau_buffer,
                                         flops_batch_size=args.flops_batch_size)
    schedule = derived.schedule
    if args.name:
        schedule = schedule.with_changes(name=args.name)
    if measured:  # the seeds the pick looked at: quote this schedule's quality from other seeds
        schedule = schedule.with_changes(search={
            "seeds": [args.seed], "num_samples": args.measure_samples, "batch_size": args.batch_size,
            "objective": (f"best measured PSNR vs uncached at predicted FLOPs ratio >= {args.target_flops_ratio}"
                          if mode == "budget" else f"highest predicted FLOPs ratio with measured PSNR >= "
                                                   f"{args.min_psnr} dB"),
            "candidates_measured": len(measured)})
    out = derived_record(derived, profile, args.stats, mode, schedule.name)
    if args.target_flops_ratio is not None:
        out["target_flops_ratio"] = args.target_flops_ratio
    if args.min_psnr is not None:
        out["min_psnr"] = args.min_psnr
    if considered is not None:
        out["candidates_considered"] = considered
    if measured:
        out["measured"] = measured
        best = [m for m in measured if m["name"] == derived.schedule.name]
        out["measured_psnr"] = best[0]["psnr"] if best else None
        out["measure_samples"], out["search_seed"] = args.measure_samples, args.seed
    if not distributed.is_main():
        return 0
    if args.out:
        path, report = write_derived(schedule, out, args.out)
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


def derived_record(derived, profile, stats, mode: str = "thresholds", name: str | None = None) -> dict:
    """What `derive` reports of a derived schedule (its --json output and the source of its .md report)."""
    return {"mode": mode, "stats": str(stats), "name": name or derived.schedule.name, **derived.to_dict(),
            "selection_study": json.loads(profile.selection.reset_index().to_json(orient="records"))}


def write_derived(schedule, record: dict, path: str | Path) -> tuple[Path, Path]:
    """The schedule JSON at ``path`` and its markdown report (from ``record``, see derived_record) beside it;
    also what the workbook's explorer saves."""
    path = schedule.save(path)
    report = path.with_suffix(".md")
    report.write_text(_report(record))
    return path, report


def _number(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _report(out: dict) -> str:
    lines = [f"# Derived cache schedule `{out['name']}`", "", out["summary"], "",
             f"- recording: `{out['stats']}`; mode: {out['mode']}"]
    if "target_flops_ratio" in out:
        lines.append(f"- target FLOPs ratio: >= {out['target_flops_ratio']:g}")
    if "min_psnr" in out:
        lines.append(f"- PSNR floor: >= {out['min_psnr']:g} dB")
    lines.append(f"- thresholds: {json.dumps(out['params'])}")
    lines.append(f"- selection-layer study (decoder block: Spearman / AUROC top 20%): " + ", ".join(
        f"{r['layer']}: {_number(r['spearman'])} / {_number(r['auroc'])}" for r in out["selection_study"]))
    batch = out["params"].get("flops_batch_size", 1)  # predicted_flops prices a whole batch of this size
    lines.append(f"- predicted FLOPs per image (batch of {batch}): {out['flops']['total'] / batch / 1e9:.3f} GFLOPs "
                 f"(uncached {out['flops']['baseline'] / batch / 1e9:.3f}), ratio {out['predicted_flops_ratio']:.3f}")
    if out.get("measured"):
        lines += ["", f"Candidates measured (PSNR vs uncached on {out['measure_samples']} fixed samples of seed "
                        f"{out['search_seed']}; quote this schedule's quality from other seeds):", "",
                  markdown_table(["role", "name", "predicted FLOPs ratio", "predicted PSNR (dB)",
                                  "measured PSNR (dB)"],
                                 [[row["role"], row["name"], f"{row['predicted_flops_ratio']:.3f}",
                                   "" if row.get("predicted_psnr") is None else f"{row['predicted_psnr']:.2f}",
                                   f"{row['psnr']:.2f}"] for row in out["measured"]])]
    return "\n".join(lines) + "\n"


GRID_ARGS = {
    "token-quantile": "tau_token as quantiles of the selection layer's similarity",
    "tau-token": "tau_token cosines (instead of quantiles)",
    "tau-refresh": "tau_refresh step-equivalents", "tau-cfg": "tau_cfg cosines",
    "tau-head": "tau_head relative changes", "tau-buffer": "tau_buffer cosines",
}


# --- sweep ---------------------------------------------------------------------------------------------------
def default_points(profile, reference_settings, config, derive, sweep, extra: list) -> list:
    """The committed sweep: the lazymar preset, ``extra`` (e.g. the derived schedules of data/schedules/), a
    small grid of derived thresholds, and the baselines: fewer MAR steps at the FLOPs of lazymar and of the
    fastest schedule, fixed-interval reuse every 4 and 8 steps, and random token selection in place of the
    similarity ranking for lazymar and for the derived schedule closest to lazymar's FLOPs."""
    from ..cache.schedule import load_schedule
    use_cfg = reference_settings.cfg != 1.0
    lazymar = sweep.SweepPoint("lazymar", "lazymar", load_schedule("lazymar", reference_settings.num_iter, config),
                               params={"preset": "lazymar"})
    grid = []
    for params in DERIVED_GRID:
        params = dict(params)
        params["tau_token"] = profile.tau_token_at(params.pop("token_quantile"), params["selection_layer"])
        d = derive.derive_schedule(profile, **params)
        grid.append(sweep.SweepPoint(d.schedule.name, "derived", d.schedule, params=d.params))
    derived = extra + grid
    ratio = {id(p): derive.predicted_flops(p.schedule, config, use_cfg)["ratio"] for p in [lazymar] + derived}
    points = [lazymar] + derived
    fastest = max(ratio.values())
    points.append(sweep.fewer_steps_point(reference_settings, config, ratio[id(lazymar)]))
    points.append(sweep.fewer_steps_point(reference_settings, config, fastest))
    for interval in (4, 8):
        points.append(sweep.fixed_interval_point(reference_settings.num_iter, interval))
    points.append(sweep.random_point(lazymar))
    if derived:
        closest = min(derived, key=lambda p: abs(ratio[id(p)] - ratio[id(lazymar)]))
        points.append(sweep.random_point(closest))
    unique, seen = [], set()
    for p in points:  # e.g. two fewer-steps targets that land on the same step count
        if p.name not in seen:
            seen.add(p.name)
            unique.append(p)
    return unique


# thresholds of the derived grid points of the default sweep, besides the schedule files given with --schedule
DERIVED_GRID = [
    dict(token_quantile=0.5, tau_refresh=6.0, tau_cfg=0.9995, selection_layer=1, tau_head=0.1),
    dict(token_quantile=0.0, tau_refresh=8.0, tau_cfg=0.999, selection_layer=0, tau_head=0.2),
    dict(token_quantile=0.0, tau_refresh=12.0, tau_cfg=0.995, selection_layer=0, tau_head=0.4),
    dict(token_quantile=0.0, tau_refresh=24.0, tau_cfg=0.99, selection_layer=0, tau_head=0.8),
    dict(token_quantile=0.0, tau_refresh=6.0, tau_cfg=1.0, selection_layer=0, tau_head=0.6, tau_buffer=0.999),
]


def cmd_sweep(args: argparse.Namespace) -> int:
    """Under torchrun every point samples its batches on all ranks (lazymar.runs.Run); rank 0 decodes, scores,
    compares, prints and writes the CSV."""
    from .measuring import launched
    with launched(args):
        return _sweep(args)


def _sweep(args: argparse.Namespace) -> int:
    derive = schedules
    from .. import distributed
    from ..runs import DEFAULT, Reference, SamplePlan
    from ..cache.schedule import load_schedule
    from .measuring import image_space_from_args
    check_outputs([args.out], args.force)
    if args.stats is None and not args.no_defaults:
        args.stats = default_stats(args.model)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    profile = None if args.stats is None else load_profile(derive, args.stats)
    model = load_model_from_args(args)
    if profile is not None and model.config != profile.config:
        raise ArgumentError(f"model {args.model!r} does not match the recording's model configuration ({args.stats})")
    settings = sampling_from_args(model, args)
    if profile is not None and settings.num_iter != profile.num_iter:
        raise ArgumentError(f"the recording has {profile.num_iter} steps but sampling uses {settings.num_iter}")
    from .. import peers
    extra = []
    for spec in args.schedule or []:
        if spec in peers.PEER_PRESETS:  # MARché / GtR at the paper's settings (lazymar.peers)
            extra.append(peers.preset_point(spec, settings, model.config))
            continue
        schedule = load_schedule(spec, settings.num_iter, model.config)
        family = "lazymar" if spec.startswith("lazymar") and not spec.endswith(".json") else "derived"
        extra.append(sweep.SweepPoint(Path(spec).stem if spec.endswith(".json") else spec, family, schedule,
                                      params={"schedule": spec, "schedule_name": schedule.name}))
    points = extra if args.no_defaults else default_points(profile, settings, model.config, derive, sweep, extra)
    images = image_space_from_args(model, args, need_images=False)
    for family in args.family or []:
        points += peers.family_points(family, settings, model.config)
    from ..runs import intervals
    options = intervals.IntervalOptions.from_args(args)
    baseline = _baseline_point(args.baseline, points, settings, model.config)
    if baseline is not None and baseline.name not in [p.name for p in points]:
        points.insert(0, baseline)
    seeds = args.seeds or [args.seed]
    per_seed, arrays = {}, {}
    for run_seed in seeds:  # one reference per seed; the seed is the bootstrap's stratum
        plan = SamplePlan.balanced(args.num_samples, model.config.class_num, run_seed, args.batch_size)
        reference = Reference(model, plan, settings, vae=images.vae, evaluator=None if args.no_quality else DEFAULT)
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


def _baseline_point(spec, points: list, settings, config):
    """The sweep point ``--baseline`` names: a point of the sweep by name, else the schedule (preset or JSON file)
    it names, added; None for 'none' (the uncached reference row)."""
    from ..cache.schedule import load_schedule
    if spec is None or spec == "none":
        return None
    for point in points:
        if point.name == spec:
            return point
    schedule = load_schedule(spec, settings.num_iter, config)
    is_file = str(spec).endswith(".json")
    return sweep.SweepPoint(Path(spec).stem if is_file else spec,
                            "lazymar" if str(spec).startswith("lazymar") and not is_file else "derived", schedule,
                            params={"schedule": spec, "schedule_name": schedule.name})


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
    p.set_defaults(func=cmd_derive, cfg=None, cfg_schedule=None, temperature=None)

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
    from ..runs.intervals import add_interval_args
    add_interval_args(p)
    from .measuring import add_imagenet_args
    add_imagenet_args(p)  # ImageNet FID/IS of a VAE model (lazymar.commands.measuring)
