"""Run by tests/test_recording_stress.py as one of several plain processes writing into one Zarr store at once.

    python tests/store_writer_worker.py STORE RANK WORLD_SIZE BATCHES BATCH_SIZE SYNC_DIR

Writes the batches RANK, RANK + WORLD_SIZE, ... of :func:`synthetic_batch` with ``store.write_batch``, the write
that every rank of `lazymar record` makes, as fast as it can (no sampling between writes, so writes overlap). It
starts writing when SYNC_DIR/go exists, after it has made SYNC_DIR/ready.RANK (so that all writers start at once).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import xarray as xr

from lazymar.recording import store
from lazymar.recording.dataset import CFG_STATS, FEATURE_KINDS, make_dataset

# a digits16-like recording at half its steps: 9 layers, 320 positions (64 buffer + 16x16 tokens of 4 channels)
STEPS, LAYERS, BUFFER, GRID, CHANNELS, HEAD_STEPS = 32, 9, 64, 16, 4, 10
HEAD_PARTS = ("eps_cfg", "res_block.0", "res_block.1", "res_block.2")


def labels(batches: int, batch_size: int) -> np.ndarray:
    return np.arange(batches * batch_size) % 10


def synthetic_batch(index: int, batch_size: int) -> xr.Dataset:
    """Batch ``index``: random statistics (seeded by the index) of a recording's layout and realistic size."""
    rng = np.random.default_rng(index)
    B, P = batch_size, BUFFER + GRID * GRID
    stats = lambda *shape: rng.random((B, STEPS, *shape), dtype=np.float32)  # noqa: E731
    variables = {"status": rng.integers(0, 5, (B, STEPS, P), dtype=np.int8),
                 "token_cosine": stats(LAYERS, len(FEATURE_KINDS), P),
                 **{f"cfg_{name}": stats(LAYERS, P) for name in CFG_STATS},
                 "head_change": stats(HEAD_STEPS, len(HEAD_PARTS)),
                 "tokens": rng.standard_normal((B, GRID * GRID, CHANNELS), dtype=np.float32)}
    samples = np.arange(index * B, (index + 1) * B)
    layers = [f"encoder.{i}" for i in range(4)] + [f"decoder.{i}" for i in range(4)] + ["z"]
    return make_dataset(variables, samples, samples % 10, np.full(B, index), np.linspace(1, 0, STEPS),
                        np.full(STEPS, 2.0), layers, HEAD_PARTS, BUFFER, GRID,
                        {"model": "synthetic", "num_iter": STEPS, "cfg": 2.0, "temperature": 1.0, "config": "{}",
                         "cfg_schedule": "linear", "seed": 0, "schedule": "none", "batch_size": B})


def main(path: str, rank: int, world_size: int, batches: int, batch_size: int, sync: Path) -> None:
    (sync / f"ready.{rank}").touch()
    while not (sync / "go").exists():
        time.sleep(0.005)
    for index in range(rank, batches, world_size):
        store.write_batch(path, synthetic_batch(index, batch_size))


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:6]), Path(sys.argv[6]))
