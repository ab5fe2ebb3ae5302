"""Re-export of :mod:`lazymar.schedules` for analysis modules that still import ``analysis.derive`` (the explorer
and the sweep); new code imports ``lazymar.schedules``."""
from lazymar.schedules import *  # noqa: F401,F403
from lazymar.schedules import __all__  # noqa: F401
