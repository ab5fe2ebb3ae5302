"""Cache schedules derived from a redundancy recording, and searches over them (``lazymar derive``).

- profile.py: :class:`RedundancyProfile`, a recording condensed once (chunk by chunk) into per-step arrays, and
  the per-step decisions each threshold makes;
- levels.py: similarity levels (distinct recorded cosines with counts) and counts below a threshold;
- selection.py: the selection-layer study (which decoder block's similarity best ranks positions);
- derive.py: five thresholds -> a :class:`~lazymar.cache.schedule_file.CacheSchedule` (:func:`derive_schedule`), and
  ``schedule_matrix`` for heat maps;
- predicted_flops.py: memoised FLOPs predictions (calls to :mod:`lazymar.cache.flops`);
- error_model.py: what a schedule leaves stale, and its calibration into predicted PSNR;
- search.py: the FLOPs-budget and fidelity-floor searches;
- report.py: what ``lazymar derive`` reports of a derived schedule (record and markdown report).
"""
from .derive import DerivedSchedule, derive_schedule, schedule_matrix
from .error_model import ERROR_COMPONENTS, ErrorModel, calibrate_error_model, component_probe, error_components
from .predicted_flops import predicted_flops
from .profile import DERIVED_ALWAYS_KEEP, TAU_TOKEN_ALL, DerivationError, HeadProfile, RedundancyProfile, load_profile
from .report import derive_outputs, derived_record, report_markdown, search_provenance, write_derived
from .search import DEFAULT_GRID, SearchResult, candidate_schedules, search_budget, search_fidelity
from .selection import SelectionStudyError, selection_markdown, selection_study

__all__ = ["DERIVED_ALWAYS_KEEP", "DEFAULT_GRID", "ERROR_COMPONENTS", "TAU_TOKEN_ALL", "DerivationError", "DerivedSchedule",
           "ErrorModel", "HeadProfile", "RedundancyProfile", "SearchResult", "SelectionStudyError",
           "calibrate_error_model", "candidate_schedules", "component_probe", "derive_outputs", "derive_schedule",
           "derived_record", "error_components", "load_profile", "predicted_flops", "report_markdown",
           "schedule_matrix", "search_budget", "search_fidelity", "search_provenance", "selection_markdown",
           "selection_study", "write_derived"]
