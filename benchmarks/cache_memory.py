"""The cache-memory model against measured cache bytes at MAR-B/L/H shapes (random weights) and the embedded ones.

For each architecture, the lazymar preset runs on random weights until its caches have been filled and used (its
first cached step; the caches are allocated at full size when first filled, so later steps hold no more), and the
engine's measured ``peak_cache_bytes`` per mechanism is set beside ``lazymar.cache.estimate_cache_bytes``. Also
prints the bytes per sample and the extra GB at batch 100. The diffusion head runs few steps (it holds no cache
between MAR steps, so its step count changes no byte here).

    python benchmarks/cache_memory.py --json > data/bench/cache_memory.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from lazymar.cache import CacheEngine, estimate_cache_bytes, load_schedule  # noqa: E402
from lazymar.config import get_config  # noqa: E402
from lazymar.random_weights import random_mar  # noqa: E402
from lazymar.sampling import SamplingSettings, StepObserver, generate, observe_steps  # noqa: E402
from lazymar.tables import markdown_table  # noqa: E402

ARCHS = ("digits", "digits16", "mar_base", "mar_large", "mar_huge")


class _Enough(Exception):
    """Stops a generation once the caches have been used."""


class StopAfterFirstCachedStep(StepObserver):
    def __init__(self, plans):
        self.last = next(s for s, p in enumerate(plans) if not p.refresh)

    def on_step_end(self, ctx) -> None:
        if ctx.step >= self.last:
            raise _Enough


def measure(arch: str, schedule_name: str, num_iter: int, batch_size: int, head_steps: int) -> dict:
    config = get_config(arch, num_sampling_steps=str(head_steps))
    model = random_mar(config, 0).eval()
    settings = SamplingSettings(num_iter=num_iter, cfg=3.0)
    schedule = load_schedule(schedule_name, num_iter, config)
    engine = CacheEngine(schedule)
    start = time.perf_counter()
    with torch.no_grad(), observe_steps(StopAfterFirstCachedStep(engine.schedule_plans(settings))):
        try:
            generate(model, list(range(batch_size)), settings, seed=0, runner=engine)
        except _Enough:
            pass
    predicted = estimate_cache_bytes(config, schedule, batch_size, cache_dtype=engine.cache_dtype)
    measured = engine.peak_cache_bytes
    total_p, total_m = sum(predicted.values()), sum(measured.values())
    return {"arch": arch, "schedule": schedule_name, "batch_size": batch_size, "num_iter": num_iter,
            "cache_dtype": str(engine.cache_dtype).removeprefix("torch."), "predicted": predicted,
            "measured": measured, "predicted_total": total_p, "measured_total": total_m,
            "relative_error": abs(total_p - total_m) / total_m if total_m else 0.0,
            "mb_per_sample": total_p / batch_size / 2**20,
            "gb_at_batch_100": total_p / batch_size * 100 / 2**30, "seconds": time.perf_counter() - start}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--schedule", default="lazymar", help="preset or schedule JSON (default: lazymar)")
    parser.add_argument("--num-iter", type=int, default=16, help="MAR steps of the mapped schedule (default 16)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--head-steps", type=int, default=2, help="diffusion-head steps (default 2)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(a, args.schedule, args.num_iter, args.batch_size, args.head_steps)
            for a in tqdm(args.arch, desc="architectures", disable=args.json)]
    if args.json:
        print(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    else:
        print(markdown_table(["arch", "predicted MB", "measured MB", "error", "MB per sample", "GB at batch 100"],
                             [[r["arch"], f"{r['predicted_total'] / 2**20:.2f}", f"{r['measured_total'] / 2**20:.2f}",
                               f"{r['relative_error']:.1%}", f"{r['mb_per_sample']:.1f}",
                               f"{r['gb_at_batch_100']:.2f}"] for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
