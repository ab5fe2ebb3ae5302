"""Recording token and condition redundancy of MAR sampling (hooks -> xarray Datasets -> Zarr stores or NetCDF).

- :class:`RedundancyRecorder` (recorder.py): the hooks and step observer; ``with RedundancyRecorder(model) as rec``.
- :func:`record` (driver.py): many samples batch by batch into one store, with fixed seeds, ranks writing in it.
- store.py: the Zarr store (created once, written per batch, ``recorded`` says which batches are done).
- dataset.py: the Dataset layout, :func:`save_stats` (atomic), :func:`load_stats` (validating), :func:`merge_stats`.
- summary.py: :func:`tidy` long-format DataFrames, :func:`summarize` per-(step, layer, status) tables.
"""
from .dataset import (CFG_STATS, COMPACT_BITS, FEATURE_KINDS, STATUS_CODES, STATUS_NAMES, RecordingError,
                      load_stats, merge_stats, save_stats, validate)
from .driver import record
from .recorder import RedundancyRecorder, head_part_names, layer_names
from .summary import overview, summarize, tidy, tidy_head

__all__ = ["CFG_STATS", "COMPACT_BITS", "FEATURE_KINDS", "STATUS_CODES", "STATUS_NAMES", "RecordingError",
           "RedundancyRecorder", "head_part_names", "layer_names", "load_stats", "merge_stats", "overview", "record",
           "save_stats", "summarize", "tidy", "tidy_head", "validate"]
