"""Recording many samples batch by batch into one Zarr store (or a small NetCDF file), ranks writing their share.

Labels, batches and seeds are those of :class:`lazymar.runs.SamplePlan` (balanced labels, batch k seeded with
``batch_seed(seed, k)``), so a recording holds exactly the samples ``sample``/``eval`` draw with the same seed,
labels and batch size. Memory holds one batch of features and statistics at a time, whatever ``num_samples``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from ..model import MAR
from ..runs import SEED_RULE, SamplePlan
from ..sampling import SamplingSettings, StepRunner, generate
from . import store
from .dataset import RecordingError, parse_keep_bits
from .files import load_stats, save_stats
from .netcdf import is_netcdf
from .recorder import RedundancyRecorder


def staging_store(out: str | Path) -> Path:
    """Where a recording to a NetCDF file ``out`` is written batch by batch before it is exported to ``out``
    (``.NAME.partial.zarr`` beside it; kept after an interruption so that --resume continues it)."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial.zarr")


def record(model: MAR, out: str | Path, num_samples: int, settings: SamplingSettings, seed: int = 0,
           batch_size: int = 16, model_name: str = "",
           runner_factory: Optional[Callable[[], StepRunner]] = None, schedule: str = "none",
           rank: int = 0, world_size: int = 1, resume: bool = False, keep_bits: Optional[str | int | dict] = None,
           progress: bool = True, barrier: Optional[Callable[[], None]] = None,
           labels: Optional[list[int]] = None) -> xr.Dataset:
    """Record ``num_samples`` generations (this rank's batches) into the store ``out`` and return the recording
    (lazy for a store). Batches are those of ``SamplePlan`` (labels balanced over the classes unless given).

    Rank 0 creates the store from its first batch (replacing an existing one unless ``resume``); ``barrier``
    (e.g. torch.distributed.barrier) is called once by every rank after that, before any other rank writes.
    Without a barrier, ranks > 0 need the store to exist already. ``resume`` records only the batches the store
    does not mark as recorded. A ``.nc`` ``out`` is recorded into :func:`staging_store` and exported to NetCDF at
    the end (one process only). ``runner_factory`` makes a fresh step runner (e.g. a cache schedule) per batch."""
    out = Path(out)
    if labels is not None and len(labels) != num_samples:
        raise RecordingError(f"{len(labels)} labels for {num_samples} samples")
    try:
        plan = (SamplePlan.of(labels, seed, batch_size) if labels is not None
                else SamplePlan.balanced(num_samples, model.config.class_num, seed, batch_size))
        plan.batches(rank, world_size)  # checks the rank
    except ValueError as err:
        raise RecordingError(str(err)) from None
    netcdf = is_netcdf(out)
    if netcdf and world_size > 1:
        raise RecordingError(f"{out}: record a torchrun job into a Zarr store (a path not ending in .nc)")
    target = staging_store(out) if netcdf else out
    if netcdf and resume and out.is_file() and not target.exists():
        save_stats(load_stats(out), target)  # continue an old NetCDF recording in a store
    extra = {"batch_size": batch_size, "world_size": world_size, "seed_rule": SEED_RULE}
    recorder = RedundancyRecorder(model, model_name=model_name, seed=seed, schedule=schedule, extra_attrs=extra)
    # Before the first barrier no rank writes, so every rank sees the same store: whether it exists, and which
    # batches are done. The batches left are dealt round robin, whatever the world size of the interrupted run.
    existing = resume and store.is_store(target)  # every rank looks before rank 0 may replace the store
    todo = plan.batches()
    if existing:
        _check_resumable(target, recorder, settings, plan, keep_bits)
        done = store.done_batches(target)
        todo = [b for b in todo if b.index not in done]
    todo = todo[rank::world_size]
    if existing and rank == 0 and (barrier is not None or world_size == 1):
        store.clean_stale(target)  # a dead run's temporaries: no rank of this run writes before the barrier
    if barrier is not None:
        barrier()
    if not existing and rank > 0 and barrier is None and not store.is_store(target):
        raise RecordingError(f"rank {rank} found no store at {target}: rank 0 creates it (pass a barrier)")
    ready = barrier is None and (existing or rank > 0)
    with recorder, tqdm(total=sum(b.stop - b.start for b in todo), desc=f"record {out.name}", unit="sample",
                        disable=not progress) as bar:
        for batch in todo:
            recorder.next_sample, recorder.next_batch_index = batch.start, batch.index
            generate(model, list(batch.labels), settings, seed=batch.seed,
                     runner=runner_factory() if runner_factory else None)
            (recorded,) = recorder.take_batches()
            if not ready:  # before the first write: rank 0 creates a new store, then every rank passes the barrier
                if rank == 0 and not existing:
                    store.create_store(target, recorded, np.asarray(plan.labels), batch_size, keep_bits)
                ready = _pass(barrier)
            store.write_batch(target, recorded, keep_bits)
            bar.update(batch.stop - batch.start)
    if not ready:  # a rank without batches still meets the others at the barrier
        _pass(barrier)
    return _finish(out, target, netcdf)


def _pass(barrier: Optional[Callable[[], None]]) -> bool:
    if barrier is not None:
        barrier()
    return True


def _finish(out: Path, target: Path, netcdf: bool) -> xr.Dataset:
    if not netcdf:
        return load_stats(out)
    ds = load_stats(target)
    save_stats(ds, out)
    ds.close()
    # out is whole: the staging store goes, renamed first so that a kill mid-delete leaves no half store to resume
    gone = target.with_name(f".{out.name}.old{os.getpid()}")
    target.rename(gone)
    shutil.rmtree(gone)
    return load_stats(out)


def _check_resumable(target: Path, recorder: RedundancyRecorder, settings: SamplingSettings, plan: SamplePlan,
                     keep_bits: Optional[str | int | dict]) -> None:
    existing = store.open_store(target, all_samples=True)
    for key, value in recorder.attributes(settings).items():
        if key in ("rank", "world_size"):
            continue
        if str(existing.attrs.get(key)) != str(value):
            raise RecordingError(f"cannot resume {target}: its {key!r} is {existing.attrs.get(key)!r}, not {value!r}")
    if existing.sizes["sample"] != plan.num_samples or not np.array_equal(existing["label"].values, plan.labels):
        raise RecordingError(f"cannot resume {target}: it holds {existing.sizes['sample']} samples with other "
                             f"labels or count than the {plan.num_samples} asked for")
    bits = parse_keep_bits(keep_bits)
    if existing.attrs.get("keep_bits") != (json.dumps(bits, sort_keys=True) if bits else None):
        raise RecordingError(f"cannot resume {target}: it was saved with keep_bits "
                             f"{existing.attrs.get('keep_bits', 'exact')}, not {keep_bits or 'exact'}")
