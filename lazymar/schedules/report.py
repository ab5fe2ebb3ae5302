"""What ``lazymar derive`` (and the workbook's explorer) reports of a derived schedule: its record (the --json
output) and the markdown report written beside the schedule JSON."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from ..cache.schedule_file import CacheSchedule
from ..tables import markdown_table
from .derive import DerivedSchedule
from .profile import RedundancyProfile


def derive_outputs(out: Optional[str | Path]) -> list[Path]:
    """The files ``derive --out`` writes: the schedule JSON and its markdown report beside it."""
    return [] if out is None else [Path(out), Path(out).with_suffix(".md")]


def derived_record(derived: DerivedSchedule, profile: RedundancyProfile, stats: str | Path,
                   mode: str = "thresholds", name: Optional[str] = None, **search) -> dict:
    """What `derive` reports of a derived schedule (its --json output and the source of its .md report): the
    schedule's derivation, the selection-layer study, and what a search adds (``search``: target_flops_ratio or
    min_psnr, candidates_considered, measured with measure_samples and search_seed); None values are left out."""
    out = {"mode": mode, "stats": str(stats), "name": name or derived.schedule.name, **derived.to_dict(),
           "selection_study": json.loads(profile.selection.reset_index().to_json(orient="records"))}
    for key in ("target_flops_ratio", "min_psnr", "candidates_considered"):
        if search.get(key) is not None:
            out[key] = search[key]
    measured = search.get("measured")
    if measured:
        out["measured"] = measured
        best = [m for m in measured if m["name"] == derived.schedule.name]
        out["measured_psnr"] = best[0]["psnr"] if best else None
        out["measure_samples"], out["search_seed"] = search["measure_samples"], search["search_seed"]
    return out


def search_provenance(seed: int, num_samples: int, batch_size: int, measured: list, *,
                      target_flops_ratio: Optional[float] = None, min_psnr: Optional[float] = None) -> dict:
    """A measured search's ``CacheSchedule.search`` record: the seeds its pick looked at (so that the schedule's
    quality is quoted from other seeds) and its objective."""
    objective = (f"best measured PSNR vs uncached at predicted FLOPs ratio >= {target_flops_ratio}"
                 if target_flops_ratio is not None else
                 f"highest predicted FLOPs ratio with measured PSNR >= {min_psnr} dB")
    return {"seeds": [seed], "num_samples": num_samples, "batch_size": batch_size, "objective": objective,
            "candidates_measured": len(measured)}


def write_derived(schedule: CacheSchedule, record: dict, path: str | Path) -> tuple[Path, Path]:
    """The schedule JSON at ``path`` and its markdown report (from ``record``, see derived_record) beside it;
    also what the workbook's explorer saves."""
    path = schedule.save(path)
    report = path.with_suffix(".md")
    report.write_text(report_markdown(record))
    return path, report


def _number(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def report_markdown(out: dict) -> str:
    """The markdown report of a derived schedule's record."""
    lines = [f"# Derived cache schedule `{out['name']}`", "", out["summary"], "",
             f"- recording: `{out['stats']}`; mode: {out['mode']}"]
    if "target_flops_ratio" in out:
        lines.append(f"- target FLOPs ratio: >= {out['target_flops_ratio']:g}")
    if "min_psnr" in out:
        lines.append(f"- PSNR floor: >= {out['min_psnr']:g} dB")
    lines.append(f"- thresholds: {json.dumps(out['params'])}")
    lines.append("- selection-layer study (decoder block: Spearman / AUROC top 20%): " + ", ".join(
        f"{r['layer']}: {_number(r['spearman'])} / {_number(r['auroc'])}" for r in out["selection_study"]))
    batch = out["params"].get("flops_batch_size", 1)  # predicted_flops prices a whole batch of this size
    lines.append(f"- predicted FLOPs per image (batch of {batch}): {out['flops']['total'] / batch / 1e9:.3f} GFLOPs "
                 f"(uncached {out['flops']['baseline'] / batch / 1e9:.3f}), ratio {out['predicted_flops_ratio']:.3f}")
    if out.get("measured"):
        lines += ["", f"Candidates measured (PSNR vs uncached on {out['measure_samples']} fixed samples of seed "
                        f"{out['search_seed']}; quote this schedule's quality from other seeds):", "",
                  markdown_table(["role", "name", "predicted FLOPs ratio", "predicted PSNR (dB)",
                                  "measured PSNR (dB)"],
                                 [[row["role"], row["name"], f"{row['predicted_flops_ratio']:.3f}",
                                   "" if row.get("predicted_psnr") is None else f"{row['predicted_psnr']:.2f}",
                                   f"{row['psnr']:.2f}"] for row in out["measured"]])]
    return "\n".join(lines) + "\n"

