"""Notebook-facing analyses built on lazymar recordings and the cache engine. Schedule derivation and search live in
:mod:`lazymar.schedules`, the trade-off sweep in :mod:`lazymar.sweep` (and the peer families in :mod:`lazymar.peers`).

- phenomena.py (+ chunked.py): the redundancy phenomena as tables, reduced chunk by chunk (lazy Zarr stores).
- figures.py: drawing without pyplot's global state, writing figures (PNG, PDF) and tables (Markdown).
- redundancy_plots.py: the figures of notebooks 01-02; schedule_plots.py: schedules, trade-offs, ablations, samples.
- schedule_runs.py: quick measured runs of schedules beside the uncached run, and the ablation schedules.
- explorer.py: the interactive schedule explorer of notebook 03.
- workbook.py: what every notebook shares (recording description, figure/table writer).
- model_comparison.py: several models side by side (notebook 04's last section).
- run_notebook.py: run a notebook with parameters (``python -m analysis.run_notebook --help``).

Modules are imported on demand (``from analysis import figures``) so that each stays light.
"""
