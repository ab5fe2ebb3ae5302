"""Predicted FLOPs of schedules, memoised: searches price thousands of schedules that share their parts.

Every figure comes from :func:`lazymar.cache.engine.estimate_generation_flops` (the accounting the engine's ledger
matches); this module only caches calls to it, keyed by what each part depends on.
"""
from __future__ import annotations

from functools import lru_cache

from ..cache.engine import estimate_generation_flops
from ..cache.schedule_file import CacheSchedule, HeadCachePolicy, exact_schedule, load_schedule, none_schedule
from ..config import MARConfig


@lru_cache(maxsize=16)
def baseline_flops(config: MARConfig, num_iter: int, use_cfg: bool, batch_size: int) -> int:
    """FLOPs of the uncached generation by the fastest exact sampler (head invariants hoisted: exact_schedule)."""
    return estimate_generation_flops(config, exact_schedule(num_iter), use_cfg=use_cfg, batch_size=batch_size).total


@lru_cache(maxsize=256)
def head_flops(config: MARConfig, num_iter: int, use_cfg: bool, batch_size: int, head: HeadCachePolicy) -> int:
    """Head FLOPs of a generation whose every step runs the head under ``head`` (they do not depend on the rest;
    they grow linearly with the tokens decoded, so ``num_iter`` 1 ranks policies as any step count does)."""
    schedule = none_schedule(num_iter).with_changes(head_cache=[True] * num_iter, head=head)
    return estimate_generation_flops(config, schedule, use_cfg=use_cfg, batch_size=batch_size).totals()["head"]


@lru_cache(maxsize=4096)
def _transformer_flops(config: MARConfig, no_head: CacheSchedule, use_cfg: bool, batch_size: int) -> dict:
    """FLOPs totals of a schedule whose head is uncached (the encoder and decoder parts are what matter)."""
    return estimate_generation_flops(config, no_head, use_cfg=use_cfg, batch_size=batch_size).totals()


def predicted_flops(schedule: CacheSchedule, config: MARConfig, use_cfg: bool = True, batch_size: int = 1) -> dict:
    """FLOPs of ``schedule`` and of no caching for a batch of ``batch_size`` (flops-module accounting), and their
    ratio. The ratio grows a little with the batch (the hoisted time embedding is shared by a batch's rows);
    batch 1, a single image, is the conservative figure.

    A schedule that runs the head cache on every step (all derived ones) is priced in two exact parts: the encoder
    and decoder with the head uncached, and the head's total for its policy (memoised), so that searches over
    thousands of schedules stay fast."""
    if all(schedule.head_cache):
        # the name and head policy do not change the transformer's FLOPs: normalised, grid points share them
        no_head = schedule.with_changes(head_cache=[False] * schedule.num_iter, head=HeadCachePolicy(), name="")
        totals = dict(_transformer_flops(config, no_head, use_cfg, batch_size))
        totals["head"] = head_flops(config, schedule.num_iter, use_cfg, batch_size, schedule.head)
        totals["total"] = totals["encoder"] + totals["decoder"] + totals["head"]
    else:
        totals = estimate_generation_flops(config, schedule, use_cfg=use_cfg, batch_size=batch_size).totals()
    base = baseline_flops(config, schedule.num_iter, use_cfg, batch_size)
    return {**{k: int(v) for k, v in totals.items()}, "baseline": int(base), "ratio": base / totals["total"]}


def flops_ratios(config: MARConfig, schedules: list[str], num_iter: int, batch_size: int,
                 use_cfg: bool = True) -> dict:
    """Analytic FLOPs of each schedule (preset name or JSON file) and its ratios against the fastest exact uncached
    sampler (head invariants hoisted: cache.schedule_file.exact_schedule, the "none" entry) at ``batch_size``
    (``ratio``) and at batch 1 (``ratio_batch1``: the hoisted time embedding is shared by a batch's rows), and
    ``released_convention``: the plain uncached sampler (no hoisting) over the released scheme
    ("lazymar-released"), the convention of the LazyMAR paper's speed-ups, to set beside them."""
    def total(schedule: CacheSchedule, batch: int) -> dict:
        return estimate_generation_flops(config, schedule, batch_size=batch, use_cfg=use_cfg).totals()
    out: dict = {"none": total(exact_schedule(num_iter), batch_size)}
    for name in schedules:
        schedule = load_schedule(name, num_iter, config)
        priced = predicted_flops(schedule, config, use_cfg, batch_size)
        out[str(name)] = {**{k: priced[k] for k in ("encoder", "decoder", "head", "total")}, "ratio": priced["ratio"],
                          "ratio_batch1": predicted_flops(schedule, config, use_cfg, 1)["ratio"]}
    released = total(load_schedule("lazymar-released", num_iter, config), batch_size)["total"]
    out["released_convention"] = total(none_schedule(num_iter), batch_size)["total"] / released
    return out
