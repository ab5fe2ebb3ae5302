"""Notebook-facing analyses built on lazymar recordings and the cache engine. Schedule derivation and search live in
:mod:`lazymar.schedules` (``analysis.derive`` re-exports it for older imports).

- phenomena.py: the redundancy phenomena as tables (notebooks).
- plots.py, schedule_plots.py: the workbook's figures (phenomena; schedules and trade-offs).
- sweep.py: the speed/quality trade-off sweep, ``load_sweep`` and ``pareto_front``.
- measure.py: quick measured checks of schedules beside the uncached run.
- explorer.py: the interactive schedule explorer of notebook 03.

Modules are imported on demand (``from analysis import plots``) so that each stays light.
"""
