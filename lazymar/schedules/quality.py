"""A quality-aware budget search: candidates are judged by sample quality (accuracy, digits-FID) and fidelity (PSNR
vs uncached) on a calibration set whose seeds are kept apart from every evaluation seed.

PSNR against the uncached run and FID disagree (see data/schedules/digits_3.5x_psnr.md), so a schedule that only
maximises PSNR can lose FID. The objective here asks a candidate to match a reference schedule (the lazymar
preset) measured on the same calibration samples, decided by non-inferiority tests rather than point values: the
paired bootstrap interval of the candidate - floor difference of every metric (PSNR, accuracy, FID) must give
``better`` or ``no worse`` (lazymar.stats.verdict) under margins declared before the search (default PSNR -0.5 dB,
accuracy -0.5 points, FID +5 % of the floor's); among the candidates that pass, the highest measured FLOPs ratio
wins (then the lowest FID). Quoted results must come from seeds used in no search: :data:`EVALUATION_SEEDS` are refused here,
and every schedule written records the seeds it was searched on (the schedule's ``search`` field).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import product
from typing import Iterable, Optional, Sequence

from tqdm.auto import tqdm

from ..cache.schedule_file import CacheSchedule, HeadCachePolicy
from ..config import MARConfig
from ..tables import markdown_table
from .predicted_flops import predicted_flops
from .profile import DerivationError

# seeds that quote results (sweep default 0, derive's measurement seed 1, held-out checks 2, 7, 23): never searched
EVALUATION_SEEDS = frozenset({0, 1, 2, 7, 23})
FIRST_SEARCH_SEED = 101
MIN_CALIBRATION_SAMPLES = 200

# head policies combined with derived transformer schedules (CFG cache on: the head's largest cut)
HEAD_GRID = (
    HeadCachePolicy(refresh_every=4, cfg_cache=True, reuse_blocks=(0, 2), hoist_invariants=True),
    HeadCachePolicy(refresh_every=5, cfg_cache=True, reuse_blocks=(0, 2), hoist_invariants=True),
    HeadCachePolicy(refresh_every=4, cfg_cache=True, reuse_blocks=(1, 2), reuse_mlp=True, hoist_invariants=True),
    HeadCachePolicy(refresh_every=5, cfg_cache=True, reuse_blocks=(1, 2), reuse_mlp=True, hoist_invariants=True),
    HeadCachePolicy(refresh_every=7, cfg_cache=True, reuse_blocks=(1, 2), reuse_mlp=True, hoist_invariants=True),
)


def check_calibration_plan(seed: int, num_samples: int) -> None:
    """Refuse a calibration set that would overlap an evaluation seed or is too small to score FID."""
    if seed in EVALUATION_SEEDS:
        raise DerivationError(f"seed {seed} is an evaluation seed ({sorted(EVALUATION_SEEDS)}); search on "
                              f"seeds >= {FIRST_SEARCH_SEED}")
    if num_samples < MIN_CALIBRATION_SAMPLES:
        raise DerivationError(f"a quality search needs >= {MIN_CALIBRATION_SAMPLES} calibration samples, "
                              f"got {num_samples}")


@dataclass(frozen=True)
class QualityObjective:
    """Feasible: for every metric the floor and the candidate both have, the verdict of the paired difference
    (candidate - floor, 95 % bootstrap interval over the calibration samples) is ``better`` or ``no worse``; the
    margins: PSNR ``margin_psnr`` dB, accuracy ``margin_accuracy`` points, FID ``margin_fid`` percent of the
    floor's. Best: highest FLOPs ratio, then lowest FID."""

    margin_psnr: float = 0.5
    margin_accuracy: float = 0.5
    margin_fid: float = 5.0
    resamples: int = 1000
    bootstrap_seed: int = 0

    def options(self):
        from ..runs.intervals import IntervalOptions
        return IntervalOptions(resamples=self.resamples, seed=self.bootstrap_seed, baseline=None,
                               margin_psnr=self.margin_psnr, margin_accuracy=self.margin_accuracy,
                               margin_fid=self.margin_fid)

    @staticmethod
    def feasible(row: dict) -> bool:
        verdicts = [row[f"verdict_{m}"] for m in ("psnr", "accuracy", "fid") if f"verdict_{m}" in row]
        return bool(verdicts) and all(v in ("better", "no worse") for v in verdicts)

    @staticmethod
    def rank_key(row: dict) -> tuple:
        return (row["flops_ratio"], -row["fid"])

    def describe(self, floor_name: str) -> str:
        return (f"max FLOPs ratio s.t. every metric is 'better' or 'no worse' than {floor_name}'s on the same "
                f"calibration samples (paired 95 % bootstrap, {self.resamples} resamples; margins PSNR "
                f"-{self.margin_psnr:g} dB, accuracy -{self.margin_accuracy:g} points, digits-FID "
                f"+{self.margin_fid:g} %)")


def with_head_policies(schedules: Iterable[CacheSchedule], policies: Sequence[HeadCachePolicy] = HEAD_GRID
                       ) -> list[CacheSchedule]:
    """Each schedule under each head policy (head cache on every step), named ``<name>+h<k>``."""
    out = []
    for schedule, (k, policy) in product(schedules, enumerate(policies)):
        out.append(schedule.with_changes(head=policy, head_cache=[True] * schedule.num_iter,
                                         name=f"{schedule.name}+h{policy.refresh_every}-"
                                              f"{''.join(map(str, policy.reuse_blocks))}{'m' if policy.reuse_mlp else ''}"))
    return out


@dataclass
class QualitySearchResult:
    best: Optional[CacheSchedule]          # None: no candidate met the objective
    floor: dict                            # the reference schedule's row
    measured: list[dict] = field(default_factory=list)
    considered: int = 0

    def search_record(self, seed: int, num_samples: int, objective: str) -> dict:
        """The provenance the chosen schedule carries. Its seeds include those of the search that made its base
        (``lazymar derive``'s measured search, kept as ``base_search``): every seed that shaped the schedule."""
        record = {"seeds": [seed], "num_samples": num_samples, "objective": objective,
                  "floor": _numbers(self.floor), "candidates_measured": len(self.measured)}
        earlier = self.best.search if self.best is not None else None
        if earlier:
            record["seeds"] = sorted({seed, *earlier.get("seeds", [])})
            record["base_search"] = earlier
        return record


NATIVE_QUALITY = ("fid32", "roughness", "roughness_real")  # reported where the evaluator measures them


def _numbers(row: dict) -> dict:
    return {k: (None if isinstance(row.get(k), float) and math.isnan(row[k]) else row.get(k))
            for k in ("name", "flops_ratio", "wall_ratio", "psnr", "accuracy", "fid",
                      *[k for k in NATIVE_QUALITY if k in row])}


def quality_search(reference, floor_schedule: CacheSchedule, candidates: Sequence[CacheSchedule],
                   config: MARConfig, target_flops_ratio: float, objective: QualityObjective = QualityObjective(),
                   max_measured: int = 6, flops_batch_size: int = 100, progress: bool = False
                   ) -> QualitySearchResult:
    """Measure ``floor_schedule`` and up to ``max_measured`` candidates with predicted FLOPs ratio >=
    ``target_flops_ratio`` (cheapest first, i.e. the ones closest to the budget) on ``reference``'s calibration
    plan (a :class:`lazymar.runs.Reference` with a quality evaluator); the feasible one of highest measured FLOPs
    ratio wins."""
    check_calibration_plan(reference.plan.seed, reference.plan.num_samples)
    if reference.evaluator is None:
        raise DerivationError("a quality search needs a quality evaluator (accuracy, FID)")
    use_cfg = reference.settings.cfg != 1.0
    priced = [(predicted_flops(s, config, use_cfg, flops_batch_size)["ratio"], s) for s in candidates]
    feasible = sorted((p for p in priced if p[0] >= target_flops_ratio), key=lambda p: p[0])
    if not feasible:
        reach = max((p[0] for p in priced), default=0.0)
        raise DerivationError(f"no candidate reaches a predicted FLOPs ratio of {target_flops_ratio:g} "
                              f"(the most: {reach:.2f})")

    from ..runs import intervals
    options = objective.options()

    def measure(schedule: CacheSchedule) -> tuple[dict, dict]:
        run, result = reference.measure(schedule, name=schedule.name)
        arrays = run if isinstance(run, dict) else intervals.sample_arrays(run, reference.run, reference.evaluator)
        return ({"name": schedule.name, **{k: float(result[k]) for k in
                                           ("flops_ratio", "wall_ratio", "psnr", "accuracy", "fid")},
                 **{k: float(result[k]) for k in NATIVE_QUALITY if result.get(k) is not None}}, arrays)

    floor, floor_arrays = measure(floor_schedule)
    result = QualitySearchResult(best=None, floor=floor, considered=len(candidates))
    best_row = None
    for predicted, schedule in tqdm(feasible[:max_measured], desc="quality search", disable=not progress):
        row, arrays = measure(schedule)
        row["predicted_flops_ratio"] = predicted
        tested = intervals.intervals([{"floor": floor_arrays, "candidate": arrays}], options, reference.evaluator,
                                     baseline="floor")
        row.update({k: v for k, v in tested.get("candidate", {}).items() if k.startswith(("d_", "verdict"))
                    or k.endswith(("_ci_low", "_ci_high"))})
        row["feasible"] = objective.feasible(row)
        result.measured.append(row)
        if row["feasible"] and (best_row is None or objective.rank_key(row) > objective.rank_key(best_row)):
            best_row, result.best = row, schedule
    return result


def quality_report_markdown(schedule: CacheSchedule, result: QualitySearchResult, *, seed: int, num_samples: int,
                            batch_size: int, bases: Sequence[str], floor: str, target_flops_ratio: float) -> str:
    """The markdown report of ``lazymar search-quality``'s pick ``schedule`` (with its ``search`` record) from
    ``result``: how it was searched, and the floor and every measured candidate with the quality differences and
    verdicts."""
    from ..runs.intervals import cell
    native = [k for k in NATIVE_QUALITY if k in result.floor]
    lines = [f"# Quality-searched cache schedule `{schedule.name}`", "",
             f"Searched by `lazymar search-quality` on calibration seed {seed} ({num_samples} samples, "
             f"batch {batch_size}); objective: {schedule.search['objective']}. Quote results from other seeds.",
             "", f"- base schedules: {', '.join(bases)}; floor: {floor}",
             f"- target predicted FLOPs ratio: >= {target_flops_ratio:g}",
             f"- every seed that shaped it: {schedule.search['seeds']}"
             + (" (with its base's own search)" if "base_search" in schedule.search else ""), ""]

    def measured(r: dict, name: str, predicted: str) -> list[str]:
        return [name, predicted, f"{r['flops_ratio']:.2f}", f"{r['wall_ratio']:.2f}", f"{r['psnr']:.2f}",
                f"{r['accuracy']:.3f}", f"{r['fid']:.2f}",
                *[f"{r[k]:.3f}" if k.startswith("roughness") else f"{r[k]:.2f}" for k in native]]
    rows = [measured(result.floor, f"{result.floor['name']} (floor)", "") + [""] * 5]
    for r in result.measured:
        diffs = [cell(r.get(f"d_{m}"), r.get(f"d_{m}_ci_low"), r.get(f"d_{m}_ci_high"), 3 if m == "accuracy" else 2)
                 + f" ({r.get(f'verdict_{m}', '')})" for m in ("psnr", "accuracy", "fid")]
        rows.append(measured(r, r["name"], f"{r['predicted_flops_ratio']:.2f}") + diffs
                    + [r.get("verdict", ""), r["feasible"]])
    columns = ["name", "predicted FLOPs", "FLOPs ratio", "wall ratio", "PSNR", "accuracy", "FID", *native,
               "d_psnr [95% CI]", "d_accuracy [95% CI]", "d_fid [95% CI]", "verdict", "feasible"]
    return "\n".join(lines + [markdown_table(columns, rows)]) + "\n"
