"""Recording token and condition redundancy of MAR sampling (hooks -> xarray Datasets -> Zarr stores or NetCDF).

- :class:`RedundancyRecorder` (recorder.py): the hooks and step observer; ``with RedundancyRecorder(model) as rec``.
- :func:`record` (driver.py): many samples batch by batch into one store, with fixed seeds, ranks writing in it.
- dataset.py: the Dataset layout (building, :func:`validate`, keep bits); it imports no other module of the package.
- store.py: the Zarr store (created once, written per batch, ``recorded`` says which batches are done).
- netcdf.py: NetCDF4 files (small recordings, written atomically).
- files.py: :func:`save_stats`, :func:`load_stats` (validating) and :func:`merge_stats`, a store or a file by path.
- summary.py: :func:`tidy` long-format DataFrames, :func:`summarize` per-(step, layer, status) tables.
"""
from .dataset import CFG_STATS, COMPACT_BITS, FEATURE_KINDS, STATUS_CODES, STATUS_NAMES, RecordingError, validate
from .files import load_stats, merge_stats, save_stats
from .driver import record
from .recorder import RedundancyRecorder, head_part_names, layer_names
from .summary import overview, summarize, tidy, tidy_head

__all__ = ["CFG_STATS", "COMPACT_BITS", "FEATURE_KINDS", "STATUS_CODES", "STATUS_NAMES", "RecordingError",
           "RedundancyRecorder", "head_part_names", "layer_names", "load_stats", "merge_stats", "overview", "record",
           "save_stats", "summarize", "tidy", "tidy_head", "validate"]
