"""`lazymar record` (redundancy statistics of sampling into a Zarr store or a NetCDF file) and `lazymar merge-stats`
(joins recordings, e.g. old per-rank NetCDF shards)."""
from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

from .. import distributed
from ..cache.engine import CacheEngine
from ..recording import load_stats, merge_stats, save_stats
from ..recording.dataset import RecordingError, reading
from ..recording.driver import record
from ..recording.summary import overview
from ..validation import check_outputs, keep_bits, positive_int
from .common import (add_model_args, add_sampling_args, add_schedule_arg, load_model_from_args, print_json,
                     sampling_from_args, schedule_from_args)
from .launch import launched


def path_bytes(path: Path) -> int:
    """Size on disk of a file, or of every file in a store folder."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cmd_record(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_outputs([out], args.force, resume=args.resume)
    with launched(args):  # under torchrun: this rank's device and the job's process group
        return _record(args, out)


def _record(args: argparse.Namespace, out: Path) -> int:
    rank, world = distributed.rank(), distributed.world_size()
    model = load_model_from_args(args)
    settings = sampling_from_args(model, args)
    schedule = schedule_from_args(model, args, settings)
    # None ("none"): the plain model's own forward (the recorder's default row layout)
    runner_factory = None if schedule is None else functools.partial(CacheEngine, schedule)
    barrier = distributed.barrier if world > 1 else None
    start = time.perf_counter()
    ds = record(model, out, args.num_samples, settings, seed=args.seed, batch_size=args.batch_size,
                model_name=str(args.model), runner_factory=runner_factory,
                schedule=str(getattr(args, "schedule", None) or "none"), rank=rank,
                world_size=world, resume=args.resume, keep_bits=args.keep_bits, progress=not args.no_progress,
                barrier=barrier)
    if barrier is not None:
        barrier()  # every rank has written its batches: rank 0 reports the whole recording
        if rank > 0:
            return 0
        ds = load_stats(out)
    seconds = time.perf_counter() - start
    result = {"out": str(out), "bytes": path_bytes(out), "seconds": seconds, "world_size": world, **overview(ds)}
    if args.json:
        print_json(result)
    else:
        print(f"wrote {out}: {ds.sizes['sample']} samples x {ds.sizes['step']} steps x {ds.sizes['layer']} layers, "
              f"{result['bytes'] / 1e6:.1f} MB in {seconds:.1f} s")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_outputs([out], args.force)
    if out.resolve() in {Path(p).resolve() for p in args.inputs}:
        raise RecordingError(f"the output {out} is also an input")
    with reading(" or ".join(map(str, args.inputs))):  # a damaged chunk of a lazily read input surfaces here
        ds = merge_stats(args.inputs)
        keep_bits = ds.attrs.get("keep_bits")
        save_stats(ds, out, keep_bits=json.loads(keep_bits) if keep_bits else None)
    load_stats(out)
    result = {"out": str(out), "inputs": [str(p) for p in args.inputs], "samples": int(ds.sizes["sample"]),
              "bytes": path_bytes(out)}
    if args.json:
        print_json(result)
    else:
        print(f"wrote {out}: {result['samples']} samples from {len(args.inputs)} files")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "record", help="record token and CFG redundancy of sampling into a Zarr store (or a NetCDF file)",
        description="Generate samples batch by batch and record, per step, layer and position, how much features "
                    "and the CFG difference change from the previous step. OUT is a Zarr store (a folder, e.g. "
                    "stats.zarr) filled batch by batch, or a NetCDF file for .nc paths (small recordings). Under "
                    "torchrun every rank writes its batches into the one store; no merge step.")
    add_model_args(p)
    add_sampling_args(p)
    add_schedule_arg(p)
    p.add_argument("--num-samples", type=positive_int, default=64, help="samples to record (default 64)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="samples per generation batch (default 16)")
    p.add_argument("--out", required=True, help="output Zarr store (a folder, e.g. stats.zarr) or NetCDF file (.nc, small recordings)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--resume", action="store_true", help="keep the batches already in OUT and record the rest")
    p.add_argument("--keep-bits", type=keep_bits, default=None, metavar="N|compact",
                   help="round statistics to N float32 mantissa bits, or 'compact' (cosines 14 bits, relative "
                        "changes 9), for a smaller file (lossy; default: exact float32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=cmd_record)

    m = subparsers.add_parser(
        "merge-stats", help="concatenate recordings (e.g. torchrun shards) along sample",
        description="Concatenate recordings of the same model and settings along the sample dimension.")
    m.add_argument("out", help="output NetCDF file")
    m.add_argument("inputs", nargs="+", help="recordings to merge (e.g. OUT.rank0 OUT.rank1 ...)")
    m.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    m.add_argument("--json", action="store_true", help="print a JSON summary")
    m.set_defaults(func=cmd_merge)
