"""Stress tests of recording into one Zarr store from many processes:

- `lazymar record` under torchrun: 4 CPU ranks write many batches, one rank is killed with SIGKILL in the middle,
  and `record --resume` on 2 ranks finishes the job. Every batch is recorded exactly once, what the killed run left
  reads as its finished batches only, and the store equals a one-process recording value for value, in the same
  sample order.
- 4 plain processes write large batches (digits16-sized, 10 MB each) with the store's writer at once, with no
  sampling between writes, so that writes overlap all the time: nothing is lost and the store equals one
  process's. (Before writes stopped cleaning temporaries, one writer deleted the others' chunk files in flight.)

Marked ``stress`` (deselect with ``-m "not stress"``). Their default size keeps them short; ``LAZYMAR_STRESS_BATCHES``,
``LAZYMAR_STRESS_BATCH_SIZE`` and ``LAZYMAR_STRESS_WRITES`` make them bigger, ``LAZYMAR_STRESS_SEED`` fixes which
rank dies and when (random otherwise; the failure message names them).
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from builders import checkpoint, saved, tiny_mar
from lazymar.cli import main
from lazymar.recording import load_stats, store
from test_distributed import REPO, TORCHRUN_VARIABLES, torchrun_command

pytestmark = [pytest.mark.stress, pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks' pids in /proc")]

BATCHES = int(os.environ.get("LAZYMAR_STRESS_BATCHES", "16"))
BATCH_SIZE = int(os.environ.get("LAZYMAR_STRESS_BATCH_SIZE", "4"))
NUM_ITER = 8
TIMEOUT = 600


def record_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["record", "--model", str(model), "--num-samples", str(BATCHES * BATCH_SIZE), "--batch-size",
            str(BATCH_SIZE), "--num-iter", str(NUM_ITER), "--cfg", "2.0", "--seed", "5", "--out", str(out),
            "--no-progress", *extra]


def torchrun(ranks: int, args: list[str], log: Path) -> subprocess.Popen:
    """``lazymar ARGS`` under torchrun with ``ranks`` CPU ranks (one thread each, this checkout first on the path)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    for key in TORCHRUN_VARIABLES:
        env.pop(key, None)
    command = [*torchrun_command(), "--standalone", "--nproc_per_node", str(ranks), "-m", "lazymar.cli", *args]
    with open(log, "w") as f:
        return subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)


def rank_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (its children whose environment has RANK)."""
    children = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        children += (task / "children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # gone already
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = pid
    return ranks


def recorded_files(out: Path) -> int:
    """Batches marked recorded: zarr writes no chunk of ``recorded`` until a batch sets it."""
    folder = out / store.RECORDED / "c"
    return len(list(folder.iterdir())) if folder.is_dir() else 0


def batch_files(out: Path, batches: set[int]) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every chunk file of the given batches (chunk index k along sample is batch k): a file
    rewritten by zarr's temporary-and-rename gets a new inode."""
    files = {}
    for variable in out.iterdir():
        folder = variable / "c"
        if not folder.is_dir() or variable.name in ("sample", "label", "batch"):
            continue
        for k in batches:
            for path in [folder / str(k)] if (folder / str(k)).is_file() else (folder / str(k)).rglob("*"):
                if path.is_file():
                    stat = path.stat()
                    files[str(path.relative_to(out))] = (stat.st_ino, stat.st_mtime_ns)
    return files


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    model = tiny_mar(randomise="head", std=0.1, token_std=0.5, num_sampling_steps="5")
    sampling = {"num_iter": NUM_ITER, "cfg": 2.0, "cfg_schedule": "linear", "temperature": 1.0}
    return saved(tmp_path_factory.mktemp("stress") / "tiny.pth", checkpoint(model, sampling=sampling))


def test_a_rank_killed_mid_run_and_resume_record_every_batch_once_like_one_process(model_file, tmp_path):
    seed = int(os.environ.get("LAZYMAR_STRESS_SEED", random.SystemRandom().randrange(2**32)))
    rng = random.Random(seed)
    victim, threshold = rng.randrange(4), rng.randint(2, BATCHES // 2)
    what = f"(seed {seed}: rank {victim} killed after {threshold} of {BATCHES} batches)"
    out = tmp_path / "stats.zarr"

    job = torchrun(4, record_args(model_file, out), tmp_path / "first.log")
    try:
        deadline = time.monotonic() + TIMEOUT
        while recorded_files(out) < threshold and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        pids = rank_pids(job.pid)
        assert job.poll() is None and victim in pids, f"the run ended before the kill {what}: " + \
            (tmp_path / "first.log").read_text()[-3000:]
        os.kill(pids[victim], signal.SIGKILL)
        assert job.wait(timeout=TIMEOUT) != 0, what
    finally:
        if job.poll() is None:
            job.kill()

    # what the killed run left: its finished batches, each whole, and nothing else reads as data
    done = store.done_batches(out)
    assert len(done) < BATCHES, f"all batches were done before the kill {what}"
    left = load_stats(out).load()
    assert sorted(left["batch"].values.tolist()) == sorted(b for b in done for _ in range(BATCH_SIZE))
    kept = batch_files(out, done)

    job = torchrun(2, record_args(model_file, out, "--resume"), tmp_path / "resume.log")  # other ranks, other deal
    assert job.wait(timeout=TIMEOUT) == 0, what + (tmp_path / "resume.log").read_text()[-3000:]

    assert main(record_args(model_file, tmp_path / "one.zarr")) == 0  # one process, in this one-thread process
    one = load_stats(tmp_path / "one.zarr").load()
    resumed = load_stats(out).load()
    assert store.done_batches(out) == set(range(BATCHES)), what
    xr.testing.assert_identical(resumed.drop_attrs(), one.drop_attrs())
    xr.testing.assert_identical(left.drop_attrs(), one.sel(sample=left["sample"].values).drop_attrs())
    assert {k: v for k, v in batch_files(out, done).items() if k in kept} == kept, \
        f"a batch done before the kill was written again {what}"
    assert not list(out.rglob("*.partial")), f"temporaries left {what}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.log", "one.zarr", "resume.log", "stats.zarr"]
    np.testing.assert_array_equal(store.open_store(out, all_samples=True)[store.RECORDED].values, True)


WRITER = REPO / "tests" / "store_writer_worker.py"
WRITES = int(os.environ.get("LAZYMAR_STRESS_WRITES", "24"))  # batches of the plain writers


def test_four_writers_of_large_batches_at_once_lose_nothing(tmp_path):
    from store_writer_worker import labels, synthetic_batch

    batch_size, out, sync = 4, tmp_path / "w.zarr", tmp_path / "sync"
    sync.mkdir()
    store.create_store(out, synthetic_batch(0, batch_size), labels(WRITES, batch_size), batch_size)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    writers = [subprocess.Popen([sys.executable, str(WRITER), str(out), str(rank), "4", str(WRITES),
                                 str(batch_size), str(sync)], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
               for rank in range(4)]
    try:
        deadline = time.monotonic() + TIMEOUT
        while len(list(sync.glob("ready.*"))) < 4 and all(w.poll() is None for w in writers) and \
                time.monotonic() < deadline:
            time.sleep(0.01)
        (sync / "go").touch()
        errors = [w.communicate(timeout=TIMEOUT)[1] for w in writers]
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
    assert [w.returncode for w in writers] == [0] * 4, "\n".join(e[-2000:] for e in errors)
    assert store.done_batches(out) == set(range(WRITES))
    assert not list(out.rglob("*.partial"))

    written = store.open_store(out)
    for index in range(WRITES):  # what one process writes, batch by batch
        batch = synthetic_batch(index, batch_size)
        part = written.isel(sample=slice(index * batch_size, (index + 1) * batch_size))
        for name in [*batch.data_vars, "sample", "label", "batch"]:
            np.testing.assert_array_equal(part[name].values, batch[name].values, err_msg=f"{name} of batch {index}")
