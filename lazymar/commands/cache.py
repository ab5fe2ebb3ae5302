"""`lazymar bench`: a cache schedule against the uncached sampler (FLOPs, wall time, memory, fidelity, quality),
and `lazymar flops`: the analytic FLOPs of a schedule for any architecture, without running it."""
from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from ..config import get_config
from ..random_weights import random_model
from ..schedules.predicted_flops import flops_ratios
from ..validation import check_num_iter, model_arch, positive_int, schedule_spec
from ..validation import seed as seed_type
from .common import (add_model_args, add_sampling_args, add_schedule_arg, load_model_from_args, print_json,
                     sampling_from_args)
from .imagenet_options import add_imagenet_args, image_space_from_args, quality_from_args
from .launch import launched

COMPUTE_BOUND = dict(arch="mar_base", batch_size=8, num_iter=16, cfg=3.0)


def cmd_bench(args: argparse.Namespace) -> int:
    """Under torchrun every run samples its batches on all ranks (runs.Run: the slowest rank's seconds, the merged
    FLOPs, the largest rank's peak memory); rank 0 decodes, scores, compares and prints."""
    with launched(args):
        return _bench(args)


def _bench(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..runs.bench import benchmark
    from ..cache.schedule_file import load_schedule
    from ..runs import SamplePlan
    if args.compute_bound and args.num_iter is not None:  # the random model's token count, before building it
        check_num_iter(args.num_iter, get_config(args.arch or COMPUTE_BOUND["arch"]).seq_len)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.compute_bound:
        args.arch = args.arch or COMPUTE_BOUND["arch"]
        args.batch_size = COMPUTE_BOUND["batch_size"] if args.batch_size is None else args.batch_size
        args.num_samples = args.batch_size if args.num_samples is None else args.num_samples
        model = random_model(args.arch, args.seed, args.device)
        settings = replace(sampling_from_args(model, args),
                           num_iter=COMPUTE_BOUND["num_iter"] if args.num_iter is None else args.num_iter,
                           cfg=args.cfg if args.cfg is not None else COMPUTE_BOUND["cfg"])
    else:
        model = random_model(args.arch or "digits", args.seed, args.device) if args.random_init \
            else load_model_from_args(args)
        settings = sampling_from_args(model, args)
    num_samples = 200 if args.num_samples is None else args.num_samples
    batch_size = 100 if args.batch_size is None else args.batch_size
    images = image_space_from_args(model, args, need_images=False)
    evaluator = quality_from_args(model, args)
    schedule = load_schedule(args.schedule, settings.num_iter, model.config)
    from ..runs import intervals
    seeds = args.seeds or [args.seed]
    per_seed, arrays = {}, {}
    for run_seed in seeds:
        plan = SamplePlan.balanced(num_samples, model.config.class_num, run_seed, batch_size)
        runs: dict = {}
        per_seed[run_seed] = benchmark(model, plan, settings, schedule, repeats=args.repeats, vae=images.vae,
                                       evaluator=evaluator,
                                       cpu_memory=torch.device(args.device).type == "cpu",
                                       progress=distributed.is_main(), runs_out=runs)  # stderr; stdout: the JSON
        arrays[run_seed] = {name: intervals.sample_arrays(run, runs["baseline"], evaluator)
                            for name, run in runs.items()}  # collective: every rank
    if not distributed.is_main():
        return 0
    result = intervals.pooled_bench(per_seed, arrays, intervals.IntervalOptions.from_args(args), evaluator)
    result = {"model": (args.arch or "digits") if (args.compute_bound or args.random_init) else args.model,
              "weights": "random" if (args.compute_bound or args.random_init) else "checkpoint",
              "schedule": str(args.schedule), "device": str(args.device), "threads": torch.get_num_threads(),
              "num_samples": num_samples * len(seeds), "batch_size": batch_size, "repeats": args.repeats,
              "seed": seeds[0], "seeds": seeds,
              "world_size": distributed.world_size(), "settings": settings.__dict__, **result}
    ratios = flops_ratios(model.config, [args.schedule], settings.num_iter, batch_size, settings.cfg != 1.0)
    result["flops_ratio_batch1"] = ratios[str(args.schedule)]["ratio_batch1"]  # analytic, one image
    result["flops_ratio_released_convention"] = ratios["released_convention"]
    if args.json:
        print_json(result)
    else:
        from ..runs.intervals import cell
        b, c = result["baseline"], result["cached"]
        print(f"{result['model']} under {args.schedule}: FLOPs {b['flops'] / 1e12:.3f} T -> {c['flops'] / 1e12:.3f} T "
              f"(x{result['flops_ratio']:.2f} at batch {batch_size}, x{result['flops_ratio_batch1']:.2f} at batch 1; "
              f"released convention x{result['flops_ratio_released_convention']:.2f}); wall {b['seconds']:.2f} s -> {c['seconds']:.2f} s "
              f"(x{result['wall_ratio']:.2f}); " + (f"PSNR {cell(_num(result['psnr']), result.get('psnr_ci_low'), result.get('psnr_ci_high'))} dB"
                                                      if result["psnr"] is not None else
                                                      f"token MSE {result['token_mse']:.3g} (no images: no VAE)"))
        for name in ("baseline", "cached"):
            r = result[name]
            quality = ", ".join(f"{k} {cell(r[k], r.get(k + '_ci_low'), r.get(k + '_ci_high'), 4 if k == 'accuracy' else 3)}"
                                for k in ("accuracy", "fid", "inception_score", "fid32", "roughness", "roughness_real")
                                if r.get(k) is not None)
            print(f"  {name:8s} peak memory {r['peak_memory_mb']} MiB" + (f", {quality}" if quality else ""))
        verdicts = [f"{k} {cell(result[f'd_{k}'], result[f'd_{k}_ci_low'], result[f'd_{k}_ci_high'], 4 if k == 'accuracy' else 3)}"
                    f" ({result[f'verdict_{k}']})" for k in ("accuracy", "fid") if f"verdict_{k}" in result]
        if verdicts:
            print(f"  cached - baseline (95 % CI): " + ", ".join(verdicts) + f"; verdict {result['verdict']}")
    return 0


def _num(value):
    return float(value) if value == "inf" else value


def cmd_flops(args: argparse.Namespace) -> int:
    from ..cache.flops import floor_flops
    for arch in args.arch:
        check_num_iter(args.num_iter, get_config(arch).seq_len)
    rows = []
    for arch in args.arch:
        config = get_config(arch)
        ratios = flops_ratios(config, args.schedule, args.num_iter, args.batch_size, not args.no_cfg)
        row = {"arch": arch, "num_iter": args.num_iter, "batch_size": args.batch_size, "cfg": not args.no_cfg,
               "none": ratios.pop("none"), "floor": floor_flops(config, args.batch_size, not args.no_cfg),
               "released_convention": ratios.pop("released_convention"), **ratios}
        rows.append(row)
    if args.json:
        print_json(rows)
    else:
        for row in rows:
            parts = [f"none {row['none']['total'] / 1e12:.2f} T", f"floor {row['floor']['total'] / 1e12:.2f} T"]
            parts += [f"{n} {row[n]['total'] / 1e12:.2f} T (x{row[n]['ratio']:.2f}; batch 1 "
                      f"x{row[n]['ratio_batch1']:.2f})" for n in map(str, args.schedule)]
            print(f"{row['arch']}: " + ", ".join(parts) + f"; released convention (plain uncached / "
                  f"lazymar-released) x{row['released_convention']:.2f}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark a cache schedule against the uncached sampler",
                       description="Run the uncached sampler and a cache schedule on the same labels and seeds; "
                                   "report FLOPs, median wall time of interleaved repetitions, peak memory, "
                                   "PSNR/token MSE against the uncached tokens, and (digits) accuracy and FID.")
    add_model_args(p)
    add_sampling_args(p)
    add_schedule_arg(p)
    p.set_defaults(schedule="lazymar")
    p.add_argument("--num-samples", type=positive_int, default=None, help="samples per run (default 200; compute-bound: "
                                                                     "one batch)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="default 100 (compute-bound: 8)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repetitions of each run (default 3)")
    p.add_argument("--compute-bound", action="store_true",
                   help="mar_base-sized random weights, batch 8, 16 steps, cfg 3 (override with --arch, "
                        "--batch-size, --num-iter, --cfg)")
    p.add_argument("--random-init", action="store_true", help="random weights of --arch (default digits) "
                                                                  "instead of loading --model")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seeds", type=seed_type, nargs="+", default=None, metavar="SEED",
                   help="several seeds (instead of --seed): each benchmarked, intervals pooled with the seed as "
                        "bootstrap stratum, per-seed results under per_seed")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)
    from .interval_options import add_interval_args
    add_interval_args(p, baseline=None)  # the differences are against the uncached run
    add_imagenet_args(p)  # ImageNet FID/IS of a VAE model (lazymar.commands.imagenet_options)

    p = sub.add_parser("flops", help="analytic FLOPs of cache schedules for MAR architectures",
                       description="FLOPs (2 per multiply-add, matrix products and attention only) of one "
                                   "generation under each schedule, from the token counts alone; plus the floor "
                                   "(every position through the transformer once, the head once per token).")
    p.add_argument("--arch", type=model_arch, nargs="+", default=["mar_base", "mar_large", "mar_huge"])
    p.add_argument("--schedule", type=schedule_spec, nargs="+", default=["lazymar-released", "lazymar"])
    p.add_argument("--num-iter", type=positive_int, default=64)
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--no-cfg", action="store_true", help="without classifier-free guidance (one branch)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_flops)
