"""Recording at scale: peak memory and time of `lazymar record`, of the store writer at MAR-H shapes, and of an
analysis pass over that store. Each measurement runs in a fresh subprocess and reports its peak RSS (VmHWM).

(a) ``runs``: the real `lazymar record` command on random-init mar_base weights (a checkpoint written to a
    temporary folder), few steps and small batches, at N and 4N samples. Recording keeps one batch in memory, so
    the peak should not grow with N.
(b) ``writer``: create_store/write_batch alone at full MAR-H shapes (41 layers x 3 kinds x 320 positions x 64
    steps token_cosine, the four cfg_* variables, status, head_change, tokens) for synthetic samples (cosines
    near 1, NaN where a position is not computed, as recorded), batch by batch: peak RSS, MB/s, store size.
(c) ``analysis``: over that store, the ECDF of one layer by status, the step x layer matrix of the mean cosine,
    and the schedule-derivation profile (lazymar.schedules), each a subprocess.

    nice python benchmarks/recording_scale.py --json > data/bench/recording_scale.json
Big stores go under --workdir (default: a new folder in /tmp), deleted at the end. Check `df -h /tmp` first:
the default writer store takes about 12 GB on disk (23 GB uncompressed). The random mar_base samples with
5 diffusion-head steps (--head-steps) instead of 100: the head dominates CPU time and not the recording.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(code: str, limit_mb: float) -> dict:
    """Run ``code`` (Python, which prints a JSON object last) in a fresh interpreter; kill it above ``limit_mb``
    of resident memory (then the result says so)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    watched = {"killed": False, "max_mb": 0.0}

    def watch() -> None:
        from lazymar.runs.memory import resident_mb
        while proc.poll() is None:
            rss = resident_mb(proc.pid)
            if rss is None:  # the process ended
                return
            watched["max_mb"] = max(watched["max_mb"], rss)
            if rss > limit_mb:
                watched["killed"] = True
                proc.kill()
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    out, err = proc.communicate()
    thread.join()
    seconds = time.perf_counter() - start
    if watched["killed"]:
        return {"error": f"stopped above {limit_mb:.0f} MB resident", "peak_rss_mb": round(watched["max_mb"], 1),
                "seconds": round(seconds, 1)}
    if proc.returncode != 0:
        return {"error": err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}",
                "seconds": round(seconds, 1)}
    result = json.loads(out.strip().splitlines()[-1])
    result.setdefault("seconds", round(seconds, 1))
    return result


RECORD = """
import json, time, sys
from lazymar.cli import main
from lazymar.runs.memory import peak_resident_mb
t = time.perf_counter()
code = main({args!r})
assert code == 0, code
print(json.dumps({{"seconds": round(time.perf_counter() - t, 1), "peak_rss_mb": round(peak_resident_mb(), 1)}}))
"""

WRITER = """
import json
from benchmarks.recording_scale import write_synthetic
print(json.dumps(write_synthetic({path!r}, {samples}, {batch_size})))
"""

ANALYSIS = """
import json, time
from benchmarks.recording_scale import analyse
from lazymar.runs.memory import peak_resident_mb
t = time.perf_counter()
info = analyse({path!r}, {what!r})
print(json.dumps({{**info, "seconds": round(time.perf_counter() - t, 1), "peak_rss_mb": round(peak_resident_mb(), 1)}}))
"""


def mar_h_batch(start: int, batch_size: int, steps: int = 64, seed: int = 0):
    """One synthetic batch of the recording layout at MAR-H shapes (recorder's layers, head parts, positions)."""
    import numpy as np
    from lazymar import get_config
    from lazymar.recording.dataset import CFG_STATS, FEATURE_KINDS, make_dataset

    config = get_config("mar_huge")
    layers = ([f"encoder.{i}" for i in range(config.encoder_depth)]
              + [f"decoder.{i}" for i in range(config.decoder_depth)] + ["z"])
    head_parts = ["eps_cfg"] + [f"res_block.{i}" for i in range(config.diffloss_d)]
    buffer, seq = config.buffer_size, (config.img_size // config.vae_stride // config.patch_size) ** 2
    P, L, B, T = buffer + seq, len(layers), batch_size, 100
    rng = np.random.default_rng(seed + start)
    status = np.zeros((B, steps, P), dtype=np.int8)
    status[:, :, buffer:] = rng.integers(1, 5, size=(B, steps, seq))
    distance = (10.0 ** rng.uniform(-6, -1, size=(B, steps, L, 3, P))).astype(np.float32)
    cosine = 1.0 - distance
    cosine[:, 0] = np.nan
    cosine[:, :, : config.encoder_depth, :, buffer:] = np.where(
        (status[:, :, None, None, buffer:] == 1), cosine[:, :, : config.encoder_depth, :, buffer:], np.nan)
    variables = {"status": status, "token_cosine": cosine,
                 "head_change": rng.uniform(0, 1, size=(B, steps, T, len(head_parts))).astype(np.float32),
                 "tokens": rng.standard_normal((B, seq, config.vae_embed_dim)).astype(np.float32)}
    for k, name in enumerate(CFG_STATS):
        variables[f"cfg_{name}"] = cosine[:, :, :, 0] if k == 0 else distance[:, :, :, k % 3] * 10
    assert len(FEATURE_KINDS) == 3
    samples = np.arange(start, start + B)
    return make_dataset(variables, samples=samples, labels=samples % 1000, batch=samples // batch_size,
                        mask_ratio=np.linspace(1, 0, steps), cfg_scale=np.linspace(1, 4, steps), layers=layers,
                        head_parts=head_parts, buffer_size=buffer, grid_size=int(seq ** 0.5),
                        attrs={"model": "synthetic-mar_huge", "config": json.dumps(config.to_dict()),
                               "num_iter": steps, "cfg": 4.0, "temperature": 1.0, "cfg_schedule": "linear",
                               "seed": 0, "schedule": "none", "batch_size": batch_size})


def write_synthetic(path: str, samples: int, batch_size: int) -> dict:
    """Write ``samples`` synthetic MAR-H samples into a store batch by batch; time spent writing only."""
    import numpy as np
    from lazymar.recording import store
    from lazymar.runs.memory import peak_resident_mb

    written = 0.0
    seconds = 0.0
    per_sample = []
    for start in range(0, samples, batch_size):
        batch = mar_h_batch(start, min(batch_size, samples - start))
        t = time.perf_counter()
        if start == 0:
            store.create_store(path, batch, np.arange(samples) % 1000, batch_size)
        store.write_batch(path, batch)
        dt = time.perf_counter() - t
        seconds += dt
        per_sample.append(dt / batch.sizes["sample"])
        written += sum(v.nbytes for v in batch.data_vars.values())
    size = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
    half = len(per_sample) // 2
    return {"samples": samples, "batch_size": batch_size, "uncompressed_gb": round(written / 1e9, 2),
            "store_gb": round(size / 1e9, 2), "write_seconds": round(seconds, 1),
            "mb_per_s": round(written / 1e6 / seconds, 1),
            "seconds_per_sample_first_half": round(float(np.mean(per_sample[:half] or [0])), 4),
            "seconds_per_sample_second_half": round(float(np.mean(per_sample[half:])), 4),
            "peak_rss_mb": round(peak_resident_mb(), 1)}


def analyse(path: str, what: str) -> dict:
    """One analysis of the store: "ecdf" (decoder.0 V by status), "matrix" (mean cosine per step and layer) or
    "derive" (the schedule-derivation profile)."""
    import dask
    from lazymar.recording import load_stats

    dask.config.set(scheduler="threads", num_workers=2)
    ds = load_stats(path)
    if what == "ecdf":
        from analysis.phenomena import ecdf_by_status
        df = ecdf_by_status(ds, "decoder.0", kind="v")
        return {"what": "ecdf_by_status(decoder.0, v)", "values": int(sum(df.attrs["count"].values()))}
    if what == "matrix":
        from analysis.phenomena import step_layer_matrix
        m = step_layer_matrix(ds, "mean")
        return {"what": "step_layer_matrix(mean)", "cells": int(m.size)}
    from lazymar.schedules import RedundancyProfile
    RedundancyProfile.from_stats(ds)
    return {"what": "lazymar.schedules.RedundancyProfile.from_stats"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=2, help="N for the real record runs (N and 4N)")
    parser.add_argument("--head-steps", type=int, default=5,
                        help="diffusion-head steps of the random mar_base (its 100 take minutes per sample on a CPU)")
    parser.add_argument("--steps", type=int, default=4, help="MAR steps of the real record runs")
    parser.add_argument("--batch-size", type=int, default=2, help="batch of the real record runs")
    parser.add_argument("--writer-samples", type=int, default=1000, help="synthetic MAR-H samples to write")
    parser.add_argument("--writer-batch", type=int, default=8, help="synthetic samples per written batch")
    parser.add_argument("--analysis-limit-mb", type=float, default=6000, help="stop an analysis above this RSS")
    parser.add_argument("--workdir", default=None, help="folder for checkpoints and stores (default: new in /tmp)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (the default prints it too)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run still deletes its stores
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lazymar_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": {"cpus": os.cpu_count(), "threads": os.environ.get("OMP_NUM_THREADS", "2")}}
    try:
        import torch
        from lazymar import MAR, get_config
        torch.manual_seed(0)
        model = MAR(get_config("mar_base", num_sampling_steps=str(args.head_steps)))
        ckpt = work / "mar_base_random.pth"
        torch.save({"model": model.state_dict(), "args": model.config.to_dict()}, ckpt)
        del model
        runs = []
        for n in (args.samples, 4 * args.samples):
            out = work / f"record_{n}.zarr"
            cli = ["record", "--model", str(ckpt), "--num-samples", str(n), "--batch-size", str(args.batch_size),
                   "--num-iter", str(args.steps), "--out", str(out), "--no-progress", "--force"]
            runs.append({"num_samples": n, **child(RECORD.format(args=cli), 16000)})
            shutil.rmtree(out, ignore_errors=True)
        result["runs"] = runs
        result["record_setting"] = {"model": "mar_base, random init", "num_iter": args.steps,
                                    "head_steps": args.head_steps, "batch_size": args.batch_size}
        store_path = str(work / "mar_h.zarr")
        result["writer"] = child(WRITER.format(path=store_path, samples=args.writer_samples,
                                               batch_size=args.writer_batch), 16000)
        result["analysis"] = {what: child(ANALYSIS.format(path=store_path, what=what), args.analysis_limit_mb)
                              for what in ("ecdf", "matrix", "derive")}
        result["analysis"]["peak_rss_mb"] = max(a.get("peak_rss_mb", 0) for a in result["analysis"].values())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
