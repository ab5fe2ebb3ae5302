"""Peer methods as sweep families, on the same engine, FLOPs ledger, seeds and metrics as the lazymar preset.

- ``marche`` (MARché, arXiv 2506.12035): cache-aware attention with selective KV refresh. Cached steps run, after
  the selection layer, the active tokens (decoded at the previous step and now) plus the cached tokens the new
  ones attend to most (selection rule "attention"), attending over the cached K/V of the rest; full refreshes
  at LazyMAR's refresh steps. MARché caches the transformer only: no condition cache and no head cache (the head
  only hoists its invariants, which is exact). Preset: the LazyMAR selection layer and refresh steps, a refreshed
  fraction of 25 % of all decoder positions (the paper reports up to 1.7x; 25 % lands there on digits).
- ``gtr`` (GtR, arXiv 2510.17171): the two-stage order (lazymar.orders, "gtr:<k>": a checkerboard half over most
  steps, the rest in the last k) with fewer MAR steps and no cache. Preset: 16 + 2 = 18 steps for MAR's 64 (GtR
  reports 3.72x on MAR-H, where the transformer is nearly all of the FLOPs; 18 of 64 steps is that cut of the
  transformer). ``gtr-fts`` adds GtR's Frequency-Weighted Token Selection (lazymar.head_steps, "fts:<fraction>:
  <reduced>": the tokens with the most high-frequency energy around them keep the head's full steps, the others run
  fewer). The paper's split is not in the sources we could read; mapped to this model: the top quarter of each
  step's tokens keep MAR's 100 head steps, the rest run 50 (on digits the head is about half of GtR's FLOPs, where
  on MAR-H it is a small part). ``gtr`` against ``gtr-fts`` isolates FTS; the grid varies the order (uniform head
  steps) and the FTS split at the preset's order (0.5:25 and 0.1:10 spend less on the head).
- ``combo``: mechanisms combined: the lazymar preset's caches on a GtR order, and a derived schedule (data/
  schedules/digits_3.5x.json) refreshing by attention scores instead of V similarity.

PSNR and token MSE of ``gtr`` points are against the uncached MAR-order run: a different order draws different
images from the same seeds, so only their accuracy and FID compare them with the others.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from .cache.schedule_file import CacheSchedule, HeadCachePolicy, lazymar_schedule, load_schedule, none_schedule
from .config import MARConfig
from .errors import ArgumentError
from .sampling import SamplingSettings

from .sweep import SweepPoint

PEER_PRESETS = ("marche", "gtr", "gtr-fts")
MARCHE_PRESET = {"keep": 0.25, "refresh": "lazymar"}
MARCHE_GRID = ({"keep": 0.1, "refresh": "lazymar"}, {"keep": 0.5, "refresh": "lazymar"},
               {"keep": 0.25, "refresh": 4}, {"keep": 0.1, "refresh": 8})
GTR_PRESET = {"structure_steps": 16, "detail_steps": 2, "head_steps": "uniform"}
GTR_FTS_PRESET = {**GTR_PRESET, "head_steps": "fts:0.25:50"}
GTR_GRID = ({"structure_steps": 30, "detail_steps": 2}, {"structure_steps": 10, "detail_steps": 2},
            {"structure_steps": 16, "detail_steps": 4},
            {**GTR_FTS_PRESET, "head_steps": "fts:0.5:25"}, {**GTR_FTS_PRESET, "head_steps": "fts:0.1:10"})
COMBO_SCHEDULE = "data/schedules/digits_3.5x.json"


def marche_schedule(num_iter: int, config: Optional[MARConfig], keep: float = 0.25,
                    refresh: int | str = "lazymar") -> CacheSchedule:
    """Attention-score refresh of ``keep`` of the decoder positions on cached steps; full refreshes at LazyMAR's
    steps (``refresh="lazymar"``) or every ``refresh`` steps; the encoder incremental, as LazyMAR's."""
    base = lazymar_schedule(num_iter, config)
    flags = base.refresh if refresh == "lazymar" else tuple(s % int(refresh) == 0 for s in range(num_iter))
    tag = "" if (keep, refresh) == (MARCHE_PRESET["keep"], MARCHE_PRESET["refresh"]) else f"-k{keep:g}-r{refresh}"
    return CacheSchedule(
        num_iter=num_iter, refresh=flags, keep_fraction=[1.0 if r else keep for r in flags],
        condition_cache=[False] * num_iter, head_cache=[True] * num_iter, name="marche" + tag,
        selection="attention", selection_layer=base.selection_layer, always_keep=("to_predict", "new"),
        encoder="incremental", head=HeadCachePolicy(hoist_invariants=True))


def marche_point(settings: SamplingSettings, config: Optional[MARConfig], keep: float = 0.25,
                 refresh: int | str = "lazymar") -> SweepPoint:
    schedule = marche_schedule(settings.num_iter, config, keep, refresh)
    return SweepPoint(schedule.name, "marche", schedule, params={"keep": keep, "refresh": refresh})


def gtr_settings(settings: SamplingSettings, structure_steps: int, detail_steps: int,
                 head_steps: str = "uniform") -> SamplingSettings:
    return replace(settings, num_iter=structure_steps + detail_steps, order=f"gtr:{detail_steps}",
                   head_steps=head_steps)


def gtr_point(settings: SamplingSettings, structure_steps: int = 16, detail_steps: int = 2,
              head_steps: str = "uniform", schedule: Optional[CacheSchedule] = None,
              family: str = "gtr") -> SweepPoint:
    """GtR's order at structure_steps + detail_steps MAR steps, with the head's ``head_steps`` (uniform, or FTS),
    uncached (head invariants hoisted, exact) unless ``schedule`` (of that many steps) adds caches."""
    s = gtr_settings(settings, structure_steps, detail_steps, head_steps)
    presets = {"gtr": GTR_PRESET, "gtr-fts": GTR_FTS_PRESET}
    here = {"structure_steps": structure_steps, "detail_steps": detail_steps, "head_steps": head_steps}
    name = next((n for n, p in presets.items() if p == here), None)
    if name is None:
        name = f"gtr-{structure_steps}+{detail_steps}" + ("" if head_steps == "uniform"
                                                          else "-" + head_steps.replace(":", "-"))
    if schedule is None:
        n = s.num_iter
        schedule = none_schedule(n).with_changes(head_cache=[True] * n, head=HeadCachePolicy(hoist_invariants=True),
                                                 name=name)
    else:
        name = f"{name}+{schedule.name}"
    return SweepPoint(name, family, schedule, settings=s, params={
        "order": s.order, "num_iter": s.num_iter, "head_steps": s.head_steps, "schedule": schedule.name})


def preset_point(name: str, settings: SamplingSettings, config: Optional[MARConfig]) -> SweepPoint:
    """A peer preset by name (``PEER_PRESETS``) at the paper's settings mapped to the model."""
    if name == "marche":
        return marche_point(settings, config, **MARCHE_PRESET)
    if name == "gtr":
        return gtr_point(settings, **GTR_PRESET)
    if name == "gtr-fts":
        return gtr_point(settings, **GTR_FTS_PRESET)
    raise ArgumentError(f"unknown peer preset {name!r}; known: {', '.join(PEER_PRESETS)}")


def family_points(family: str, settings: SamplingSettings, config: Optional[MARConfig]) -> list[SweepPoint]:
    """The preset and the parameter grid of a peer family (``marche``, ``gtr``), or the ``combo`` points."""
    if family == "marche":
        return [preset_point("marche", settings, config)] + [marche_point(settings, config, **p) for p in MARCHE_GRID]
    if family == "gtr":
        return [preset_point(p, settings, config) for p in ("gtr", "gtr-fts")] + [
            gtr_point(settings, **p) for p in GTR_GRID]
    if family == "combo":
        return combination_points(settings, config)
    raise ArgumentError(f"unknown sweep family {family!r}; known: marche, gtr, combo")


def combination_points(settings: SamplingSettings, config: Optional[MARConfig],
                       derived: str | Path = COMBO_SCHEDULE) -> list[SweepPoint]:
    """The lazymar preset's caches on GtR's order (preset steps), and ``derived`` refreshing by attention."""
    n = GTR_PRESET["structure_steps"] + GTR_PRESET["detail_steps"]
    on_gtr = lazymar_schedule(n, config).with_changes(name="lazymar")
    points = [gtr_point(settings, **GTR_PRESET, schedule=on_gtr, family="combo")]
    if Path(derived).is_file():
        schedule = load_schedule(derived, settings.num_iter, config)
        schedule = schedule.with_changes(selection="attention", name=f"{Path(derived).stem}+attention")
        points.append(SweepPoint(schedule.name, "combo", schedule, params={"schedule": str(derived),
                                                                           "selection": "attention"}))
    return points
