"""Recording many samples batch by batch into a file: fixed labels and seeds per batch, shards per rank."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from ..model import MAR
from ..sampling import SamplingSettings, StepRunner, generate
from .dataset import RecordingError, StatsWriter, parse_keep_bits
from .recorder import RedundancyRecorder


def batch_seed(seed: int, batch_index: int) -> int:
    """The torch seed of batch ``batch_index``: independent streams per (seed, batch), whatever the sharding."""
    return int(np.random.SeedSequence([int(seed), int(batch_index)]).generate_state(1)[0])


def sample_labels(num_samples: int, class_num: int) -> np.ndarray:
    """Class labels of samples 0..n-1: cycling through the classes, so every batch is balanced."""
    return np.arange(num_samples) % class_num


def shard_batches(num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, int, int]]:
    """(batch index, first sample, end sample) of the batches rank ``rank`` records (round robin)."""
    if batch_size < 1 or num_samples < 1:
        raise RecordingError(f"need num_samples >= 1 and batch_size >= 1, got {num_samples} and {batch_size}")
    if not 0 <= rank < world_size:
        raise RecordingError(f"rank {rank} is not in 0..{world_size - 1}")
    batches = [(i, start, min(start + batch_size, num_samples))
               for i, start in enumerate(range(0, num_samples, batch_size))]
    return batches[rank::world_size]


def record(model: MAR, out: str | Path, num_samples: int, settings: SamplingSettings, seed: int = 0,
           batch_size: int = 16, model_name: str = "",
           runner_factory: Optional[Callable[[], StepRunner]] = None, schedule: str = "none",
           rank: int = 0, world_size: int = 1, resume: bool = False, keep_bits: Optional[str | int | dict] = None,
           progress: bool = True) -> xr.Dataset:
    """Record ``num_samples`` generations (this rank's share) into ``out``, rewriting it after every batch.

    Batch k holds samples [k*batch_size, (k+1)*batch_size) with labels i % class_num and torch seed
    batch_seed(seed, k), so shards of several ranks merge into the recording one process would make.
    Returns the recording (exact float32 values, whatever ``keep_bits`` stored).
    ``runner_factory`` makes a fresh step runner (e.g. a cache schedule) per batch; None runs the plain model."""
    writer = StatsWriter(out, keep_bits=keep_bits, resume=resume)
    done = writer.done_batches
    todo = [b for b in shard_batches(num_samples, batch_size, rank, world_size) if b[0] not in done]
    labels = sample_labels(num_samples, model.config.class_num)
    extra = {"batch_size": batch_size, "rank": rank, "world_size": world_size,
             "seed_rule": "batch k (samples k*batch_size...) uses torch seed SeedSequence([seed, k])"}
    recorder = RedundancyRecorder(model, model_name=model_name, seed=seed, schedule=schedule, extra_attrs=extra)
    if writer.batches:
        _check_resumable(writer.dataset(), recorder, settings, out)
        bits = parse_keep_bits(keep_bits)
        if writer.dataset().attrs.get("keep_bits") != (json.dumps(bits, sort_keys=True) if bits else None):
            raise RecordingError(f"cannot resume {out}: it was saved with keep_bits "
                                 f"{writer.dataset().attrs.get('keep_bits', 'exact')}, not {keep_bits or 'exact'}")
    device = next(model.parameters()).device
    with recorder, tqdm(total=sum(b[2] - b[1] for b in todo), desc=f"record {Path(out).name}", unit="sample",
                        disable=not progress) as bar:
        for index, start, stop in todo:
            recorder.next_sample, recorder.next_batch_index = start, index
            generator = torch.Generator(device=device).manual_seed(batch_seed(seed, index))
            generate(model, torch.as_tensor(labels[start:stop]), settings, seed=generator,
                     runner=runner_factory() if runner_factory else None)
            writer.append(recorder.take_batches())
            bar.update(stop - start)
    return writer.dataset()


def _check_resumable(existing: xr.Dataset, recorder: RedundancyRecorder, settings: SamplingSettings,
                     out: str | Path) -> None:
    for key, value in recorder.attributes(settings).items():
        if key in ("rank", "world_size"):
            continue
        if str(existing.attrs.get(key)) != str(value):
            raise RecordingError(f"cannot resume {out}: its {key!r} is {existing.attrs.get(key)!r}, not {value!r}")
