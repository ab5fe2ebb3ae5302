"""Analyses built on lazymar recordings and the cache engine.

- derive.py: cache schedules derived from a recording (:func:`~analysis.derive.derive_schedule`), FLOPs-budget
  and fidelity-floor search, ``schedule_matrix`` for heat maps.
- selection.py: which decoder layer's similarity best ranks positions by their change (selection-layer study).
- sweep.py: the speed/quality trade-off sweep, ``load_sweep`` and ``pareto_front``.
- phenomena.py: the redundancy phenomena as tables (notebooks).

Modules are imported on demand (``from analysis.derive import derive_schedule``) so that each stays light.
"""
